"""Reading and writing MPRNet checkpoints without trusting them.

The architecture is inferred from tensor shapes, so any MPRNet checkpoint of any width or depth
loads with no config file. Files are never unpickled as code: ``.pth`` goes through
``torch.load(weights_only=True)`` and ``.safetensors`` holds plain tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .mprnet import MPRNet

__all__ = ["ATTENTION_PATCH_NOTE", "MAX_ATTENTION_PATCH", "attention_patch", "read_notes",
           "CheckpointError", "LoadedCheckpoint", "MPRNetConfig", "infer_config", "load_checkpoint", "load_model",
           "load_state_dict", "save_safetensors", "sha256_file", "RELEASED_CONFIGS"]


# The note (safetensors metadata key, training-checkpoint meta key) naming the crop size whose
# regions the channel attention pools over: MPRNet.pool_attention_locally.
ATTENTION_PATCH_NOTE = "attention_patch"
# Training crops are 64-192 px and the pooling region must be smaller than the crop; far larger
# values come from a damaged or hostile file, not from a run.
MAX_ATTENTION_PATCH = 1024

# What load_state_dict copies into the fp32 network without changing the values' meaning (the
# bundled files are fp32, `--half` exports fp16, bf16 training casts); an integer, bool or complex
# tensor would be cast silently into different weights.
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A file that is not a loadable MPRNet checkpoint; the message says why."""


@dataclass(frozen=True)
class MPRNetConfig:
    """The constructor keywords of :class:`MPRNet`."""

    in_c: int = 3
    out_c: int = 3
    n_feat: int = 40
    scale_unetfeats: int = 20
    scale_orsnetfeats: int = 16
    num_cab: int = 8
    kernel_size: int = 3
    reduction: int = 4
    bias: bool = False

    def as_kwargs(self) -> dict:
        return asdict(self)

    def build(self) -> MPRNet:
        return MPRNet(**self.as_kwargs())


# The paper's released models (facts from the reference's training configs).
RELEASED_CONFIGS = {
    "deblurring": MPRNetConfig(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
    "denoising": MPRNetConfig(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32),
    "deraining": MPRNetConfig(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16),
}

_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel and torch.compile wrappers


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# torch.save writes a zip archive; before PyTorch 1.6, and with _use_new_zipfile_serialization=False,
# a pickle (its PROTO opcode first).
_TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")


def _read_file(path: Path) -> tuple[Mapping, str, dict[str, str]]:
    """The file's content, the sha256 of the very bytes it was parsed from (so the digest
    describes the weights loaded even if the file is replaced meanwhile) and its notes: what it
    says about the weights beside the tensors (a safetensors header's metadata, or the ``meta`` of
    this project's training checkpoints)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load
        try:
            data = path.read_bytes()
            tensors = load(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        return tensors, hashlib.sha256(data).hexdigest(), _safetensors_notes(path, data)
    try:
        data = path.read_bytes()
        if not data.startswith(_TORCH_SAVE_STARTS):
            # Otherwise torch.load's complaint about a photo or a text file reads as if it held code.
            raise CheckpointError(f"{path}: not a checkpoint: neither safetensors (by its name) nor a file "
                                  f"torch.save writes (a zip archive or a pickle)")
        if data.startswith(_TORCH_SAVE_STARTS[0]):
            _check_stored_zip(path, data)
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickle that names code; say so rather than show the traceback.
        raise CheckpointError(
            f"{path}: refused: the file is not a plain tensor checkpoint (it would need to run code "
            f"to load: {_first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, AssertionError) as exc:
        # The last five come from damaged pickles: torch's unpickler looks up memo entries, stack
        # items and storages that were never made, or uses an object of the wrong kind where it
        # expects another.
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    meta = content.get("meta") if isinstance(content, Mapping) else None
    notes = {str(k): str(v) for k, v in meta.items() if v is not None} if isinstance(meta, Mapping) else {}
    return content, hashlib.sha256(data).hexdigest(), notes


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line: a damaged pickle can make torch name a storage by a whole
    printed tensor."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _check_stored_zip(path: Path, data: bytes) -> None:
    """torch.save stores its zip entries uncompressed, so what torch.load allocates is bounded by
    the file's size; a compressed entry would be inflated to whatever it declares (a 2 MB file can
    ask for 2 GB), past any limit put on the download. The directory is read without inflating."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
    compressed = [entry for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"{path}: refused: {len(compressed)} of its {len(entries)} zip entries are compressed "
                              f"(to be inflated to {sum(entry.file_size for entry in compressed)} bytes), which "
                              f"torch.save never does")
    declared = sum(entry.file_size for entry in entries)
    if declared > len(data):
        raise CheckpointError(f"{path}: refused: its zip entries declare {declared} bytes, more than the "
                              f"{len(data)} bytes of the file")


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    content, digest, _ = _read_file(path)
    return _tensors(path, content), digest


