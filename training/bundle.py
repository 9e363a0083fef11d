"""Bundle a training run's weights into ``models/weights/``, where serving finds them.

    python -m training.bundle TASK runs/TASK/last.pt [--half] [--average-with FILE SHARE]

The run's weights (averaged with another file's when asked, see :func:`training.train.export`)
become ``models/weights/TASK.safetensors``, its entry in ``manifest.json`` records the file's
sha256, configuration, how much training went into it and what it was averaged with, and the
model card's files table is regenerated from the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from models import infer_config, load_state_dict, sha256_file, weights

from .card import CARD, replace_section
from .train import export, read_run, total_training


def bundle(task: str, checkpoint: str | os.PathLike, half: bool = False, card: Path = CARD,
           average_with: tuple[str | os.PathLike, float] | None = None) -> dict:
    """Export a training run's ``last.pt`` (averaged with ``average_with``'s weights file at its
    share, if given) as the bundled weights of ``task`` and record it in the manifest (with the
    run's iterations and training time) and the model card's files table; returns the manifest
    entry."""
    run = read_run(checkpoint)
    trained = run.get("meta", {}).get("task")
    if trained and trained != task:
        # The file would pass every check (its architecture is the same) and serve a network that
        # undoes the wrong thing.
        raise ValueError(f"{checkpoint} trained {trained}, not {task}: bundle it as {trained}")
    path = weights.bundled_path(task)
    weights.BUNDLED_DIR.mkdir(exist_ok=True)
    tmp = path.with_name(f".{task}.partial.safetensors")
    # Hashed before the export: the file averaged with is usually the bundled one it replaces.
    averaged_with = None if average_with is None else {"sha256": sha256_file(average_with[0]),
                                                       "share": average_with[1]}
    try:
        digest = export(checkpoint, tmp, half=half, average_with=average_with)
        config = infer_config(load_state_dict(tmp)).as_kwargs()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    iterations, seconds = total_training(run)
    entry = {"file": path.name, "sha256": digest, "config": config, "fp16": half,
             "iterations": iterations, "trained_minutes": round(seconds / 60, 1),
             "patch": run["meta"]["patch"], "batch": run["meta"]["batch"],
             "mixture": run["meta"].get("mixture", "classic")}
    if averaged_with is not None:
        entry["averaged_with"] = averaged_with
    listed = weights.manifest()
    listed[task] = entry
    (weights.BUNDLED_DIR / "manifest.json").write_text(json.dumps(dict(sorted(listed.items())), indent=2) + "\n")
    replace_section("files", files_table(listed), card)
    return entry


def files_table(listed: dict) -> str:
    """The model card's table of bundled files, from the manifest."""
    lines = ["| Task | File | sha256 | Iterations |", "|---|---|---|---|"]
    for task, entry in sorted(listed.items()):
        lines.append(f"| {task} | `{entry['file']}` | `{entry['sha256']}` | {entry['iterations']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bundle",
                                     description="Bundle a training run's weights into models/weights/.")
    parser.add_argument("task", choices=weights.TASKS)
    parser.add_argument("checkpoint", help="the run's last.pt")
    parser.add_argument("--half", action="store_true", help="store fp16")
    parser.add_argument("--average-with", nargs=2, metavar=("FILE", "SHARE"),
                        help="average the run's weights with FILE's (same architecture), FILE taking SHARE "
                             "(0-1) of each tensor; typically the weights the run started from")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"{args.checkpoint}: no such file")
    average_with = None
    if args.average_with:
        other, share = args.average_with
        try:
            average_with = (other, float(share))
        except ValueError:
            parser.error(f"--average-with SHARE must be a number, got {share!r}")
        if not 0.0 <= average_with[1] <= 1.0:
            parser.error(f"--average-with SHARE must be between 0 and 1, got {share}")
        if not Path(other).is_file():
            parser.error(f"--average-with {other}: no such file")
    try:
        entry = bundle(args.task, args.checkpoint, half=args.half, average_with=average_with)
    except ValueError as error:  # models' CheckpointError is one too
        raise SystemExit(f"{parser.prog}: {error}") from None
    print(json.dumps({args.task: entry}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
