"""Devices: which one a setting names, and which precisions it runs natively (and why one would
be emulated, slowly, where it is not).

:class:`service.engine.Engine` resolves its device here and refuses an emulated precision unless
allowed (it re-exports these functions); the server asks the same questions before loading anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["cpu_summary", "emulated_precision_problem", "resolve_device", "resolve_devices"]


# CPU instruction sets that run bf16 natively, as /proc/cpuinfo names them: AVX512-BF16 (Cooper
# Lake, Zen 4), AMX-BF16 (Sapphire Rapids), AVX-NE-CONVERT (oneDNN's avx2_vnni_2 path) on x86, and
# FEAT_BF16 on Arm. Without one, oneDNN and ATen emulate bf16 through fp32 conversions: the
# service measured a 256x256 photo at 3.5 s against 0.4 s in fp32 on an AVX2-only CPU.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (x86 "flags", Arm "Features");
    "unknown" and no flags where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "unknown", set()
    fields: dict[str, str] = {}
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
        else:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "unknown")
    # Virtual machines often show a bare "AMD EPYC": the family and model tell a Zen 1 (23, 1), whose
    # AVX2 runs at half width, from a Zen 4 (family 25) with AVX-512.
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name, flags


# The instructions that decide which kernels oneDNN and OpenVINO pick, so what a CPU time depends on.
_SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_summary() -> dict:
    """The CPU's name, core count and which of the speed-deciding instructions it has: what a
    measured CPU time should be quoted with."""
    name, flags = _cpuinfo()
    return {"model": name, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in _SPEED_FLAGS}}


def _cpu_bf16_problem(device: torch.device) -> str | None:
    # torch's own probes first (private, hence looked up rather than assumed), then the kernel's view.
    native = set()
    for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            native.add(flag)
    native |= _cpuinfo()[1] & set(_CPU_BF16_FLAGS)
    if native:
        return None
    # Measured: a training step 6.5x fp32's time on a Zen 1 EPYC (AVX2 alone); a 512x512 restore
    # 87x (118.8 s against 1.36 s) on a Zen 5 with oneDNN and ATen held to AVX2.
    return (f"this CPU has no bf16 instructions ({', '.join(_CPU_BF16_FLAGS)} are all missing), so bf16 would be "
            f"emulated, many times slower than fp32 (6x to over 80x measured)")


def _cuda_bf16_problem(device: torch.device) -> str | None:
    # Tensor cores take bf16 from Ampere (compute capability 8.0) on; older GPUs emulate it.
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 tensor cores "
            f"(8.0 or later needed), so bf16 would be emulated, slower than fp16")


# (precision, device type) -> why that precision would run emulated there, or None when it runs
# natively. A pair not listed needs no check (fp32 everywhere, fp16 on CUDA); a new precision
# adds its rows here.
_NATIVE_PRECISION_CHECKS = {
    ("bf16", "cpu"): _cpu_bf16_problem,
    ("bf16", "cuda"): _cuda_bf16_problem,
}


def emulated_precision_problem(precision: str, device: str | torch.device) -> str | None:
    """Why ``precision`` would be emulated (slowly) on ``device``, or None when it runs natively."""
    device = torch.device(device)
    check = _NATIVE_PRECISION_CHECKS.get((precision, device.type))
    return check(device) if check is not None else None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not one this service runs on: auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this machine has no usable CUDA device")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        # Checked here, as PyTorch's own check is an assertion deep inside whichever call comes first.
        count = torch.cuda.device_count()
        raise ValueError(f"device {device!r} was asked for, but this machine has {count} CUDA device"
                         f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return resolved


def resolve_devices(devices: Sequence[str]) -> list[torch.device]:
    """Each of ``devices`` resolved, repeats kept; ``["all"]`` is every visible CUDA device, else the CPU."""
    if list(devices) == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", index) for index in range(count)] or [torch.device("cpu")]
    return [resolve_device(device) for device in devices]
