"""A hostile mix against the real service with its defaults: what each attack of issue 15 costs.

Starts ``python -m service serve`` (default settings: bundled weights, CPU unless a GPU is
there) on a free loopback port and runs, one after another:

1. **decode bombs**: two 231 KB progressive JPEGs with 5,000 scans and a 4.5 MB TIFF with
   40,000 directories at once, and a 64x64 photo 0.2 s later: status and seconds of each;
2. **small beside large**: a 4000x3000 (12 MP) photo, and once its tiles are queued a 64x64
   one: how long the small one takes (the large one's client then leaves);
3. **memory**: four concurrent 4096x4096 (16 MP) uploads whose clients hang up after 4 s: peak
   growth of resident memory (server and decoder processes together) and where it is 10 s
   after the clients left;
4. **slow clients** (``--slow``): a request head that stops half-way, and a body that declares
   30 MB, sends 1 KB and stalls: seconds until the server cuts each; then four uploads that each
   declare the largest body (32 MiB: together the default memory budget) and trickle 2 KiB/s,
   twice the rate floor, for 30 s, with a 64x64 photo sent 5, 15 and 25 s in: its status and
   seconds each time.

Traffic goes to 127.0.0.1 only; every loop is bounded. Prints a Markdown table.

    python -m bench.hostile [--slow] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
from PIL import Image

from tests.attacks import ifd_bomb, scan_bomb, smooth_image


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _png(side_h: int, side_w: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(side_h, side_w)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _start(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "warning"])
    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None, f"the service exited with {server.returncode}"
        assert time.monotonic() < deadline, "the service never became ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def _post(url: str, name: str, data: bytes, delay: float = 0.0, timeout: float = 600) -> tuple[int, float]:
    await asyncio.sleep(delay)
    async with httpx.AsyncClient(timeout=timeout) as client:
        started = time.monotonic()
        try:
            response = await client.post(url, files={"image": (name, data)})
            return response.status_code, time.monotonic() - started
        except httpx.TimeoutException:
            return 0, time.monotonic() - started


def decode_bombs(url: str) -> list[tuple[str, int, float]]:
    jpeg, tiff, small = scan_bomb(), ifd_bomb(), _png(64, 64)

    async def run():
        return await asyncio.gather(_post(url, "a.jpg", jpeg), _post(url, "b.jpg", jpeg), _post(url, "c.tif", tiff),
                                    _post(url, "small.png", small, delay=0.2))

    names = ["JPEG, 5,000 scans", "JPEG, 5,000 scans", "TIFF, 40,000 directories", "64x64 PNG beside them"]
    return [(name, status, seconds) for name, (status, seconds) in zip(names, asyncio.run(run()))]


def small_beside_large(base: str, url: str) -> tuple[int, float]:
    large, small = _png(3000, 4000), _png(64, 64)

    async def run():
        large_request = asyncio.create_task(_post(url, "large.png", large))
        deadline = time.monotonic() + 300
        async with httpx.AsyncClient(timeout=30) as client:
            while _sample((await client.get(f"{base}/metrics")).text, "mprnet_request_tiles_count") < 1:
                assert time.monotonic() < deadline, "the large image never reached the queue"
                await asyncio.sleep(0.1)
        small_result = await _post(url, "small.png", small)
        large_request.cancel()  # its client leaves: the service drops the rest of its tiles
        return small_result

    return asyncio.run(run())


def _sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def memory(url: str, server: psutil.Process, client_timeout: float) -> dict:
    upload = _png(4096, 4096)
    time.sleep(2)
    before = _tree_rss(server)
    peak, stop = before, threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(server))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def run():
        return await asyncio.gather(*(_post(url, f"{i}.png", upload, timeout=client_timeout) for i in range(4)))

    outcomes = asyncio.run(run())
    left = time.monotonic()
    while time.monotonic() - left < 10:
        time.sleep(0.1)
    stop.set()
    sampler.join()
    after = _tree_rss(server)
    return {"statuses": [status for status, _ in outcomes], "rss_before_mb": before / 2**20,
            "peak_growth_mb": (peak - before) / 2**20, "rss_10s_after_mb": after / 2**20,
            "after_minus_before_mb": (after - before) / 2**20}


def slow_clients(port: int) -> dict:
    def cut_after(payload: bytes) -> float:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(payload)
            connection.settimeout(120)
            started = time.monotonic()
            try:
                while connection.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
            return time.monotonic() - started

    head = b"POST /v1/restore/denoising HTTP/1.1\r\nHost: localhost\r\nContent-Ty"
    body = (b"POST /v1/restore/denoising HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
            b"boundary=x\r\nContent-Length: 31457280\r\n\r\n--x\r\nContent-Disposition: form-data; "
            b"name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n" + b"\x89" * 1024)
    return {"half_head_s": cut_after(head), "stalled_body_s": cut_after(body)}


def trickling_uploads(port: int, url: str, seconds: float = 30.0) -> list[tuple[float, int, float]]:
    head = (b"POST /v1/restore/denoising HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
            b"boundary=x\r\nContent-Length: 33554432\r\n\r\n--x\r\nContent-Disposition: form-data; "
            b"name=\"image\"; filename=\"a.png\"\r\n\r\n")
    stop = threading.Event()
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]

    def trickle(connection: socket.socket) -> None:
        try:
            connection.sendall(head)
            while not stop.wait(0.5):
                connection.sendall(b"\0" * 1024)
        except OSError:
            pass  # cut by the server

    threads = [threading.Thread(target=trickle, args=(c,), daemon=True) for c in connections]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    small, beside = _png(64, 64), []
    try:
        for at in (5.0, 15.0, 25.0):
            time.sleep(max(0.0, started + at - time.monotonic()))
            status, took = asyncio.run(_post(url, "small.png", small, timeout=120))
            beside.append((at, status, took))
        time.sleep(max(0.0, started + seconds - time.monotonic()))
    finally:
        stop.set()
        for connection in connections:
            connection.close()
    return beside


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="also time the slow-client cuts (up to a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON too")
    args = parser.parse_args(argv)
    port = _free_port()
    base, url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1/restore/denoising"
    server = _start(port)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    try:
        results["decode_bombs"] = decode_bombs(url)
        results["small_beside_large"] = small_beside_large(base, url)
        results["memory"] = memory(url, psutil.Process(server.pid), client_timeout=4)
        results["memory_served"] = memory(url, psutil.Process(server.pid), client_timeout=600)
        if args.slow:
            results["slow_clients"] = slow_clients(port)
            results["trickling_uploads"] = trickling_uploads(port, url)
    finally:
        server.terminate()
        server.wait(120)
    print("| attack | result |\n|---|---|")
    for name, status, seconds in results["decode_bombs"]:
        print(f"| {name} | HTTP {status} in {seconds:.2f} s |")
    status, seconds = results["small_beside_large"]
    print(f"| 64x64 while a 12 MP photo is restored | HTTP {status} in {seconds:.2f} s |")
    m = results["memory"]
    print(f"| four 16 MP uploads, clients gone after 4 s | peak RSS growth {m['peak_growth_mb']:.0f} MB; 10 s later "
          f"{m['after_minus_before_mb']:+.0f} MB from the start ({m['rss_before_mb']:.0f} MB) |")
    m = results["memory_served"]
    print(f"| four 16 MP uploads, clients wait for their answers ({', '.join(map(str, m['statuses']))}) | peak RSS "
          f"growth {m['peak_growth_mb']:.0f} MB; 10 s later {m['after_minus_before_mb']:+.0f} MB |")
    if "slow_clients" in results:
        slow = results["slow_clients"]
        print(f"| request head stopped half-way | cut after {slow['half_head_s']:.1f} s |")
        print(f"| 30 MB body declared, 1 KB sent | cut after {slow['stalled_body_s']:.1f} s |")
        answers = "; ".join(f"at {at:.0f} s HTTP {status} in {took:.2f} s" for at, status, took in
                            results["trickling_uploads"])
        print(f"| four 32 MiB bodies declared, each trickling 2 KiB/s; a 64x64 PNG beside them | {answers} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
