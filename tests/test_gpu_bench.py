"""The GPU run's plumbing, checked here because a lent GPU comes once, for minutes.

``bench/gpu.sh`` must work the first time on a device image that has torch but not the web stack
and may have another Python: its wheels are chosen by tag and unpacked without pip, and its
summary reports every goal whichever steps finished.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.gpu_summary import write_summary
from bench.install_wheels import fits_this_interpreter, unpack
from bench.loadgen import synthetic_photo

from service_helpers import ROOT

HERE = f"cp{sys.version_info.major}{sys.version_info.minor}"
OTHER = "cp39" if HERE != "cp39" else "cp38"


@pytest.mark.parametrize(("name", "fits"), [
    ("fastapi-0.165.0-py3-none-any.whl", True),
    (f"pydantic_core-2.50.5-{HERE}-{HERE}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    (f"pydantic_core-2.50.5-{OTHER}-{OTHER}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", False),
    ("cryptography-44.0.0-cp39-abi3-manylinux_2_28_x86_64.whl", True),  # abi3 from 3.9 on
    (f"thing-1.0-{HERE}-{HERE}-win_amd64.whl", False),
    (f"thing-1.0-{HERE}-{HERE}-macosx_11_0_arm64.whl", False),
])
def test_wheels_are_chosen_by_their_python_and_abi_tags(name, fits):
    assert fits_this_interpreter(Path(name)) is fits


def test_a_wheel_unpacks_into_an_importable_folder_without_pip(tmp_path):
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "ANSWER = 42\n")
        archive.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\nVersion: 1.0\n")
        archive.writestr("demo_pkg-1.0.data/purelib/demo_extra.py", "VALUE = 'pure'\n")
        archive.writestr("demo_pkg-1.0.data/scripts/demo", "#!/bin/sh\n")
    target = tmp_path / "site"
    unpack(wheel, target)
    probe = "import demo_pkg, demo_extra; print(demo_pkg.ANSWER, demo_extra.VALUE)"
    result = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(target)},
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["42", "pure"]
    assert not (target / "demo").exists()  # scripts are not needed: the service starts as python -m


def test_the_summary_names_every_goal_when_no_step_ran(tmp_path):
    text = write_summary(tmp_path, tmp_path)
    for goal in ("fp16/bf16 >= 2x fp32 with TF32 off", "30% of the device's peak", "under 100 ms",
                 "Batching >= 2x", "best tile size", "CUDA graphs", "channels-last", "CUDA-only tests"):
        assert goal in text
    assert text.count("not measured (step not reached)") >= 7


def _loadgen_result(rate: float, completed: int, statuses: dict | None = None) -> dict:
    return {"summary": {"service_images_per_s": rate, "p50_ms": 80.0, "p95_ms": 95.0},
            "service_rounds": [{"completed_in_window": completed, "mean_batch_size": 12.0 if completed else None,
                                "statuses": statuses or {"200": completed}}]}


def test_the_summary_survives_a_step_that_finished_no_request(tmp_path):
    (tmp_path / "batched_c1.json").write_text(json.dumps(_loadgen_result(0.0, 0)))
    (tmp_path / "batched_c32.json").write_text(json.dumps(_loadgen_result(40.0, 320, {"200": 320, "503": 7})))
    (tmp_path / "bundled_c32.json").write_text(json.dumps(_loadgen_result(40.0, 320)))
    (tmp_path / "bundled_graphs_c32.json").write_text(json.dumps(_loadgen_result(50.0, 400)))
    (tmp_path / "steps.jsonl").write_text('{"step": "tiling", "status": "timed out after 60s", "seconds": 60}\n')
    text = write_summary(tmp_path, tmp_path)
    assert "**missed**: no request finished at 1 client" in text
    assert "(non-200 responses: {'503': 7})" in text  # refusals would make a throughput figure meaningless
    assert "CUDA graphs: 50.00 vs eager 40.00 images/s = 1.25x" in text
    assert "not measured (tiling: timed out after 60s)" in text


def test_the_summary_judges_half_precision_against_fp32_with_tf32_off(tmp_path):
    def row(precision, rate, psnr=None):
        entry = {"model": "released deblurring", "precision": precision, "batch_size": 4, "megapixels_per_s": rate,
                 "fraction_of_peak": 0.2, "peak_unit": precision}
        return {**entry, "psnr_vs_fp32_db": psnr} if psnr else entry
    bench = {"rows": [row("fp32-no-tf32", 10.0), row("fp32", 18.0, 60.0), row("bf16", 25.0, 47.0),
                      row("fp16", 19.0, 52.0)]}
    (tmp_path / "model_bench.json").write_text(json.dumps(bench))
    text = write_summary(tmp_path, tmp_path)
    assert "bf16, batch 4: 2.50x, 47.0 dB, **met**" in text
    assert "fp16, batch 4: 1.90x, 52.0 dB, **missed**" in text
    assert "best 20.0% (released deblurring, fp32-no-tf32, batch 4, against the fp32-no-tf32 peak), **missed**" in text


def test_synthetic_uploads_compress_like_photos_not_like_noise():
    rng = np.random.default_rng(0)
    photo = synthetic_photo((180, 320), rng)
    noise = rng.integers(0, 256, photo.shape, dtype=np.uint8)

    def png_size(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return len(buffer.getvalue())

    assert photo.shape == (180, 320, 3) and photo.dtype == np.uint8
    assert png_size(photo) < 0.6 * png_size(noise)
    assert photo.std() > 20  # not a flat image either


def test_the_summary_reads_every_part_of_a_device_fastpath_report(tmp_path):
    # The keys bench/fastpath_check.py writes on CUDA, which this machine cannot produce.
    report = {"network": "bundled configuration, random weights", "parts": {
        "auto_sizing": {"status": "ok", "precision": "bf16", "tile_size": 1024, "batch_size": 64,
                        "bytes_per_pixel": 700, "free_bytes": 1, "total_bytes": 2, "seconds": 1.0},
        "graphs_vs_eager": {"status": "ok", "tile": 256, "batch": 2, "precision": "fp32", "tf32": False,
                            "graphed_sizes": [1, 2], "failed_captures": [], "max_abs_difference": 0.0,
                            "psnr_db": None, "identical": True},
        "graph_batches": {"status": "ok", "tile": 512, "precision": "bf16", "failed_captures": [8],
                          "memory_reserved_bytes": 3 * 2**30,
                          "sizes": {"1": {"capture_s": 0.5, "replay_ms": 2.0, "eager_ms": 6.0,
                                          "eager_over_replay": 3.0}}},
        "compiled_shape": {"status": "error", "error": "BackendCompilerFailed: no compiler"},
    }}
    (tmp_path / "fastpath.json").write_text(json.dumps(report))
    text = write_summary(tmp_path, tmp_path)
    assert "tile 1024, batch 64 (700 bytes per pixel, bf16)" in text
    assert "max difference 0.00e+00, identical; failed captures none" in text
    assert "batch 1: eager 6.0 ms, replay 2.0 ms (3.0x), capture 0.5 s; reserved 3.00 GiB; failed captures [8]" in text
    assert "compiled_shape (bundled configuration, random weights): error: BackendCompilerFailed" in text


def test_the_gpu_script_skips_what_its_budget_cannot_hold_and_still_reports_every_goal(tmp_path):
    # A budget too small for any step: the time plan must skip them all, say why, and still write
    # the summary, as it would on a device whose call is about to run out.
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "BUDGET": "25", "OUT": str(out), "PY": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "| import | ok |" in summary
    assert "| model_bench | skipped: " in summary and "| tiling | skipped: " in summary
    assert "Batching >= 2x images/s at 32 clients vs 1 (512x512, released deblurring): not measured (batched_c1: " \
           "skipped: " in summary
    assert sorted(path.name for path in out.iterdir()) == ["log.txt", "logs.tar.gz", "results.json", "summary.md"]


def test_the_training_script_grows_the_bundled_weights_when_given_an_architecture(tmp_path):
    # What the next GPU session is to run (ARCH="16 16 4 2", PATCH and ATTENTION_PATCH;
    # models/MODEL_CARD.md), here on the CPU for one step: a wider network trained from scratch
    # would throw the bundled weights away.
    from models import MPRNetConfig, load_model

    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(synthetic_photo((176, 176), rng)).save(data / f"{index}.png")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DATA": str(data), "PY": sys.executable, "TASKS": "deblurring",
           "ARCH": "16 16 4 2", "MINUTES": "0.01", "WORKERS": "0", "TRAIN_PRECISION": "", "PATCH": "96",
           "ATTENTION_PATCH": "64"}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train.sh")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = torch.load(out / "deblurring" / "last.pt", map_location="cpu", weights_only=True)
    assert MPRNetConfig(**run["config"]) == MPRNetConfig(n_feat=16, scale_unetfeats=16, scale_orsnetfeats=4,
                                                         num_cab=2)
    grown = MPRNetConfig(**run["config"]).build().eval()
    grown.load_state_dict(run["model"])
    assert (run["meta"]["patch"], run["meta"]["attention_patch"]) == (96, 64)
    grown.pool_attention_locally(64)
    bundled = load_model(ROOT / "models" / "weights" / "deblurring.safetensors").eval()
    bundled.pool_attention_locally(64)
    x = torch.rand(1, 3, 128, 128)  # larger than the windows, or local pooling would be global
    with torch.no_grad():
        # One warm-up step (lr 1e-3 / 200) from the bundled deblurrer, not from random weights,
        # which are off by more than 1.
        assert (grown(x)[0] - bundled(x)[0]).abs().max() < 0.01
