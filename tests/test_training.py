"""A few real training steps of a tiny MPRNet: the loss falls, checkpoints load, export and resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import MPRNetConfig, load_checkpoint, load_model
from tests.test_precision import needs_cpu_without_bf16
from training.train import (
    SPECTRAL_WEIGHT,
    EdgeLoss,
    MPRNetLoss,
    PatchSampler,
    charbonnier,
    main,
    patch_batches,
    spectral_distance,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-feat", "8", "--scale-unetfeats", "4", "--scale-orsnetfeats", "4", "--num-cab", "1"]
TINY_CONFIG = MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)


def _write_photos(folder: Path, count: int, seed: int) -> Path:
    """Smooth random colour fields with a few sharp rectangles: something with edges to restore."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.uniform(0, 255, size=(6, 7, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((72, 64), Image.BICUBIC)).copy()
        for _ in range(3):
            top, left = rng.integers(0, 48), rng.integers(0, 56)
            image[top:top + 16, left:left + 16] = rng.integers(0, 255, size=3)
        Image.fromarray(image).save(folder / f"photo{index}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    return _write_photos(root / "train", 4, seed=0), _write_photos(root / "val", 2, seed=1)


def _args(task: str, photos, out: Path, *extra: str) -> list[str]:
    train, val = photos
    return ["--task", task, "--data", str(train), "--val", str(val), "--out", str(out), "--patch", "32",
            "--batch", "4", "--threads", "1", "--device", "cpu", "--warmup", "2", "--log-every", "1",
            *TINY, *extra]


def _fixed_batch_loss(checkpoint: Path, photos, task: str) -> float:
    """The training loss of a checkpoint's model on one fixed batch."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = MPRNetConfig(**state["config"]).build()
    model.load_state_dict(state["model"])
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos[0].iterdir())]
    clean, degraded = PatchSampler(images, task, 32, np.random.default_rng(123)).batch(8)
    with torch.no_grad():
        return MPRNetLoss()(model(degraded), clean).item()


def test_rain_patches_stay_upright_while_noise_patches_turn_sideways():
    """Vertical stripes (every row alike) stay vertical in deraining patches, so the derainer never
    sees horizontal streaks; denoising patches turn a quarter about half the time."""
    stripes = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 64, 3), dtype=np.uint8), 64, axis=0)
    sideways = {}
    for task in ("deraining", "denoising"):
        sampler = PatchSampler([stripes], task, 32, np.random.default_rng(5))
        clean = [sampler._pair()[0] for _ in range(40)]
        assert all((c == c[:1]).all() or (c == c[:, :1]).all() for c in clean)
        sideways[task] = sum(not (c == c[:1]).all() for c in clean)
    assert sideways["deraining"] == 0
    assert 10 <= sideways["denoising"] <= 30


@needs_cpu_without_bf16
def test_training_refuses_emulated_bf16_naming_what_is_missing_and_the_override(photos, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as refused:
        main(_args("denoising", photos, out, "--iters", "1", "--bf16"))
    message = str(refused.value)
    assert "avx512_bf16" in message and "emulated" in message and "--allow-emulated-precision" in message
    assert not (out / "last.pt").exists()


# bf16 is asked for with the override, so the bf16 path is exercised on AVX2-only CI machines too.
@pytest.mark.parametrize("task, precision", [("denoising", []), ("deraining", []),
                                             ("denoising", ["--bf16", "--allow-emulated-precision"])])
def test_training_reduces_loss_exports_and_resumes(task, precision, photos, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, photos, out, "--iters", "1", *precision)) == 0
    last = out / "last.pt"
    start_loss = _fixed_batch_loss(last, photos, task)

    assert main(_args(task, photos, out, "--iters", "40", "--resume", *precision)) == 0
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["iteration"] == 40 and state["config"] == TINY_CONFIG.as_kwargs()
    # Adam's per-parameter step count proves the optimiser state carried over the resume.
    assert all(int(s["step"]) == 40 for s in state["optimizer"]["state"].values())
    log = (out / "train.log").read_text()
    assert "resume task=" in log and "iteration=1 " in log and "val_psnr" in log
    assert _fixed_batch_loss(last, photos, task) < 0.9 * start_loss

    exported = tmp_path / f"{task}.safetensors"
    assert main(["--out", str(out), "--export", str(exported)]) == 0
    checkpoint = load_checkpoint(exported)
    assert checkpoint.config == TINY_CONFIG
    model = checkpoint.model
    reference = MPRNetConfig(**state["config"]).build().eval()
    reference.load_state_dict(state["model"])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[0], reference(x)[0])


def test_patch_workers_draw_distinct_reproducible_batches(photos):
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos[0].iterdir())]
    sampler = PatchSampler(images, "deblurring", 32, np.random.default_rng(0))

    def first_batches(seed: int, start: int) -> list[torch.Tensor]:
        batches = patch_batches(sampler, 3, workers=2, seed=seed, start=start, pin=False)
        drawn = [next(batches)[1] for _ in range(4)]
        batches.close()
        return drawn

    drawn = first_batches(seed=5, start=0)
    assert all(b.shape == (3, 3, 32, 32) and b.dtype == torch.float32 for b in drawn)
    # Two workers seeded alike would hand the network every batch twice.
    assert not any(torch.equal(a, b) for i, a in enumerate(drawn) for b in drawn[i + 1:])
    assert all(torch.equal(a, b) for a, b in zip(drawn, first_batches(seed=5, start=0)))
    # A resumed run's workers start a new stream rather than replaying the one already trained on.
    assert not torch.equal(drawn[0], first_batches(seed=5, start=40)[0])


def test_training_with_patch_workers_learns_and_resumes(photos, tmp_path):
    out = tmp_path / "run"
    assert main(_args("deblurring", photos, out, "--iters", "1", "--workers", "2")) == 0
    start_loss = _fixed_batch_loss(out / "last.pt", photos, "deblurring")
    assert main(_args("deblurring", photos, out, "--iters", "30", "--workers", "2", "--resume")) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 30 and state["meta"]["workers"] == 2
    assert state["meta"]["spectral_weight"] == SPECTRAL_WEIGHT["deblurring"] > 0
    assert f"spectral_weight={SPECTRAL_WEIGHT['deblurring']}" in (out / "train.log").read_text()
    assert _fixed_batch_loss(out / "last.pt", photos, "deblurring") < start_loss


def test_half_export_agrees_with_full_precision(photos, tmp_path):
    out = tmp_path / "run"
    main(_args("deblurring", photos, out, "--iters", "3"))
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    main(["--out", str(out), "--export", str(full)])
    main(["--out", str(out), "--export", str(half), "--half"])
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        difference = (load_model(full)(x)[0] - load_model(half)(x)[0]).abs().max().item()
    assert difference < 2e-3  # well under one 8-bit level


def test_fine_tuned_weights_count_the_training_they_started_from(photos, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    main(_args("denoising", photos, first, "--iters", "3"))
    start = tmp_path / "start.safetensors"
    main(["--out", str(first), "--export", str(start)])

    main(_args("denoising", photos, second, "--iters", "2", "--init", str(start)))
    main(_args("denoising", photos, second, "--iters", "4", "--resume"))  # the lineage survives a resume
    tuned = tmp_path / "tuned.safetensors"
    main(["--out", str(second), "--export", str(tuned)])
    from safetensors import safe_open
    with safe_open(str(start), framework="pt") as handle:
        start_seconds = float(handle.metadata()["trained_seconds"])
    with safe_open(str(tuned), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["iteration"] == "7"
    assert float(metadata["trained_seconds"]) >= start_seconds


def test_bundling_a_run_updates_weights_manifest_and_card(photos, tmp_path, monkeypatch):
    from models import weights
    from training import bundle
    from training.card import markers, section
    out = tmp_path / "run"
    main(_args("deraining", photos, out, "--iters", "2"))
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "bundled")
    card = tmp_path / "CARD.md"
    start, end = markers("files")
    card.write_text(f"prose\n{start}\nstale\n{end}\nmore prose\n")

    entry = bundle.bundle("deraining", out / "last.pt", card=card)
    assert entry["iterations"] == 2 and entry["config"] == TINY_CONFIG.as_kwargs()
    assert load_checkpoint(tmp_path / "bundled" / "deraining.safetensors").config == TINY_CONFIG
    assert weights.manifest()["deraining"] == entry
    assert section("files", card) == bundle.files_table({"deraining": entry})
    assert card.read_text().startswith("prose\n") and card.read_text().endswith("more prose\n")


def test_bundling_can_average_the_run_with_the_weights_it_started_from(photos, tmp_path, monkeypatch):
    from models import load_state_dict, sha256_file, weights
    from training import bundle
    from training.card import markers
    start = tmp_path / "start.safetensors"
    out = tmp_path / "run"
    main(_args("denoising", photos, tmp_path / "first", "--iters", "1"))
    main(["--out", str(tmp_path / "first"), "--export", str(start)])
    main(_args("denoising", photos, out, "--iters", "3", "--init", str(start), "--lr", "1e-2"))
    plain = tmp_path / "plain.safetensors"
    main(["--out", str(out), "--export", str(plain)])
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "bundled")
    card = tmp_path / "CARD.md"
    card.write_text("\n".join(markers("files")) + "\n")
    bundle.bundle("denoising", tmp_path / "first" / "last.pt", card=card)
    bundled = weights.bundled_path("denoising")
    replaced, origin = sha256_file(bundled), load_state_dict(bundled)

    # Averaged with the bundled file it replaces, as the README suggests.
    entry = bundle.bundle("denoising", out / "last.pt", card=card, average_with=(bundled, 0.25))
    assert entry["averaged_with"] == {"sha256": replaced, "share": 0.25} and sha256_file(bundled) != replaced
    averaged = load_state_dict(bundled)
    run = load_state_dict(plain)
    assert not torch.equal(run["shallow_feat1.0.weight"], origin["shallow_feat1.0.weight"])
    for key, value in averaged.items():
        torch.testing.assert_close(value, 0.75 * run[key] + 0.25 * origin[key])

    other = tmp_path / "other"
    main(_args("denoising", photos, other, "--iters", "1", "--n-feat", "12"))
    wider = tmp_path / "wider.safetensors"
    main(["--out", str(other), "--export", str(wider)])
    with pytest.raises(ValueError, match="same architecture"):
        bundle.bundle("denoising", out / "last.pt", card=card, average_with=(wider, 0.5))
    with pytest.raises(SystemExit):
        bundle.main(["denoising", str(out / "last.pt"), "--average-with", str(start), "half"])


def test_exporting_the_same_run_twice_writes_the_same_bytes(photos, tmp_path):
    # The manifest's sha256 is only worth recording if bundling the same run reproduces it.
    from safetensors import safe_open

    from models import sha256_file
    out = tmp_path / "run"
    main(_args("deraining", photos, out, "--iters", "1"))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["meta"]["spectral_weight"] == SPECTRAL_WEIGHT["deraining"] > 0
    files = [tmp_path / f"export{n}.safetensors" for n in range(3)]
    for file in files:
        main(["--out", str(out), "--export", str(file)])
    assert len({sha256_file(file) for file in files}) == 1
    assert load_checkpoint(files[0]).config == TINY_CONFIG
    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.metadata()["task"] == "deraining" and handle.metadata()["iteration"] == "1"


def test_sigterm_saves_a_resumable_checkpoint(photos, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "training.train", *_args("denoising", photos, out, "--minutes", "10")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        log = out / "train.log"
        while time.monotonic() < deadline:
            if log.exists() and re.search(r"iter \d+ loss", log.read_text()):
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped by signal" in (out / "train.log").read_text()
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] >= 1 and 0 < state["schedule"]["elapsed"] < 600


def test_edge_loss_ignores_flat_images_and_sees_edges():
    edge = EdgeLoss()
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert edge.laplacian(flat).abs().max() < 1e-6
    assert edge.laplacian(flat + 0.4).abs().max() < 1e-6
    step = flat.clone()
    step[..., 16:] = 0.8
    assert edge(step, flat) > edge(flat + 0.4, flat) + 0.01


def test_spectral_distance_weighs_lost_detail_above_a_shift_of_equal_pixel_error():
    """Why deblurring and deraining train with it: a blurred copy and a brightened copy that the
    pixel loss scores alike differ in the spectrum, where the lost detail spreads over most
    coefficients."""
    texture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    box = torch.full((3, 1, 5, 5), 1 / 25)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(texture, (2, 2, 2, 2), mode="reflect"), box, groups=3)
    shifted = texture + charbonnier(blurred, texture)
    assert abs(charbonnier(shifted, texture) - charbonnier(blurred, texture)) < 1e-3
    assert spectral_distance(texture, texture) == 0
    assert spectral_distance(blurred, texture) > 5 * spectral_distance(shifted, texture)
    loss = MPRNetLoss(spectral_weight=1.0)
    assert loss([blurred], texture) - MPRNetLoss()([blurred], texture) == pytest.approx(
        spectral_distance(blurred, texture).item(), rel=1e-5)


def test_mixture_flag_picks_the_degradations_and_is_recorded(photos, tmp_path):
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos[0].iterdir())]
    draws = {mixture: PatchSampler(images, "denoising", 32, np.random.default_rng(4), mixture).batch(6)
             for mixture in ("classic", "broad")}
    # The same generator, degraded differently (the broad mixture draws camera noise half the time).
    assert not torch.equal(draws["classic"][1], draws["broad"][1])
    assert all(clean.shape == degraded.shape == (6, 3, 32, 32) for clean, degraded in draws.values())

    out = tmp_path / "run"
    assert main(_args("denoising", photos, out, "--iters", "2", "--mixture", "classic")) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["meta"]["mixture"] == "classic"
    assert "mixture=classic" in (out / "train.log").read_text()
    assert state["meta"]["spectral_weight"] == 0.0  # the paper's loss where nothing was measured


def test_attention_pooled_over_windows_trains_exports_and_passes_on(photos, tmp_path):
    from models import load_checkpoint
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    # Windows of a 16 px crop in 32 px patches: the network learns gates that differ across a patch.
    main(_args("deblurring", photos, first, "--iters", "2", "--attention-patch", "16"))
    assert "attention_patch=16" in (first / "train.log").read_text()
    main(_args("deblurring", photos, first, "--iters", "3", "--resume"))  # a resumed run keeps it
    exported = tmp_path / "local.safetensors"
    main(["--out", str(first), "--export", str(exported)])
    assert load_checkpoint(exported).model.attention_patch == 16
    assert load_checkpoint(first / "last.pt").model.attention_patch == 16

    # Fine-tuning such weights keeps their pooling unless told otherwise; 0 is the paper's.
    main(_args("deblurring", photos, second, "--iters", "1", "--init", str(exported)))
    assert torch.load(second / "last.pt", weights_only=True)["meta"]["attention_patch"] == 16
    main(_args("deblurring", photos, third, "--iters", "1", "--init", str(exported), "--attention-patch", "0"))
    plain = tmp_path / "plain.safetensors"
    main(["--out", str(third), "--export", str(plain)])
    assert load_checkpoint(plain).model.attention_patch is None


def test_attention_windows_as_large_as_the_patch_are_refused(photos, tmp_path):
    with pytest.raises(SystemExit, match="only on patches larger than it"):
        main(_args("deblurring", photos, tmp_path / "run", "--iters", "1", "--attention-patch", "32"))
    with pytest.raises(SystemExit):
        main(_args("deblurring", photos, tmp_path / "run", "--iters", "1", "--attention-patch", "12"))


def _sixteen_bit_grey_and_turned_jpeg(folder: Path) -> tuple[Path, Path]:
    """A 16-bit grey PNG (Pillow's plain RGB conversion clips every sample to white) and a JPEG
    stored sideways with an EXIF orientation that turns it upright, as phones write them."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = folder / "grey16.png"
    Image.fromarray(np.full((40, 48), 100 * 257, np.uint16)).save(grey)
    turned = folder / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.full((40, 64, 3), 90, np.uint8)).save(turned, exif=exif)
    return grey, turned


def test_training_photos_are_read_as_the_service_reads_uploads(tmp_path):
    from training.train import load_images
    grey, turned = _sixteen_bit_grey_and_turned_jpeg(tmp_path / "photos")
    grey_pixels, turned_pixels = load_images([grey, turned])
    assert grey_pixels.shape == (40, 48, 3) and np.abs(grey_pixels.astype(int) - 100).max() <= 1
    assert turned_pixels.shape == (64, 40, 3)


def _train_folder_with(photos, tmp_path: Path, name: str, content: bytes) -> Path:
    folder = tmp_path / "train"
    folder.mkdir()
    for photo in photos[0].iterdir():
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / name).write_bytes(content)
    return folder