def _tensors(path: Path, content) -> dict[str, torch.Tensor]:
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, found {type(content).__name__}")
    for wrapper_key in ("state_dict", "model", "params"):
        if wrapper_key in content and isinstance(content[wrapper_key], Mapping):
            content = content[wrapper_key]
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in content.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} is {value.dtype}, not floating-point weights")
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        state[name] = value
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return state


def _safetensors_notes(path: Path, head: bytes) -> dict[str, str]:
    """The metadata of a safetensors header, from the file's first bytes (8 of length, then JSON)."""
    try:
        length = struct.unpack("<Q", head[:8])[0]
        if len(head) < 8 + length:
            raise ValueError(f"a header of {length} bytes runs past the end of the file")
        header = json.loads(head[8:8 + length])
        notes = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
        if not isinstance(notes, dict):
            raise ValueError("the header or its __metadata__ is not a mapping")
    except (struct.error, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors header ({exc})") from None
    return {str(k): str(v) for k, v in notes.items()}


def read_notes(path: str | os.PathLike) -> dict[str, str]:
    """What a checkpoint file says about its weights beside the tensors (see ``_read_file``); of a
    safetensors file only the header is read, not its tensors."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return _read_file(path)[2]
    try:
        with path.open("rb") as handle:
            start = handle.read(8)
            # Never read more than the file holds, whatever length its first bytes claim.
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
            head = start + handle.read(min(length, path.stat().st_size))
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return _safetensors_notes(path, head)


def attention_patch(notes: Mapping[str, str]) -> int | None:
    """The crop size whose regions the weights' channel attention pools over
    (:meth:`MPRNet.pool_attention_locally`); None: the whole input, as the paper's."""
    value = notes.get(ATTENTION_PATCH_NOTE)
    if value in (None, "", "None", "0"):
        return None
    text = str(value)
    # str.isdigit takes "²" and other digits int() rejects; the length keeps int() off digit strings
    # long enough to cost time (or to exceed its own limit).
    patch = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else -1
    if patch <= 0 or patch % 8 or patch > MAX_ATTENTION_PATCH:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise CheckpointError(f"{ATTENTION_PATCH_NOTE} must be a positive multiple of 8 of at most "
                              f"{MAX_ATTENTION_PATCH}, or 0, got {shown!r}")
    return patch


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's tensors from any supported checkpoint layout, prefixes removed."""
    return _read_state(Path(path))[0]


def _conv_shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, int, int, int]:
    """The shape of the convolution weight ``key``; the widths are read off its dimensions."""
    if key not in state:
        raise CheckpointError(f"not an MPRNet checkpoint: missing key {key!r}")
    shape = tuple(state[key].shape)
    if len(shape) != 4:
        raise CheckpointError(f"not an MPRNet checkpoint: {key!r} has shape {list(shape)}, not a convolution "
                              f"weight's 4 dimensions")
    return shape


