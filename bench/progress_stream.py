"""What a user of the event stream sees on a long restore: when progress starts, how often it
comes, how good the time-left estimate is, and what the stream costs against a plain request.

Starts ``python -m service serve`` on loopback as a user would (bundled weights unless
``--weights``, the default backend and tiling, one task), then restores a Kodak24 photo resized
to ``--size`` with noise added, once with ``Accept: text/event-stream`` and once plainly,
alternating for ``--rounds``. Prints one JSON line per restore.

    python -m bench.progress_stream --size 2000x1500 --rounds 2
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.devices import cpu_summary
from tests.service_helpers import free_port, wait_until

KODAK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "eval" / "Kodak24"


def _photo(width: int, height: int) -> bytes:
    with Image.open(KODAK / "kodim05.png") as photo:
        pixels = np.asarray(photo.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    noisy = np.clip(pixels + np.random.default_rng(19).normal(0, 15, pixels.shape), 0, 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "PNG")
    return buffer.getvalue()


def _streamed(url: str, upload: bytes) -> dict:
    started = time.monotonic()
    progress, result, name = [], None, None
    with httpx.stream("POST", url, files={"image": ("photo.png", upload)}, headers={"Accept": "text/event-stream"},
                      timeout=httpx.Timeout(60, read=120)) as response:
        headers_at = time.monotonic() - started
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if name == "progress":
                    progress.append((time.monotonic() - started, data))
                else:
                    result = (time.monotonic() - started, name, data)
    finished_at, outcome, data = result
    gaps = [later - earlier for (earlier, _), (later, _) in zip(progress, progress[1:])]
    # How far the estimate given halfway was from what the rest really took.
    halfway = next(((at, event) for at, event in progress if event["done"] >= event["total"] / 2 and "eta_s" in event),
                   None)
    return {"mode": "stream", "outcome": outcome, "status_line_s": round(headers_at, 3),
            "first_progress_s": round(progress[0][0], 2), "progress_events": len(progress),
            "tiles": progress[0][1]["total"], "longest_gap_s": round(max(gaps, default=0), 2),
            "eta_halfway_s": halfway and halfway[1]["eta_s"],
            "actual_left_halfway_s": halfway and round(progress[-1][0] - halfway[0], 1),
            "result_s": round(finished_at, 2), "png_bytes": len(base64.b64decode(data.get("png_base64", "")))}


def _plain(url: str, upload: bytes) -> dict:
    started = time.monotonic()
    response = httpx.post(url, files={"image": ("photo.png", upload)}, timeout=600)
    return {"mode": "plain", "status": response.status_code, "result_s": round(time.monotonic() - started, 2),
            "png_bytes": len(response.content)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2000x1500", help="WIDTHxHEIGHT of the photo")
    parser.add_argument("--task", default="denoising")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--weights", help="checkpoint for the task (default: the bundled weights)")
    args = parser.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    upload = _photo(width, height)
    port = free_port()
    env = {**os.environ, "MPRNET_TASKS": args.task, "MPRNET_LOG_LEVEL": "warning"}
    if args.weights:
        env[f"MPRNET_WEIGHTS_{args.task.upper()}"] = args.weights
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert server.poll() is None, f"the service exited with {server.returncode}"
            try:
                return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the service to become ready", timeout=600, interval=0.5)
        backend = httpx.get(f"{base}/v1/models").json()["models"][args.task]["backend"]
        print(json.dumps({"size": args.size, "task": args.task, "backend": backend, "cpu": cpu_summary(),
                          "load_average": os.getloadavg()}), flush=True)
        url = f"{base}/v1/restore/{args.task}"
        for _ in range(args.rounds):
            print(json.dumps(_streamed(url, upload)), flush=True)
            print(json.dumps(_plain(url, upload)), flush=True)
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