def test_a_photo_that_cannot_be_decoded_is_named_in_one_line(photos, tmp_path):
    folder = _train_folder_with(photos, tmp_path, "notes.jpg", b"hello")
    with pytest.raises(SystemExit) as refused:
        main(_args("denoising", (folder, photos[1]), tmp_path / "run", "--iters", "1"))
    assert str(folder / "notes.jpg") in str(refused.value.code) and "\n" not in str(refused.value.code)


# The time budget beside the negative iterations only bounds the run that a missing check would start.
@pytest.mark.parametrize("bad", [["--iters", "-5", "--minutes", "0.005"], ["--iters", "0"], ["--minutes", "-1"],
                                 ["--patch", "0"], ["--patch", "-8"], ["--batch", "0"], ["--batch", "-2"],
                                 ["--lr", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--log-every", "0"],
                                 ["--threads", "-1"], ["--warmup", "-1"], ["--workers", "-1"], ["--clip", "0"],
                                 ["--device", "gpu"], ["--data", "/nonexistent/photos"], ["--data", __file__],
                                 ["--init", "/nonexistent.pt"], ["--val-minutes", "-1"], ["--save-minutes", "-0.5"],
                                 ["--save-minutes", "inf"], ["--attention-patch", "1032", "--patch", "1040"]])
def test_impossible_training_arguments_are_usage_errors(bad, photos, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as refused:
        main(_args("denoising", photos, out, "--iters", "1", *bad))
    assert refused.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m training.train: error: ") and bad[0] in error
    assert not out.exists()


def test_exporting_without_a_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(tmp_path / "none"), "--export", str(tmp_path / "weights.safetensors")])
    assert refused.value.code == 2 and "no run to export" in capsys.readouterr().err


