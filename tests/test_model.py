"""MPRNet against the reference's golden data, and checkpoint loading in every format."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from models import (
    RELEASED_CONFIGS,
    CheckpointError,
    MPRNet,
    MPRNetConfig,
    load_checkpoint,
    load_model,
    save_safetensors,
    sha256_file,
)
from models.mprnet import MPRNet as ContractMPRNet

SMALL_CONFIGS = [
    MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, reduction=2),
    MPRNetConfig(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=2, reduction=4, bias=True),
    MPRNetConfig(n_feat=12, scale_unetfeats=6, scale_orsnetfeats=0, num_cab=3, kernel_size=5, reduction=3),
]


@pytest.fixture(scope="module")
def official_checkpoint(conformance_dir):
    return conformance_dir / "deraining_random_official_format.pth"


@pytest.fixture(scope="module")
def golden(conformance_dir):
    return np.load(conformance_dir / "deraining_random_golden.npz")


def test_contract_names():
    assert ContractMPRNet is MPRNet
    from models import load_model as contract_load_model
    assert callable(contract_load_model)


@pytest.mark.parametrize("task", sorted(RELEASED_CONFIGS))
def test_state_dict_matches_the_released_manifest(conformance_dir, task):
    manifest = json.loads((conformance_dir / "official_state_dict_manifest.json").read_text())[task]
    with torch.device("meta"):
        model = RELEASED_CONFIGS[task].build()
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == manifest["keys"]
    unique = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in unique.values()) == manifest["unique_parameters"]


def test_all_three_stages_match_the_reference(official_checkpoint, golden):
    model = load_model(official_checkpoint)
    with torch.inference_mode():
        stages = model(torch.from_numpy(golden["input"]))
    for output, name in zip(stages, ("stage3", "stage2", "stage1")):
        np.testing.assert_allclose(output.numpy(), golden[name], atol=1e-5, rtol=0, err_msg=name)


def test_forward_returns_three_images_of_the_input_size():
    model = MPRNet(**SMALL_CONFIGS[0].as_kwargs()).eval()
    with torch.inference_mode():
        stages = model(torch.rand(2, 3, 24, 40))
    assert [tuple(s.shape) for s in stages] == [(2, 3, 24, 40)] * 3


def test_forward_refuses_sizes_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        MPRNet(**SMALL_CONFIGS[0].as_kwargs())(torch.rand(1, 3, 20, 24))


@pytest.mark.parametrize("task", sorted(RELEASED_CONFIGS))
def test_architecture_is_inferred_for_released_configs(tmp_path, task):
    torch.manual_seed(0)
    model = RELEASED_CONFIGS[task].build()
    path = tmp_path / "model.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.config == RELEASED_CONFIGS[task]
    loaded = checkpoint.model
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize("layout", ["released", "bare", "safetensors", "safetensors-fp16"])
def test_every_format_loads_and_gives_the_same_output(tmp_path, config, layout):
    torch.manual_seed(1)
    model = config.build().eval()
    if layout == "released":
        path = tmp_path / "m.pth"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                    "optimizer": {}}, path)
    elif layout == "bare":
        path = tmp_path / "m.pth"
        torch.save(model.state_dict(), path)
    else:
        path = tmp_path / "m.safetensors"
        save_safetensors(model, path, half=layout.endswith("fp16"))
    checkpoint = load_checkpoint(path)
    assert checkpoint.config == config
    assert checkpoint.sha256 == sha256_file(path) and checkpoint.path == path
    assert not hasattr(checkpoint.model, "config")
    loaded = checkpoint.model
    image = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        expected, got = model(image)[0], loaded(image)[0]
    tolerance = 2e-2 if layout.endswith("fp16") else 1e-6
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


def test_released_checkpoint_loads_with_its_module_prefix(official_checkpoint):
    assert load_checkpoint(official_checkpoint).config == RELEASED_CONFIGS["deraining"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _RunsCode.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _RunsCode()}, handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()
    # The same payload inside torch's zip format.
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"state_dict": _RunsCode()}, zipped)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(zipped)
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = SMALL_CONFIGS[0].build().state_dict()
    del state["stage3_orsnet.conv_dec3.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert "missing keys: stage3_orsnet.conv_dec3.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "\n" not in message


def test_a_shape_that_fits_no_mprnet_is_named(tmp_path):
    state = SMALL_CONFIGS[0].build().state_dict()
    state["tail.weight"] = torch.zeros(3, 10, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"wrong shapes: tail\.weight: \[3, 10, 3, 3\]"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_garbage_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_model(path)
    bad_safetensors = tmp_path / "garbage.safetensors"
    bad_safetensors.write_bytes(content)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(bad_safetensors)


def test_other_networks_are_not_taken_for_mprnet(tmp_path):
    path = tmp_path / "resnet_like.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="missing key 'shallow_feat1.0.weight'"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="a folder, not a checkpoint file"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(64), b"plain text, no weights"])
def test_a_file_that_is_no_checkpoint_is_not_called_one_that_runs_code(tmp_path, content):
    path = tmp_path / "photo.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    assert "not a checkpoint" in str(refused.value)
    assert "run code" not in str(refused.value) and "weights_only" not in str(refused.value)


# --- channel attention pooled over windows (MPRNet.pool_attention_locally) ---

def _brute_window_mean(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The mean over a rows x cols window centred on each position (both odd), cut off at the borders."""
    height, width = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(height):
        for j in range(width):
            window = x[..., max(i - rows // 2, 0):i + rows // 2 + 1, max(j - cols // 2, 0):j + cols // 2 + 1]
            out[..., i, j] = window.mean((-2, -1))
    return out


def test_small_windows_are_exact_centred_means_cut_off_at_the_borders():
    from models.mprnet import grid_window_means
    x = torch.rand(2, 3, 13, 21)
    means, cell = grid_window_means(x, 5, 6)
    assert cell == 1
    torch.testing.assert_close(means, _brute_window_mean(x, 5, 7), rtol=0, atol=1e-6)  # 6 made odd


def test_large_windows_are_means_on_a_grid_spread_smoothly():
    from models.mprnet import grid_window_means, spread
    x = torch.rand(1, 2, 100, 120)
    x[..., :, :60] *= 0.2  # a dark half: the windows' means change by 0.4 across the middle
    means, cell = grid_window_means(x, 48, 64)
    assert cell == 6 and means.shape[-2:] == (17, 20)  # 100 and 120 px in 6 px cells, the last partial
    spread_means = spread(means, cell, 100, 120)
    assert spread_means.shape[-2:] == (100, 120)
    exact = _brute_window_mean(x, 54, 66)  # 9 and 11 cells of 6 px
    assert (spread_means - exact).abs().max() < 0.04
    flat = torch.full((1, 1, 50, 70), 0.25)
    torch.testing.assert_close(spread(*grid_window_means(flat, 32, 32), 50, 70), flat)


def test_window_means_of_bf16_are_as_exact_as_bf16_itself():
    from models.mprnet import grid_window_means
    x = torch.rand(1, 4, 256, 256) + 1.0  # bf16 running sums would round to steps of 0.5 and more
    means, _ = grid_window_means(x.bfloat16(), 8, 8)
    exact, _ = grid_window_means(x, 8, 8)
    assert means.dtype == torch.bfloat16
    assert (means.float() - exact).abs().max() < 0.02


def test_local_pooling_changes_what_differs_across_the_frame_and_can_be_undone():
    torch.manual_seed(0)
    model = MPRNet(**SMALL_CONFIGS[0].as_kwargs()).eval()
    image = torch.rand(1, 3, 64, 48)
    image[..., :, :24] *= 0.1  # a dark side and a bright one: windows there see different means
    with torch.no_grad():
        paper = model(image)[0]
        model.pool_attention_locally(32)
        assert model.attention_patch == 32
        local = model(image)[0]
        model.pool_attention_locally(None)
        assert model.attention_patch is None
        torch.testing.assert_close(model(image)[0], paper, rtol=0, atol=0)
    assert (local - paper).abs().max() > 1e-4


def test_each_attention_pools_the_region_the_patch_gave_it():
    from models.mprnet import ChannelAttention
    model = MPRNet(**SMALL_CONFIGS[0].as_kwargs())
    model.pool_attention_locally(64)
    windows = {name: layer.window for name, layer in model.named_modules() if isinstance(layer, ChannelAttention)}
    assert windows["shallow_feat1.1.CA"] == (32, 32)                     # stage 1: a quadrant
    assert windows["stage1_encoder.encoder_level3.0.CA"] == (8, 8)       # ... down-sampled twice
    assert windows["stage1_decoder.decoder_level1.0.CA"] == (32, 64)     # quadrants joined in halves
    assert windows["shallow_feat2.1.CA"] == (32, 64)                     # stage 2: a half
    assert windows["shallow_feat3.1.CA"] == (64, 64)                     # stage 3: all of it
    with pytest.raises(ValueError, match="multiple of 8"):
        model.pool_attention_locally(60)


@pytest.mark.parametrize("value", ["128", None])
def test_checkpoints_carry_how_their_attention_pools(tmp_path, value):
    model = MPRNet(**SMALL_CONFIGS[0].as_kwargs())
    path = tmp_path / "weights.safetensors"
    save_safetensors(model, path, metadata={"attention_patch": value} if value else None)
    loaded = load_checkpoint(path).model
    assert loaded.attention_patch == (int(value) if value else None)
    assert (loaded.shallow_feat3[1].CA.window is not None) == bool(value)


def test_a_checkpoint_naming_an_impossible_pooling_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_safetensors(MPRNet(**SMALL_CONFIGS[0].as_kwargs()), path, metadata={"attention_patch": "100"})
    with pytest.raises(CheckpointError, match="attention_patch must be a positive multiple of 8"):
        load_checkpoint(path)


def test_notes_are_read_from_the_header_alone(tmp_path):
    from models.checkpoint import read_notes
    path = tmp_path / "weights.safetensors"
    save_safetensors(MPRNet(**SMALL_CONFIGS[0].as_kwargs()), path, metadata={"attention_patch": "64", "task": "x"})
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    # Tensors cut off: loading the weights fails, their notes are still there to read.
    (tmp_path / "cut.safetensors").write_bytes(data[:header_end + 10])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.safetensors")
    assert read_notes(tmp_path / "cut.safetensors") == read_notes(path) == {"attention_patch": "64", "task": "x"}


@pytest.mark.parametrize("head", [b"", b"\x05\x00", (10**12).to_bytes(8, "little") + b"{}",
                                  (3).to_bytes(8, "little") + b"abc", (2).to_bytes(8, "little") + b"[]"],
                         ids=["empty", "short", "past-the-end", "not-json", "not-a-mapping"])
def test_notes_of_a_broken_header_are_refused(tmp_path, head):
    from models.checkpoint import read_notes
    path = tmp_path / "weights.safetensors"
    path.write_bytes(head)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_notes(path)
