"""Reading tensor chunks through read-only memory maps owned by one run.

A chunk is a zero-copy view of the mapped words; ``release`` drops its pages from this
process once the chunk is done (``MADV_DONTNEED``; the page cache keeps them, reclaimably)
and ``prefetch`` starts reading the next one (``MADV_WILLNEED``), so resident memory never
grows with the model. The maps belong to an ``InputMaps`` object that the run closes.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from ..codec import ITEMSIZE
from .safetensors_format import TensorInfo

_PAGE = mmap.PAGESIZE
_WORDS = np.dtype(np.uint16)


def byte_range(info: TensorInfo, start: int, count: int) -> tuple[int, int]:
    """Absolute byte range of elements ``[start, start + count)`` of a tensor."""
    size = ITEMSIZE[info.dtype]
    return info.start + start * size, info.start + (start + count) * size


class InputMaps:
    """One read-only map per input file, opened on first use, all closed by ``close``."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, path: str) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with self._lock:
                mm = self._maps.get(path)
                if mm is None:
                    with open(path, "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps[path] = mm
        return mm

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                try:
                    mm.close()
                except BufferError:  # a view is still alive somewhere; the map goes with it
                    pass
            self._maps.clear()

    def words(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        """Read-only uint16 view of elements ``[start, start+count)`` (a copy only if misaligned)."""
        a, b = byte_range(info, start, count)
        mm = self._map(info.file)
        if a % 2 == 0:
            return np.frombuffer(mm, dtype=_WORDS, count=(b - a) // 2, offset=a)
        arr = np.frombuffer(mm[a:b], dtype=_WORDS).copy()  # odd-sized tensors before it
        arr.flags.writeable = False
        return arr

    def read_chunk(self, base: TensorInfo, fts: tuple[TensorInfo, ...], start: int, count: int) \
            -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Raw 16-bit words of elements [start, start + count) of the base and each fine-tuned tensor."""
        return self.words(base, start, count), tuple(self.words(f, start, count) for f in fts)

    def _advise(self, info: TensorInfo, start: int, count: int, advice: int) -> None:
        a, b = byte_range(info, start, count)
        a -= a % _PAGE
        if advice == mmap.MADV_DONTNEED:
            b += -b % _PAGE
        mm = self._map(info.file)
        b = min(b, len(mm))
        if b > a:
            mm.madvise(advice, a, b - a)

    def prefetch(self, infos: tuple[TensorInfo, ...], start: int, count: int) -> None:
        """Ask the kernel to start reading a chunk's pages now (asynchronous readahead)."""
        for info in infos:
            self._advise(info, start, count, mmap.MADV_WILLNEED)

    def release(self, infos: tuple[TensorInfo, ...], start: int, count: int) -> None:
        """Drop the mapped pages of a chunk from this process (the page cache keeps them)."""
        for info in infos:
            self._advise(info, start, count, mmap.MADV_DONTNEED)
