"""Command line: ``python -m service {serve,restore,weights}``.

``restore`` runs the engine in this process on files and folders; ``serve`` starts the HTTP
service; ``weights`` installs the paper's released checkpoints and shows what each task uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.weights import DEFAULT_MAX_BYTES, TASKS

from .image_files import find_images, result_targets, write_atomically
from .tiling import DEFAULT_TILE_OVERLAP, DEFAULT_TILE_SIZE

if TYPE_CHECKING:
    from .client import FileOutcome, Progress

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
API_KEY_VARIABLE = "MPRNET_API_KEY"


def _restore_command(args: argparse.Namespace) -> int:
    if Path(args.output).exists() and not Path(args.output).is_dir():
        print(f"error: --output takes a folder; {args.output} is a file", file=sys.stderr)
        return EXIT_USAGE
    # An empty --url (an unset variable, say) is a mistake to report, not a request to run locally.
    return _restore_remotely(args) if args.url is not None else _restore_locally(args)


def _made_output_folder(folder: str) -> bool:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the output folder {folder}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def _report_problems(problems: list[str]) -> None:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


def _restore_locally(args: argparse.Namespace) -> int:
    # Imported here so that `weights list` and `--help` stay fast.
    from tqdm import tqdm

    from models import CheckpointError, load_checkpoint
    from models.weights import WeightsNotFound, resolve

    from . import imaging
    from .backends import build_engine, resolve_backend
    from .config import default_model_cache_dir
    from .engine import resolve_device
    from .pipeline import RestorePipeline
    from .tiling import Tiling

    files, problems = find_images(args.inputs, leave_out=args.output)
    _report_problems(problems)
    if not files:
        return EXIT_SOME_FAILED if problems else EXIT_USAGE
    try:
        pipeline = RestorePipeline(Tiling(args.tile, args.overlap))
        weights = Path(args.weights) if args.weights else resolve(args.task)
        checkpoint = load_checkpoint(weights)
        device = resolve_device(args.device)
        backend, _ = resolve_backend(args.backend, device, args.precision)
        engine = build_engine(checkpoint, checkpoint.model, backend, device=device, precision=args.precision,
                              tile_size=args.tile, max_batch_size=args.batch_size,
                              allow_emulated_precision=args.allow_emulated_precision,
                              cache_dir=default_model_cache_dir())
    except (WeightsNotFound, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not _made_output_folder(args.output):
        return EXIT_USAGE

    out_dir = Path(args.output)
    failures = len(problems)
    progress = tqdm(result_targets(files, out_dir), unit="image", disable=len(files) < 2 or args.quiet,
                    file=sys.stderr)
    for path, target, skipped in progress:
        if skipped:
            tqdm.write(f"error: {path}: {skipped}", file=sys.stderr)
            failures += 1
            continue
        progress.set_postfix_str(path.name)
        try:
            png = pipeline.restore(path.read_bytes(), engine.forward, engine.max_batch_size)
            write_atomically(target, png)
        except imaging.ImageError as exc:
            tqdm.write(f"error: {path}: {exc}", file=sys.stderr)
            failures += 1
        except OSError as exc:
            tqdm.write(f"error: {path}: {exc.strerror or exc}", file=sys.stderr)
            failures += 1
        else:
            if len(files) < 2 and not args.quiet:
                print(f"{path} -> {target}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


class _TileBars:
    """A bar of tiles, under the bar of images, for each image in flight that has more than one
    tile: a large image can take minutes, and its tiles show that it is moving."""

    def __init__(self, tqdm: type):
        self._tqdm = tqdm
        self._bars: dict[Path, Any] = {}

    def progress(self, path: Path, progress: Progress) -> None:
        bar = self._bars.get(path)
        if bar is None:
            if progress.total < 2:
                return
            bar = self._bars[path] = self._tqdm(total=progress.total, desc=path.name, unit="tile", leave=False,
                                                file=sys.stderr)
        bar.update(progress.done - bar.n)  # after a retry the count starts again from 0

    def finished(self, outcome: FileOutcome) -> None:
        bar = self._bars.pop(outcome.path, None)
        if bar is not None:
            bar.close()


def _restore_remotely(args: argparse.Namespace) -> int:
    """The local command's inputs, output names, messages and exit codes, with the work done by
    the service at ``--url``."""
    from tqdm import tqdm

    from .client import Client, ConnectionFailed, ServiceError

    if args.concurrency < 1:
        print(f"error: --concurrency must be at least 1, got {args.concurrency}", file=sys.stderr)
        return EXIT_USAGE
    files, problems = find_images(args.inputs, leave_out=args.output)
    _report_problems(problems)
    if not files:
        return EXIT_SOME_FAILED if problems else EXIT_USAGE
    # The environment keeps the key out of the command line, where other users' `ps` can read it.
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    try:
        client = Client(args.url, api_key=api_key)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not _made_output_folder(args.output):
        return EXIT_USAGE
    with client:
        try:
            served = client.models().get("models", {})
        except ConnectionFailed as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        except ServiceError as exc:
            hint = f" (give the key with --api-key or {API_KEY_VARIABLE})" if exc.status == 401 else ""
            print(f"error: {args.url}/v1/models answered: {exc}{hint}", file=sys.stderr)
            return EXIT_USAGE
        # Checked once, where a missing checkpoint stops the local command, rather than reported
        # once per file. A service still loading lists nothing yet; its 503s are retried.
        if served and args.task not in served:
            print(f"error: the service at {args.url} does not restore {args.task}; it serves {', '.join(served)}",
                  file=sys.stderr)
            return EXIT_USAGE
        tiles = _TileBars(tqdm)

        def finished(outcome: FileOutcome) -> None:
            tiles.finished(outcome)
            bar.update(1)

        with tqdm(total=len(files), unit="image", disable=len(files) < 2 or args.quiet, file=sys.stderr) as bar:
            # Without bars to show, plain requests: nothing to stream.
            outcomes = client.restore_folder(files, args.output, args.task, concurrency=args.concurrency,
                                             on_outcome=finished, on_progress=None if args.quiet else tiles.progress)
    failures = len(problems)
    for outcome in outcomes:
        if outcome.ok:
            if len(files) < 2 and not args.quiet:
                print(f"{outcome.path} -> {outcome.target}", file=sys.stderr)
            continue
        failures += 1
        error = outcome.error
        if isinstance(error, ServiceError):
            reason = error.message
        elif isinstance(error, OSError):
            reason = error.strerror or str(error)
        else:
            reason = str(error)
        print(f"error: {outcome.path}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _serve_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .config import settings_from_args
    from .server import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"error: {field}: {error['msg']}", file=sys.stderr)
        return EXIT_USAGE
    return serve(settings) or EXIT_OK


def _weights_list_command(args: argparse.Namespace) -> int:
    from models.weights import describe

    unusable = 0
    for row in describe():
        sha = (row.get("sha256") or "")[:16]
        print(f"{row['task']:<11} {row['source']:<9} {sha:<16} {row.get('path') or '-'}")
        if row["error"]:
            # Installed weights are preferred to the bundled ones, never silently replaced by them:
            # restoring and serving stop on an unreadable file, and serve warns of a changed one.
            print(f"{'':<11} error: {row['error']}")
            unusable += 1
    return EXIT_SOME_FAILED if unusable else EXIT_OK


def _weights_install_command(args: argparse.Namespace) -> int:
    from models.weights import WeightsInstallError, install, installed_manifest

    try:
        path = install(args.task, args.source, sha256=args.sha256, progress=not args.quiet,
                       allow_http=args.allow_http, max_bytes=args.max_mb * 1024 * 1024)
    except WeightsInstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    print(f"installed {args.task} weights: {path}")
    # To pin later installs (--sha256) to exactly this file.
    print(f"sha256: {installed_manifest()[args.task]['sha256']}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP service")
    from .config import add_serve_arguments
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve_command)

    restore = commands.add_parser("restore", help="restore image files with a local model",
                                  description="Restore images (files or folders) and write <stem>.png into OUTPUT.")
    restore.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    restore.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the restored PNGs")
    restore.add_argument("--task", required=True, choices=TASKS)
    restore.add_argument("--weights", metavar="PATH", help="checkpoint to use instead of the task's default")
    restore.add_argument("--tile", type=int, default=DEFAULT_TILE_SIZE, metavar="N",
                         help=f"tile side in pixels, a multiple of 8; 0 = whole image (default {DEFAULT_TILE_SIZE})")
    restore.add_argument("--overlap", type=int, default=DEFAULT_TILE_OVERLAP, metavar="N",
                         help=f"tile overlap in pixels (default {DEFAULT_TILE_OVERLAP})")
    restore.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    restore.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                         help="what runs the network: auto (OpenVINO on the CPU where installed, else PyTorch), "
                              "torch or openvino (default auto)")
    restore.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                         help="fp16 needs CUDA; bf16 needs bf16 instructions (CPUs with AVX512-BF16 or AMX, "
                              "CUDA 8.0+) unless --allow-emulated-precision (default fp32)")
    restore.add_argument("--allow-emulated-precision", action="store_true",
                         help="run a precision the device only emulates (bf16 on an AVX2 CPU: 6x to over 80x slower) "
                              "instead of refusing")
    restore.add_argument("--batch-size", type=int, default=None, metavar="N",
                         help="tiles per forward pass (default 16 on CUDA, 1 on CPU)")
    restore.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    restore.add_argument("--url", metavar="URL", help="send the images to the service at URL (http://host:port) "
                         "instead of loading a model here; the service's own weights and tiling apply")
    restore.add_argument("--concurrency", type=int, default=4, metavar="N",
                         help="with --url, images in flight at once (default 4)")
    restore.add_argument("--api-key", metavar="KEY",
                         help=f"with --url, the service's API key (default: ${API_KEY_VARIABLE}, which keeps "
                              f"the key out of the process list)")
    restore.set_defaults(run=_restore_command)

    weights = commands.add_parser("weights", help="install released weights or list what each task uses")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True)
    listing = weight_commands.add_parser("list", help="show which weights file each task will use")
    listing.set_defaults(run=_weights_list_command)
    install = weight_commands.add_parser("install", help="download or copy a checkpoint and verify it")
    install.add_argument("task", choices=TASKS)
    install.add_argument("--from", dest="source", required=True, metavar="URL_OR_PATH",
                         help="http(s) URL, Google Drive id or link, or a local file")
    install.add_argument("--sha256", metavar="HEX", help="expected sha256 of the file")
    install.add_argument("--allow-http", action="store_true",
                         help="accept a plain http URL (redirects must still lead to https); without it, "
                              "only https")
    install.add_argument("--max-mb", type=int, default=DEFAULT_MAX_BYTES // (1024 * 1024), metavar="MB",
                         help="refuse a file larger than this many MiB (default %(default)s; the largest "
                              "released checkpoint is about 80 MB)")
    install.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    install.set_defaults(run=_weights_install_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
