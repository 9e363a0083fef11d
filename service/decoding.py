"""Decoding uploads in worker processes, so that no upload can stall the service.

Image decoders run untrusted bytes through C code whose cost is not bounded by the file's size
(a 231 KB progressive JPEG can hold thousands of scans, each a pass over 16 megapixels), and a
thread cannot be stopped once it is inside one. A process can: each decode runs in one of a few
long-lived decoder processes, and is killed, and its process replaced, when it passes the decode
time limit or when its request no longer wants it (client gone, deadline passed). Structural
checks in :func:`service.imaging.decode` refuse the known bombs before any of this is needed.

The processes import only numpy and Pillow (started afresh, not forked, so nothing of the
server's threads or device state is copied).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from . import imaging
from .memory import release_memory_promptly

__all__ = ["DecoderPool", "DecodeTooSlow", "available_cpus"]

log = logging.getLogger(__name__)


class DecodeTooSlow(imaging.ImageError):
    status_code = 422
    code = "image_too_complex"


def available_cpus() -> int:
    """CPUs this process may use: the cgroup's quota where one is set (a container's CPU limit),
    else the affinity mask; never the host's count, which on a large node is far more."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _serve_decodes(connection: Connection) -> None:
    """A decoder process: (bytes, max_pixels) in, a DecodedImage or the ImageError out, forever."""
    release_memory_promptly()
    while True:
        try:
            data, max_pixels = connection.recv()
        except EOFError:
            return
        try:
            result = imaging.decode(data, max_pixels)
        except imaging.ImageError as exc:
            result = exc
        del data
        connection.send(result)
        del result


class _Decoder:
    """One decoder process and the socket to it.

    Started as ``python -m service.decoding FD`` rather than through multiprocessing, whose
    spawn re-imports the parent's main module in the child: a script that builds the app
    without an ``if __name__ == "__main__"`` guard would start a second server there.
    """

    def __init__(self):
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        self.connection = Connection(ours.detach())
        self.killed = False

    def exchange(self, data: bytes, max_pixels: int | None, timeout_s: float) -> imaging.DecodedImage:
        """Blocking: send one upload, wait for its pixels at most ``timeout_s``."""
        try:
            self.connection.send((data, max_pixels))
            if not self.connection.poll(timeout_s):
                self.kill()
                raise DecodeTooSlow(f"the image took more than {timeout_s:g} s to decode; it was stopped")
            result = self.connection.recv()
        except (EOFError, OSError, BrokenPipeError):
            raise _DecoderLost() from None
        if isinstance(result, Exception):
            raise result
        return result

    @property
    def alive(self) -> bool:
        # A killed process may not have been reaped yet, so poll() alone could still say alive.
        return not self.killed and self.process.poll() is None

    def kill(self) -> None:
        self.killed = True
        self.process.kill()
        self.connection.close()

    def join(self) -> None:
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("decoder process %d did not exit after being killed", self.process.pid)


_RESTART_DELAY_S = 1.0


class _DecoderLost(Exception):
    """The process went away mid-decode: killed because its request left, or crashed."""


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class DecoderPool:
    """``await decode(data)`` in one of ``workers`` decoder processes.

    Args:
        workers: decoder processes, each decoding one upload at a time.
        max_pixels: the largest image, checked from the header before decoding.
        timeout_s: the longest one decode may take before it is stopped (422 ``image_too_complex``).
    """

    def __init__(self, workers: int, max_pixels: int | None, timeout_s: float):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self._decoders = [_Decoder() for _ in range(workers)]
        self._idle: asyncio.Queue[_Decoder] | None = None
        # Threads that wait on the pipes, one per process: they only block, never compute.
        self._waiters = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mprnet-decode-wait")
        self._closed = False

    async def decode(self, data: bytes) -> imaging.DecodedImage:
        """Raises :class:`imaging.ImageError` (including :class:`DecodeTooSlow`) for a bad upload.
        Cancelling the caller stops the decode at once."""
        idle = self._idle_queue()
        decoder = await idle.get()
        loop = asyncio.get_running_loop()
        try:
            exchange = loop.run_in_executor(self._waiters, decoder.exchange, data, self.max_pixels, self.timeout_s)
            exchange.add_done_callback(_retrieve)  # its outcome is nobody's once the caller has left
            del data
            try:
                return await asyncio.shield(exchange)
            except asyncio.CancelledError:
                decoder.kill()  # the waiting thread sees the pipe close and returns
                raise
            except _DecoderLost:
                raise imaging.InvalidImage("the image could not be decoded (the decoder stopped)") from None
        finally:
            if decoder.alive:
                idle.put_nowait(decoder)
            else:
                # Not awaited here: a request cancelled again while it waited (its deadline, then
                # its client leaving) would abandon the replacement, and the pool would shrink for good.
                self._restock(decoder, idle)

    def _idle_queue(self) -> asyncio.Queue:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for decoder in self._decoders:
                self._idle.put_nowait(decoder)
        return self._idle

    def _restock(self, dead: _Decoder, idle: asyncio.Queue) -> None:
        """Put a fresh process in the place of ``dead``, then into ``idle``, whatever becomes of
        the request that lost it; retried while processes cannot be started (out of pids, say)."""
        loop = asyncio.get_running_loop()

        def restocked(replacement: asyncio.Future) -> None:
            if replacement.cancelled():  # the loop's executor is shutting down, and the pool with it
                return
            if replacement.exception() is not None:
                log.error("could not start a decoder process (%s); retrying in %g s",
                          replacement.exception(), _RESTART_DELAY_S)
                loop.call_later(_RESTART_DELAY_S, lambda: self._restock(dead, idle))
            elif replacement.result() is not None:
                idle.put_nowait(replacement.result())

        loop.run_in_executor(None, self._replace, dead).add_done_callback(restocked)

    def _replace(self, dead: _Decoder) -> _Decoder | None:
        dead.kill()
        dead.join()
        if self._closed:
            return None
        fresh = _Decoder()
        self._decoders[self._decoders.index(dead)] = fresh
        return fresh

    def close(self) -> None:
        self._closed = True
        for decoder in self._decoders:
            decoder.kill()
        self._waiters.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    _serve_decodes(Connection(int(sys.argv[1])))
