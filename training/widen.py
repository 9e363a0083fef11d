"""Grow trained MPRNet weights into a wider or deeper MPRNet that computes the same function.

A wider network trained from scratch starts far below the bundled weights and needs GPU hours to
catch up; grown from them, it starts exactly where they are. The growth is the zero-sided kind
(Net2Net's aim, not its method of copying channels):

* every tensor keeps the trained values in the old channels;
* a new output channel (row) of a convolution gets the wide network's fresh initialisation, so it
  computes something and receives gradient from the start;
* a new input channel (column) feeding an old output gets zero, so no old channel sees the new
  ones until training moves those zeros;
* a CAB added to an original-resolution block gets a zero last convolution: its body outputs
  zero, the channel attention scales zero to zero, and the residual makes the block the identity.

Every addition in MPRNet is between tensors of the same channel space and every channel-wise
concatenation (the two ``concat`` convolutions) is handled by index, so the old channels compute
what they computed before, up to float summation order.

The zeros grow only as fast as the optimiser moves them: in 2,000 CPU steps of Adam at lr 1e-4
they reached about 2 % of the old weights' size and the grown network tracked its narrow control
(models/TRAINING_LOG.md, fourteenth session). Grow for runs with the learning rate and steps to use
the room.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models import MPRNetConfig

__all__ = ["widen"]

# Convolutions whose input is two n_feat-wide feature maps concatenated along channels: their old
# input channels sit at [0, n) and [N, N + n) of the wide input, not at its front.
_CONCATENATED_INPUTS = ("concat12.weight", "concat23.weight")
_ORB_TAIL_PREFIXES = tuple(f"stage3_orsnet.orb{i}.body." for i in (1, 2, 3))


def _check_growable(narrow: MPRNetConfig, wide: MPRNetConfig) -> None:
    fixed = ("in_c", "out_c", "kernel_size", "reduction", "bias")
    changed = [name for name in fixed if getattr(narrow, name) != getattr(wide, name)]
    if changed:
        raise ValueError(f"only widths and depth can grow; these differ: {', '.join(changed)}")
    grown = ("n_feat", "scale_unetfeats", "scale_orsnetfeats", "num_cab")
    shrunk = [name for name in grown if getattr(wide, name) < getattr(narrow, name)]
    if shrunk:
        raise ValueError(f"a network can only grow; these are smaller: {', '.join(shrunk)}")


def _wide_key(key: str, narrow: MPRNetConfig, wide: MPRNetConfig) -> str:
    """Where a narrow tensor lives in the wide network: each ORB's closing convolution follows its
    CABs, so added CABs push its index in ``body`` from ``num_cab`` to the wide ``num_cab``."""
    for prefix in _ORB_TAIL_PREFIXES:
        if key == f"{prefix}{narrow.num_cab}.weight" or key == f"{prefix}{narrow.num_cab}.bias":
            return f"{prefix}{wide.num_cab}.{key.rsplit('.', 1)[1]}"
    return key


def _old_inputs(key: str, narrow_inputs: int, narrow: MPRNetConfig, wide: MPRNetConfig) -> torch.Tensor:
    """Where a tensor's old input channels sit in the wide one: at the front, except for the two
    concatenating convolutions, whose halves each grew."""
    if key in _CONCATENATED_INPUTS:
        first = torch.arange(narrow.n_feat)
        return torch.cat((first, first + wide.n_feat))
    return torch.arange(narrow_inputs)


def _place(old: torch.Tensor, fresh: torch.Tensor, key: str, narrow: MPRNetConfig,
           wide: MPRNetConfig) -> torch.Tensor:
    if old.shape == fresh.shape and key not in _CONCATENATED_INPUTS:
        return old.clone()
    grown = fresh.clone()
    rows = torch.arange(old.shape[0])  # output channels: the old ones always come first
    if old.dim() == 1:  # biases
        grown[rows] = old
        return grown
    cols = _old_inputs(key, old.shape[1], narrow, wide)
    grown[rows] = 0  # old outputs must not read the new input channels
    grown[rows[:, None], cols[None, :]] = old
    return grown


def widen(state: Mapping[str, torch.Tensor], narrow: MPRNetConfig, wide: MPRNetConfig,
          seed: int = 0) -> dict[str, torch.Tensor]:
    """The state_dict of a ``wide`` MPRNet computing what ``state`` (a ``narrow`` one) computes.

    ``seed`` fixes the fresh initialisation of the new channels.
    """
    _check_growable(narrow, wide)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = wide.build().state_dict()
    # One PReLU serves the whole network and is listed under every block that uses it; an added
    # CAB's listing must carry the trained slope too, or loading would overwrite it with a fresh one.
    aliases: dict[int, list[str]] = {}
    for key, value in fresh.items():
        aliases.setdefault(value.data_ptr(), []).append(key)
    grown = {}
    placed = set()
    for key, old in state.items():
        target = _wide_key(key, narrow, wide)
        if target not in fresh:
            raise ValueError(f"{key!r} has no place in a {wide.as_kwargs()} network")
        grown[target] = _place(old.to(fresh[target].dtype), fresh[target], key, narrow, wide)
        placed.add(target)
    for key, value in fresh.items():
        if key in placed:
            continue
        if not _is_added_cab(key, narrow, wide):
            raise ValueError(f"{key!r} of the {wide.as_kwargs()} network has no counterpart in the narrow one")
        shared = next((k for k in aliases[value.data_ptr()] if k in placed), None)
        if shared is not None:
            grown[key] = grown[shared].clone()
        elif key.endswith((".body.2.weight", ".body.2.bias")):
            grown[key] = torch.zeros_like(value)  # the CAB's last convolution: the block passes its input on
        else:
            grown[key] = value
    return {key: grown[key] for key in fresh}


def _is_added_cab(key: str, narrow: MPRNetConfig, wide: MPRNetConfig) -> bool:
    for prefix in _ORB_TAIL_PREFIXES:
        if key.startswith(prefix):
            index = int(key[len(prefix):].split(".", 1)[0])
            return narrow.num_cab <= index < wide.num_cab
    return False
