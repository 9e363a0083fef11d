"""The generated sections of ``models/MODEL_CARD.md``.

Tables that scripts produce (the bundled files, the evaluation) sit between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, so regenerating one never touches the
prose around it.
"""

from __future__ import annotations

import re
from pathlib import Path

import models

# The card ships beside the weights it describes, in the package serving installs.
CARD = Path(models.__file__).resolve().parent / "MODEL_CARD.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(name: str, text: str, card: Path = CARD) -> None:
    start, end = markers(name)
    content = card.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{card} has no {start} ... {end} section to replace")
    card.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))


def section(name: str, card: Path = CARD) -> str:
    """The text between a section's markers, without them."""
    start, end = markers(name)
    content = card.read_text()
    return content[content.index(start) + len(start):content.index(end)].strip("\n")
