"""Reading tensor chunks through read-only memory maps owned by one run.

A chunk is a zero-copy view of the mapped words; ``release`` drops its pages from this
process once the chunk is done (``MADV_DONTNEED``; the page cache keeps them, reclaimably)
and ``prefetch`` starts reading the next one (``MADV_WILLNEED``), so resident memory never
grows with the model. The maps belong to an ``InputMaps`` object that the run closes.
"""

from __future__ import annotations

import math
import mmap
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..dtypes import ITEMSIZE
from ..errors import CheckpointError
from . import platform
from .platform import fcntl
from .safetensors_format import TensorInfo

_PAGE = mmap.PAGESIZE
_WORDS = np.dtype(np.uint16)


def byte_range(info: TensorInfo, start: int, count: int) -> tuple[int, int]:
    """Absolute byte range of elements ``[start, start + count)`` of a tensor."""
    size = ITEMSIZE[info.dtype]
    return info.start + start * size, info.start + (start + count) * size


def thread_buffer(local: threading.local, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-thread buffer kept on ``local``, reused across chunks (grown when needed)."""
    key = (name, np.dtype(dtype).str)
    bufs = getattr(local, "bufs", None)
    if bufs is None:
        bufs = local.bufs = {}
    size = int(np.prod(shape))
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


class Computed:
    """A model tensor computed chunk by chunk from files rather than read from one (a LoRA
    target, a recast tensor, vocabulary rows aligned by token). Read like a ``TensorInfo``
    (``name``, ``dtype``, ``shape``, ``numel``, ``nbytes``, ``file``); a subclass gives
    ``shape``, ``ranges`` and ``chunk_words``."""

    name: str
    dtype: str

    # Every subclass gives nbytes and file; declared for the type checker only (LoraTensor's
    # ``file`` is a dataclass field, which a property here would shadow at run time).
    if TYPE_CHECKING:
        @property
        def nbytes(self) -> int: ...

        @property
        def file(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def ranges(self, start: int, count: int) -> list[tuple[TensorInfo, int, int]]:
        """The file ranges of the sources a chunk of elements reads (for read-ahead)."""
        raise NotImplementedError

    def chunk_words(self, start: int, count: int, words: Callable[[TensorInfo | Computed, int, int], np.ndarray],
                    scratch: Callable[[str, tuple[int, ...], Any], np.ndarray], slot: int) -> np.ndarray:
        """Raw words (in ``dtype``) of elements [start, start + count), in the thread's buffer ``slot``."""
        raise NotImplementedError


def _ranges(infos: tuple[TensorInfo | Computed, ...], start: int, count: int) \
        -> list[tuple[TensorInfo, int, int]]:
    """The file ranges a chunk of these tensors reads, once each (a computed tensor's: its sources)."""
    out = [r for info in infos for r in (info.ranges(start, count) if isinstance(info, Computed)
                                          else [(info, start, count)])]
    return list(dict.fromkeys(out))


def changed(path: str) -> CheckpointError:
    return CheckpointError("the file changed during the merge (truncated or rewritten by another process); "
                           "nothing was written under the output name: rerun once it is complete", file=path)


class InputMaps:
    """One read-only map per input file, opened on first use, all closed by ``close``. Before a
    chunk is read, its file is checked to still hold the mapped bytes (a file truncated under
    a map would kill the process with SIGBUS on the next access). The words of a ``Computed``
    tensor are computed into per-thread buffers of the run (its ``chunk_words``)."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread buffers (computed tensors' words)

    def _map(self, path: str) -> mmap.mmap:
        entry = self._maps.get(path)
        if entry is None:
            with self._lock:
                entry = self._maps.get(path)
                if entry is None:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        entry = self._maps[path] = (mmap.mmap(fd, 0, access=mmap.ACCESS_READ), fd)
                    except BaseException:
                        os.close(fd)
                        raise
        mm, fd = entry
        if os.fstat(fd).st_size < len(mm):
            raise changed(path)
        return mm

    def close(self) -> None:
        with self._lock:
            for mm, fd in self._maps.values():
                try:
                    mm.close()
                except BufferError:  # a view is still alive somewhere; the map goes with it
                    pass
                os.close(fd)
            self._maps.clear()
        self._local = threading.local()

    def scratch(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return thread_buffer(self._local, name, shape, dtype)

    def words(self, info: TensorInfo | Computed, start: int, count: int, slot: int = 0) -> np.ndarray:
        """Read-only uint16 view of elements ``[start, start+count)`` (a copy only if misaligned);
        a computed tensor (a LoRA model's, or vocabulary rows aligned by token) fills the
        thread's buffer ``slot``."""
        if isinstance(info, Computed):
            return info.chunk_words(start, count, self.words, self.scratch, slot)
        a, b = byte_range(info, start, count)
        mm = self._map(info.file)
        if a % 2 == 0:
            return np.frombuffer(mm, dtype=_WORDS, count=(b - a) // 2, offset=a)
        arr = np.frombuffer(mm[a:b], dtype=_WORDS).copy()  # odd-sized tensors before it
        arr.flags.writeable = False
        return arr

    def read_chunk(self, base: TensorInfo | Computed, fts: tuple[TensorInfo | Computed, ...], start: int, count: int) \
            -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Raw 16-bit words of elements [start, start + count) of the base and each fine-tuned
        tensor: the one place the methods and the prepass readers read model words through
        (buffer slot 0 for the base, i + 1 for model i, so computed tensors never share one)."""
        return self.words(base, start, count), tuple(self.words(f, start, count, i + 1) for i, f in enumerate(fts))

    def _advise(self, info: TensorInfo, start: int, count: int, advice: str) -> None:
        a, b = byte_range(info, start, count)
        a -= a % _PAGE
        if advice == "DONTNEED":
            b += -b % _PAGE
        entry = self._maps.get(info.file)
        mm = entry[0] if entry is not None and advice == "DONTNEED" else self._map(info.file)
        b = min(b, len(mm))
        if b > a:
            platform.advise(mm, advice, a, b - a)

    def prefetch(self, infos: tuple[TensorInfo | Computed, ...], start: int, count: int) -> None:
        """Ask the kernel to start reading a chunk's pages now (asynchronous readahead)."""
        for info, a, n in _ranges(infos, start, count):  # once each (a store's merge lists the base k + 1 times)
            self._advise(info, a, n, "WILLNEED")

    def release(self, infos: tuple[TensorInfo | Computed, ...], start: int, count: int) -> None:
        """Drop the mapped pages of a chunk from this process (the page cache keeps them)."""
        for info, a, n in _ranges(infos, start, count):
            self._advise(info, a, n, "DONTNEED")


class LeaseGuard:
    """Read leases on the input files for the whole run (Linux ``F_SETLEASE``).

    Another process that opens an input for writing or truncates it is then held back by the
    kernel until the lease is released, and this process gets SIGIO: the handler stops the run
    (a clean ``CheckpointError``; tasks in flight finish on intact pages), the leases are
    released, and only then does the other process proceed, so a map never loses its pages
    under a running kernel. Leases need the main thread (for the signal handler) and files this
    user owns; without them, each chunk still checks its files' sizes before reading
    (``InputMaps``), which leaves only a truncation racing a chunk in progress uncovered.
    """

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.fds: dict[int, str] = {}
        self.old: Callable[[int, FrameType | None], Any] | int | None = None
        self.broken: str | None = None

    def __enter__(self) -> "LeaseGuard":
        if (threading.current_thread() is not threading.main_thread() or fcntl is None
                or not hasattr(fcntl, "F_SETLEASE") or not hasattr(signal, "SIGIO")):
            return self
        self.old = signal.signal(signal.SIGIO, self._on_break)
        for path in dict.fromkeys(self.files):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
                self.fds[fd] = path
            except OSError:  # not our file, or open for writing elsewhere: the chunk checks remain
                os.close(fd)
        return self

    def _on_break(self, signum: int, frame: object) -> None:
        if self.broken is None:
            assert fcntl is not None  # installed by __enter__ only with fcntl
            breaking = [p for fd, p in self.fds.items() if fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK]
            self.broken = (breaking or list(self.fds.values()) or ["an input file"])[0]
            raise changed(self.broken)

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)  # releases the lease: the other process proceeds
        self.fds.clear()
        if self.old is not None:
            signal.signal(signal.SIGIO, self.old)
            self.old = None
