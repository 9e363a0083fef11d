"""Which files on disk are images to restore, and where their results go: shared by the CLI (local
and ``--url``) and the client library, so both take the same inputs and write the same names.
Standard library only, so importing it costs nothing."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def find_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files as given and the images inside folders (recursively, sorted by path), in input order;
    plus one sentence per input that yielded nothing (``"<path>: no images in this folder"``)."""
    files: list[Path] = []
    problems: list[str] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{entry}: no images in this folder")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            problems.append(f"{entry}: no such file or folder")
    return files, problems


def result_targets(files: Iterable[Path], out_dir: Path) -> list[tuple[Path, Path, str | None]]:
    """Each file with where its restored PNG goes (``out_dir/<stem>.png``), and why it must be
    skipped, or None: its result would overwrite an input (the output folder is the input
    folder, say, where a restored ``photo.png`` would replace the photo itself), or an earlier
    file already claimed the same name."""
    files = list(files)
    inputs = {path.resolve(): path for path in files}
    claimed: dict[Path, Path] = {}
    planned = []
    for path in files:
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
