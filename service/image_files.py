"""Which files on disk are images to restore, and where their results go: shared by the CLI (local
and ``--url``) and the client library, so both take the same inputs and write the same names.
Standard library only, so importing it costs nothing."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def as_paths(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """One path, or several: a string is one path, never the characters of its name."""
    return [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else list(map(Path, inputs))


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                leave_out: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
    """Files as given and the images inside folders (recursively, sorted by path), in input order;
    plus one sentence per input that yielded nothing (``"<path>: no images in this folder"``).

    ``inputs`` may be one path (not taken for the characters of its name). Inside a folder, images
    under ``leave_out`` are left out when it is a folder below that one: an output folder inside
    the input folder holds the results of an earlier run, not more photos. An output folder
    that is the input folder, or above it, leaves nothing out."""
    outputs = Path(leave_out).resolve() if leave_out is not None else None
    files: list[Path] = []
    problems: list[str] = []
    for entry in as_paths(inputs):
        if entry.is_dir():
            folder = entry.resolve()
            inside = outputs is not None and outputs != folder and outputs.is_relative_to(folder)
            found = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not (inside and p.resolve().is_relative_to(outputs)))
            if not found:
                problems.append(f"{entry}: no images in this folder")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            problems.append(f"{entry}: no such file or folder")
    return files, problems


def result_targets(files: Iterable[Path], out_dir: Path) -> list[tuple[Path, Path, str | None]]:
    """Each file once (a file named twice, or met in two overlapping folders, is restored once),
    with where its restored PNG goes (``out_dir/<stem>.png``) and why it must be skipped, or None:
    its result would overwrite an input (the output folder is the input folder, say, where a
    restored ``photo.png`` would replace the photo itself), or an earlier file already claimed
    the same name."""
    inputs: dict[Path, Path] = {}
    for path in files:
        inputs.setdefault(path.resolve(), path)
    claimed: dict[Path, Path] = {}
    planned = []
    for path in inputs.values():
        target = out_dir / f"{path.stem}.png"
        resolved = target.resolve()
        if resolved in inputs:
            reason = (f"skipped, its result {target} would overwrite the input {inputs[resolved]}; "
                      "choose another output folder")
        elif resolved in claimed:
            reason = f"skipped, its result {target} is already taken by {claimed[resolved]}"
        else:
            claimed[resolved] = path
            reason = None
        planned.append((path, target, reason))
    return planned


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file beside it: a run stopped midway never
    leaves a truncated PNG under the final name, which a rerun or a downstream job would take for
    a finished result, and a failed write leaves nothing at all."""
    # A short random name: the target's own name plus a suffix could pass the 255-byte limit.
    partial = target.parent / f".{secrets.token_hex(8)}.part"
    try:
        with open(partial, "xb") as file:
            file.write(data)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
