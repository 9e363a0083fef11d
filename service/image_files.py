"""Which files on disk are images to restore: shared by the CLI (local and ``--url``) and the client
library, so both take the same inputs. Standard library only, so importing it costs nothing."""

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
