"""Growing trained weights into a wider, deeper MPRNet (training.widen, train.py's --init)."""

from __future__ import annotations

import pytest
import torch

from models import MPRNetConfig, infer_config, load_model, save_safetensors
from training.train import main
from training.widen import widen

NARROW = MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=2, num_cab=1, reduction=2)
# Every width grows (n_feat too, which moves the concatenated inputs of concat12/23) and every
# ORB gains a CAB.
WIDE = MPRNetConfig(n_feat=10, scale_unetfeats=6, scale_orsnetfeats=4, num_cab=2, reduction=2)


def _trained_like(config: MPRNetConfig, seed: int = 0) -> torch.nn.Module:
    """A network whose weights and PReLU slope differ from a fresh one's, as trained ones do."""
    torch.manual_seed(seed)
    model = config.build()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.5 * torch.randn_like(parameter))
        model.shallow_feat1[1].body[1].weight.fill_(-0.1)  # the one PReLU the whole network shares
    return model.eval()


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(x)


def test_the_grown_network_computes_what_the_narrow_one_did():
    narrow = _trained_like(NARROW)
    wide = WIDE.build()
    wide.load_state_dict(widen(narrow.state_dict(), NARROW, WIDE, seed=3))
    wide.eval()
    x = torch.rand(2, 3, 32, 48)
    for before, after in zip(_outputs(narrow, x), _outputs(wide, x)):  # stage 3, 2 and 1 images
        assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert infer_config(wide.state_dict()) == WIDE


def test_the_new_channels_are_live_and_learn():
    narrow = _trained_like(NARROW)
    grown = widen(narrow.state_dict(), NARROW, WIDE, seed=3)
    # New output channels compute something (fresh initialisation), new inputs to old channels
    # start at zero, and an added CAB starts as the identity through its zero last convolution.
    first = grown["shallow_feat1.0.weight"]
    assert first[NARROW.n_feat:].abs().sum() > 0
    level1 = grown["stage1_encoder.encoder_level1.0.body.0.weight"]
    assert level1[:NARROW.n_feat, NARROW.n_feat:].abs().sum() == 0
    assert grown["stage3_orsnet.orb1.body.1.body.2.weight"].abs().sum() == 0
    assert grown["stage3_orsnet.orb1.body.1.body.0.weight"].abs().sum() > 0

    wide = WIDE.build()
    wide.load_state_dict(grown)
    x, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    sum((out - target).pow(2).mean() for out in wide(x)).backward()
    # A zero column gets gradient at once (its input channel carries the fresh rows' output), so
    # the old channels can start using the new ones in the first step.
    level1_grad = wide.stage1_encoder.encoder_level1[0].body[0].weight.grad
    assert level1_grad[:NARROW.n_feat, NARROW.n_feat:].abs().sum() > 0
    assert wide.stage3_orsnet.orb1.body[1].body[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    (dict(n_feat=6), "smaller: n_feat"),
    (dict(num_cab=0), "smaller: num_cab"),
    (dict(reduction=4), "differ: reduction"),
    (dict(kernel_size=5), "differ: kernel_size"),
])
def test_only_growth_is_allowed(change, message):
    target = MPRNetConfig(**{**WIDE.as_kwargs(), **change})
    with pytest.raises(ValueError, match=message):
        widen(NARROW.build().state_dict(), NARROW, target)


def test_the_trainer_grows_init_weights_to_the_architecture_flags(tmp_path):
    from test_training import _args, _write_photos

    photos = (_write_photos(tmp_path / "train", 3, seed=1), _write_photos(tmp_path / "val", 1, seed=2))
    start = tmp_path / "narrow.safetensors"
    save_safetensors(_trained_like(NARROW), start)
    wide_flags = ["--n-feat", "10", "--scale-unetfeats", "6", "--scale-orsnetfeats", "4", "--num-cab", "2",
                  "--reduction", "2"]
    # Given after _args' own architecture flags, these win (argparse keeps the last).
    arguments = _args("deblurring", photos, tmp_path / "run", "--iters", "1", "--lr", "1e-12", "--init", str(start))
    main(arguments + wide_flags)
    grown = tmp_path / "grown.safetensors"
    main(["--out", str(tmp_path / "run"), "--export", str(grown)])

    x = torch.rand(1, 3, 32, 32)
    before, after = _outputs(load_model(start).eval(), x)[0], _outputs(load_model(grown).eval(), x)[0]
    assert infer_config(load_model(grown).state_dict()) == WIDE
    assert torch.allclose(before, after, atol=1e-4)  # one step at lr 1e-12 moves nothing visible

    with pytest.raises(SystemExit, match="cannot start"):
        main(arguments + ["--n-feat", "6"])