def test_runs_that_cannot_start_say_why_in_one_line(photos, tmp_path):
    def refusal(*arguments: str, data=photos) -> str:
        with pytest.raises(SystemExit) as refused:
            main(_args("denoising", data, *arguments))
        message = refused.value.code
        assert isinstance(message, str) and "\n" not in message
        return message

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert "cannot make the run folder" in refusal(str(afile), "--iters", "1")
    assert "cannot make the run folder" in refusal(str(afile / "run"), "--iters", "1")

    tiny_val = tmp_path / "tiny_val"
    tiny_val.mkdir()
    Image.new("RGB", (4, 4)).save(tiny_val / "a.png")
    assert f"{tiny_val / 'a.png'} is 4x4" in refusal(str(tmp_path / "run"), "--iters", "1",
                                                     data=(photos[0], tiny_val))

    torn = tmp_path / "torn"
    main(_args("denoising", photos, torn, "--iters", "1"))
    whole = (torn / "last.pt").read_bytes()
    (torn / "last.pt").write_bytes(whole[:len(whole) // 2])
    assert "last.pt: not a readable training checkpoint" in refusal(str(torn), "--iters", "2", "--resume")

    if not torch.cuda.is_available():
        assert "no CUDA device" in refusal(str(tmp_path / "run"), "--iters", "1", "--device", "cuda")


def test_resume_refuses_to_relabel_a_run_and_logs_the_schedule_it_keeps(photos, tmp_path):
    out = tmp_path / "run"
    main(_args("denoising", photos, out, "--iters", "1"))
    before = (out / "last.pt").read_bytes()
    for flag, value, recorded in (("--task", "deraining", "denoising"), ("--mixture", "classic", "broad"),
                                  ("--patch", "40", "32")):
        with pytest.raises(SystemExit) as refused:
            main(_args("denoising", photos, out, "--iters", "2", "--resume", flag, value))
        message = str(refused.value.code)
        assert f"{flag} {value} would relabel it" in message and recorded in message and str(out) in message
    assert (out / "last.pt").read_bytes() == before

    # The peak and warm-up belong to the schedule being continued; the log says which ran.
    main(_args("denoising", photos, out, "--iters", "2", "--resume", "--lr", "1e-2", "--warmup", "0"))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and state["schedule"]["peak_lr"] == 1e-3 and state["schedule"]["warmup"] == 2
    resumed = next(line for line in (out / "train.log").read_text().splitlines() if " resume task=" in line)
    assert " lr=0.001 warmup=2 " in resumed
    assert "--lr 0.01 and --warmup 0 apply to new runs only" in (out / "train.log").read_text()


def test_starting_from_a_runs_last_pt_counts_the_training_in_it(photos, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    main(_args("denoising", photos, first, "--iters", "3"))
    first_state = torch.load(first / "last.pt", map_location="cpu", weights_only=True)
    main(_args("denoising", photos, second, "--iters", "2", "--init", str(first / "last.pt")))
    meta = torch.load(second / "last.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["prior_iterations"] == 3 and meta["prior_seconds"] == first_state["schedule"]["elapsed"]
    tuned = tmp_path / "tuned.safetensors"
    main(["--out", str(second), "--export", str(tuned)])
    from models.checkpoint import read_notes
    assert read_notes(tuned)["iteration"] == "5"


def test_bundling_refuses_another_tasks_run_and_bad_inputs_in_one_line(photos, tmp_path, monkeypatch, capsys):
    from models import save_safetensors, weights
    from training import bundle
    from training.card import markers, replace_section
    out = tmp_path / "run"
    main(_args("denoising", photos, out, "--iters", "1"))
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "bundled")
    card = tmp_path / "CARD.md"
    card.write_text("\n".join(markers("files")) + "\n")
    monkeypatch.setattr(bundle, "replace_section", lambda name, text, _=None: replace_section(name, text, card))
    last = str(out / "last.pt")

    with pytest.raises(ValueError, match="trained denoising, not deblurring"):
        bundle.bundle("deblurring", last, card=card)
    with pytest.raises(SystemExit) as refused:
        bundle.main(["deblurring", last])
    assert "trained denoising, not deblurring" in str(refused.value.code)
    assert not weights.bundled_path("deblurring").exists()

    other = tmp_path / "other.safetensors"
    save_safetensors(MPRNetConfig(n_feat=12, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1).build(), other)
    with pytest.raises(SystemExit) as refused:
        bundle.main(["denoising", last, "--average-with", str(other), "0.5"])
    assert isinstance(refused.value.code, str) and "only the same architecture averages" in refused.value.code
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(SystemExit) as refused:
        bundle.main(["denoising", str(torn)])
    assert isinstance(refused.value.code, str) and "not a readable training checkpoint" in refused.value.code

    for arguments in (["denoising", str(tmp_path / "nope.pt")],
                      ["denoising", last, "--average-with", str(other), "1.5"],
                      ["denoising", last, "--average-with", str(tmp_path / "nope.safetensors"), "0.5"]):
        with pytest.raises(SystemExit) as refused:
            bundle.main(arguments)
        assert refused.value.code == 2 and "python -m training.bundle: error:" in capsys.readouterr().err
    assert not any((tmp_path / "bundled").glob("*.safetensors"))