def infer_config(state: Mapping[str, torch.Tensor]) -> MPRNetConfig:
    """Constructor keywords of the MPRNet that produced ``state``, from tensor shapes alone."""
    n_feat, in_c, kernel_size, _ = _conv_shape(state, "shallow_feat1.0.weight")
    out_c = _conv_shape(state, "tail.weight")[0]
    scale_unetfeats = _conv_shape(state, "stage1_encoder.down12.down.1.weight")[0] - n_feat
    scale_orsnetfeats = _conv_shape(state, "concat23.weight")[0] - n_feat
    num_cab = 0
    while f"stage3_orsnet.orb1.body.{num_cab}.CA.conv_du.0.weight" in state:
        num_cab += 1
    squeezed = _conv_shape(state, "shallow_feat1.1.CA.conv_du.0.weight")[0]
    bias = "shallow_feat1.0.bias" in state
    if min(n_feat, scale_unetfeats + 1, scale_orsnetfeats + 1, num_cab, squeezed) <= 0:
        raise CheckpointError("not an MPRNet checkpoint: the tensor shapes give no valid widths")
    # Several reductions can give the same bottleneck width at level 1; take the one that also
    # fits the wider levels, which the full shape check below confirms.
    wider_key = "stage1_encoder.encoder_level3.0.CA.conv_du.0.weight"
    candidates = [r for r in range(1, n_feat + 1) if n_feat // r == squeezed]
    if wider_key in state:
        wider = _conv_shape(state, wider_key)[0]
        fitting = [r for r in candidates if (n_feat + 2 * scale_unetfeats) // r == wider]
        candidates = fitting or candidates
    if not candidates:
        raise CheckpointError(f"not an MPRNet checkpoint: no channel-attention reduction maps {n_feat} "
                              f"channels to {squeezed}")
    return MPRNetConfig(in_c=in_c, out_c=out_c, n_feat=n_feat, scale_unetfeats=scale_unetfeats,
                        scale_orsnetfeats=scale_orsnetfeats, num_cab=num_cab, kernel_size=kernel_size,
                        reduction=candidates[0], bias=bias)


def _check_runnable(config: MPRNetConfig) -> None:
    """An MPRNet the service can run: it restores RGB images, and 'same' padding (half the kernel)
    keeps the feature maps' size only for odd kernels, so an even one fails at the first join."""
    if (config.in_c, config.out_c) != (3, 3):
        raise CheckpointError(f"the weights take {config.in_c} and give {config.out_c} colour channels; the service "
                              f"restores RGB images (3 and 3)")
    if config.kernel_size % 2 == 0:
        raise CheckpointError(f"the convolutions' kernel size is {config.kernel_size}; MPRNet needs an odd one")


def _check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """A NaN or an infinity in any weight spreads through the network: every restore would come back
    black, while the service reports itself ready."""
    for key, value in state.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"tensor {key!r} holds NaN or infinite values")


def _check_fits(model: MPRNet, state: Mapping[str, torch.Tensor], config: MPRNetConfig) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    # Names from the file, shown quoted when they hold a line break or other control character.
    unexpected = [k if k.isprintable() else repr(k) for k in state if k not in expected]
    wrong = [f"{k}: {list(state[k].shape)} (expected {list(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"does not fit an MPRNet ({config}): " + "; ".join(problems))


@dataclass(frozen=True)
class LoadedCheckpoint:
    """An eval-mode MPRNet (CPU, fp32) and what its file said about it."""

    model: MPRNet
    config: MPRNetConfig  # inferred from the tensor shapes
    sha256: str           # of the bytes the weights were read from
    path: Path


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Load any MPRNet checkpoint file, its architecture inferred from shapes.

    Reads the released files (``{"state_dict", "epoch", "optimizer"}``, with or without
    ``module.`` prefixes), bare state_dicts and ``.safetensors``. Raises :class:`CheckpointError`
    with one line saying what is wrong for anything else.
    """
    path = Path(path)
    try:
        content, digest, notes = _read_file(path)
        state = _tensors(path, content)
        patch = attention_patch(notes)
        config = infer_config(state)
        _check_runnable(config)
        with torch.device("meta"):
            skeleton = config.build()
        _check_fits(skeleton, state, config)
        # After the shape check, so that only tensors of the network's own sizes are scanned.
        _check_finite(state)
    except CheckpointError as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    model = config.build()
    model.load_state_dict(state)
    model.pool_attention_locally(patch)
    return LoadedCheckpoint(model.eval().requires_grad_(False), config, digest, path)


def load_model(path: str | os.PathLike) -> MPRNet:
    """Just the network of :func:`load_checkpoint`."""
    return load_checkpoint(path).model


def save_safetensors(model: MPRNet, path: str | os.PathLike, half: bool = False,
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write the weights as safetensors (optionally fp16 storage); returns the file's sha256.

    The shared PReLU appears under many keys; each gets its own copy, since safetensors stores no
    aliases, so the file reads back with the same keys as the released checkpoints.
    """
    from safetensors.torch import save
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).clone().contiguous() for k, v in model.state_dict().items()}
    Path(path).write_bytes(_sorted_header(save(tensors, metadata=dict(metadata or {}))))
    return sha256_file(path)


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted. The library writes the
    metadata keys in a random order (a hash map), so the same weights would get a new sha256
    on every export; the tensor offsets count from the end of the header, so they stay valid."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(header)) + header + data[8 + length:]
