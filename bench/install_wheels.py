"""Unpack the wheels of ``.whl/`` that fit this interpreter into a folder for ``PYTHONPATH``.

The device image has torch but not the web stack, cannot reach an index, and may not have pip
(or a pip that refuses ``--target`` next to a system site); a wheel is a zip archive laid out as
its files are installed, so unpacking the right ones needs only the standard library. ``.whl/``
holds one wheel per package for every Python version a device may have (bench/gpu_wheels.sh);
the binary ones are chosen by their ``cpXY`` tag.

    python3 -m bench.install_wheels .whl /tmp/site && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path


def fits_this_interpreter(wheel: Path) -> bool:
    """Whether the wheel's python and ABI tags (``py3-none``, ``cp312-cp312``, ``cp312-abi3``) fit."""
    python_tags, abi_tag, platform_tag = wheel.stem.split("-")[-3:]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if platform_tag != "any" and not platform_tag.startswith(("manylinux", "linux")):
        return False
    for python_tag in python_tags.split("."):
        if abi_tag == "none" and python_tag in ("py3", f"py{sys.version_info.major}{sys.version_info.minor}"):
            return True
        if python_tag == here and abi_tag in (here, "abi3", "none"):
            return True
        if abi_tag == "abi3" and python_tag.startswith("cp3") and int(python_tag[3:]) <= sys.version_info.minor:
            return True
    return False


def unpack(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            head, _, rest = name.partition("/")
            if head.endswith(".data"):
                kind, _, inner = rest.partition("/")
                if kind not in ("purelib", "platlib"):
                    continue  # scripts and headers: the service is started as python -m service
                name = inner
            destination = target / name
            if member.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(member))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    chosen: dict[str, Path] = {}
    for wheel in sorted(args.wheels.glob("*.whl")):
        if fits_this_interpreter(wheel):
            name = wheel.name.split("-")[0].lower()
            if name in chosen:
                raise SystemExit(f"two wheels of {name} fit this interpreter: {chosen[name].name}, {wheel.name}")
            chosen[name] = wheel
    if not chosen:
        raise SystemExit(f"no wheel in {args.wheels} fits Python {sys.version.split()[0]}")
    args.target.mkdir(parents=True, exist_ok=True)
    for wheel in chosen.values():
        unpack(wheel, args.target)
    skipped = sorted({w.name for w in args.wheels.glob("*.whl")} - {w.name for w in chosen.values()})
    print(f"unpacked {len(chosen)} wheels for Python {sys.version.split()[0]} into {args.target}: "
          f"{', '.join(sorted(w.name for w in chosen.values()))}; for other versions: {len(skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
