"""The two CPU backends through the whole service, in one run: throughput and agreement.

Starts ``python -m service serve`` twice on loopback, with the default backend (``auto``: OpenVINO
on the CPU) and with ``MPRNET_BACKEND=torch``, both on the same weights (the bundled ones unless
``--weights``), one task. Then, in alternating rounds (A B A B ..., so that a machine whose speed
drifts treats both alike), ``--clients`` closed-loop clients send held-out photos (Kodak24 crops
of ``--size``; Kodak24 is never trained on) to one server for ``--seconds``. Prints images per
second per round, the median ratio, and the PSNR between the two servers' outputs for each photo.

    python -m bench.backend_service --clients 2 --size 480 --rounds 3 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.service_helpers import free_port

KODAK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "eval" / "Kodak24"


def _photos(size: int, count: int) -> list[bytes]:
    uploads = []
    for path in sorted(KODAK.glob("*.png"))[:count]:
        image = Image.open(path).convert("RGB")
        left, top = (image.width - size) // 2, (image.height - size) // 2
        buffer = io.BytesIO()
        image.crop((left, top, left + size, top + size)).save(buffer, "PNG")
        uploads.append(buffer.getvalue())
    if not uploads:
        raise SystemExit(f"no photos in {KODAK}")
    return uploads


def _start(backend: str, task: str, weights: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MPRNET_TASKS": task, "MPRNET_BACKEND": backend, "MPRNET_LOG_LEVEL": "warning"}
    if weights:
        env[f"MPRNET_WEIGHTS_{task.upper()}"] = weights
    process = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the {backend} service exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the {backend} service never became ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def _round(url: str, task: str, uploads: list[bytes], clients: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def client(index: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=600) as http:
            sent = index
            while time.monotonic() < stop:
                response = await http.post(f"{url}/v1/restore/{task}",
                                           files={"image": ("p.png", uploads[sent % len(uploads)])})
                response.raise_for_status()
                done += 1
                sent += clients

    started = time.monotonic()
    await asyncio.gather(*(client(index) for index in range(clients)))
    return done / (time.monotonic() - started)


def _restored(url: str, task: str, upload: bytes) -> np.ndarray:
    response = httpx.post(f"{url}/v1/restore/{task}", files={"image": ("p.png", upload)}, timeout=600)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="denoising")
    parser.add_argument("--weights", help="checkpoint (default: the task's bundled or installed weights)")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    uploads = _photos(args.size, args.photos)
    servers = {backend: _start(backend, args.task, args.weights) for backend in ("auto", "torch")}
    try:
        models = {backend: httpx.get(f"{url}/v1/models").json()["models"][args.task]
                  for backend, (_, url) in servers.items()}
        agreement = []
        for upload in uploads:
            a, b = (_restored(servers[backend][1], args.task, upload) for backend in ("auto", "torch"))
            agreement.append(10 * np.log10(255 ** 2 / max(np.mean((a - b) ** 2), 1e-12)))
        for _, url in servers.values():  # warm-up
            asyncio.run(_round(url, args.task, uploads, args.clients, 0.1))
        rates: dict[str, list[float]] = {"auto": [], "torch": []}
        for index in range(args.rounds):
            for backend in ("auto", "torch"):
                rate = asyncio.run(_round(servers[backend][1], args.task, uploads, args.clients, args.seconds))
                rates[backend].append(rate)
                print(f"round {index + 1}: {backend:5s} ({models[backend]['backend']}) {rate:.3f} images/s",
                      flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(120)
    ratios = [a / b for a, b in zip(rates["auto"], rates["torch"])]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "task": args.task, "weights_sha256": models["auto"]["weights_sha256"], "size": args.size,
        "clients": args.clients, "seconds_per_round": args.seconds,
        "backends": {backend: models[backend]["backend"] for backend in models},
        "images_per_s": rates, "median_ratio_default_vs_torch": statistics.median(ratios),
        "psnr_default_vs_torch_db": {"min": min(agreement), "median": statistics.median(agreement)},
    }
    print(f"\ndefault ({models['auto']['backend']}) vs torch: {statistics.median(ratios):.2f}x images/s "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); outputs agree at >= {min(agreement):.1f} dB "
          f"(median {statistics.median(agreement):.1f} dB) on {len(uploads)} photos")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
