"""Memory: what the requests in flight may hold, and giving freed memory back to the system.

An upload's cost is known in two steps: its declared body size before a byte is read, its pixel
count once its header is parsed. :class:`MemoryBudget` admits a request at each step only while
the sum over requests in flight stays within its limit; past it the request gets 503 with
Retry-After, before the expensive step, so a burst cannot decode in full before being refused.

A body counts against the budget as its bytes arrive, not at its declared size: a declaration
costs a client nothing, and four uploads that each declared the largest body and then sent a
kilobyte a second would otherwise hold the whole budget, and every other upload out, for hours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MemoryBudget", "ArrivingBody", "OverBudget", "release_memory_promptly", "trim_free_memory"]

# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 20


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory_promptly() -> None:
    """Make large freed blocks go back to the system at once.

    glibc serves blocks over 128 KiB by mmap and unmaps them when freed, but after each such free
    it raises that threshold up to 32 MiB, after which image-sized buffers come from the heap and
    stay in the process after use. Fixing the threshold (1 MiB) keeps every image buffer mapped
    and returned when freed.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD)


def trim_free_memory() -> None:
    """Return the heap's free pages to the system (glibc), e.g. after a large request ends."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class OverBudget(RuntimeError):
    """Admitting this request now would pass the memory budget; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MemoryBudget:
    """Bytes of bodies and pixels of images held by the requests in flight, each bounded.

    Args:
        max_bytes: upload bytes that requests in flight may hold together.
        max_pixels: image pixels that requests in flight may hold together (each pixel costs the
            service about 50 bytes between decoding and encoding: the pixels, float tiles, and
            the blend).
        retry_after_s: what a refused client is told to wait.
    """

    def __init__(self, max_bytes: int, max_pixels: int, retry_after_s: int = 2):
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.retry_after_s = retry_after_s
        self.bytes = 0
        self.pixels = 0

    @contextmanager
    def receiving(self, declared: int) -> Iterator[ArrivingBody]:
        """A request body of ``declared`` bytes, about to arrive. :class:`OverBudget` at once if
        the bytes the bodies in flight have received leave no room for it; otherwise the ``with``
        block holds the body's bytes as they are :meth:`ArrivingBody.add`-ed, until it ends."""
        if self.bytes and self.bytes + declared > self.max_bytes:
            raise self._refusal("uploads", self.bytes, "bytes", declared, self.max_bytes)
        body = ArrivingBody(self)
        try:
            yield body
        finally:
            self.bytes -= body.held

    def holding_pixels(self, count: int):
        """Hold ``count`` image pixels while the ``with`` block runs; :class:`OverBudget` if no room."""
        return self._holding("pixels", "images", count, self.max_pixels)

    @contextmanager
    def _holding(self, unit: str, what: str, count: int, limit: int):
        held = getattr(self, unit)
        # One request always fits, however large: the byte and pixel limits of a single upload
        # are the service's other settings; the budget only stops requests piling up.
        if held and held + count > limit:
            raise self._refusal(what, held, unit, count, limit)
        setattr(self, unit, held + count)
        try:
            yield
        finally:
            setattr(self, unit, getattr(self, unit) - count)

    def _refusal(self, what: str, held: int, unit: str, count: int, limit: int) -> OverBudget:
        return OverBudget(f"{what} in flight hold {held} {unit}; another {count} would pass the limit of {limit}",
                          self.retry_after_s)


class ArrivingBody:
    """One request body's share of a :class:`MemoryBudget`, growing as its bytes arrive."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0

    def add(self, count: int) -> None:
        """Hold ``count`` more bytes; :class:`OverBudget` if the other bodies in flight leave no
        room for them (a body alone in the budget always fits, as in :meth:`MemoryBudget.receiving`)."""
        budget = self.budget
        others = budget.bytes - self.held
        if others and budget.bytes + count > budget.max_bytes:
            raise budget._refusal("other uploads", others, "bytes", self.held + count, budget.max_bytes)
        budget.bytes += count
        self.held += count
