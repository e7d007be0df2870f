"""Platform calls with portable fallbacks, chosen at run time.

Linux has every fast path. macOS lacks ``posix_fallocate`` and ``fdatasync`` and reports
``ru_maxrss`` in bytes; Windows lacks ``pwrite``, ``madvise`` and ``fcntl``. Each call below
uses the fast path when the platform has it and a fallback otherwise; ``FAST`` lets the tests
turn a fast path off to run its fallback on Linux. What a fallback loses is said in the README.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from types import ModuleType

fcntl: ModuleType | None
resource: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import resource
except ImportError:  # Windows
    resource = None

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

#: Fast paths in use (the tests switch them off one by one).
FAST = {
    "fallocate": hasattr(os, "posix_fallocate"),
    "pwrite": hasattr(os, "pwrite"),
    "madvise": hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"),
    "fdatasync": hasattr(os, "fdatasync"),
    "flock": fcntl is not None,
    "fadvise": hasattr(os, "posix_fadvise"),
}
_seek_lock = threading.Lock()


def reserve(fd: int, size: int) -> None:
    """Make the file ``size`` bytes with its blocks allocated (so a full disk fails now).
    Fallback: write zeros up to ``size`` (allocates too, slower)."""
    if FAST["fallocate"]:
        os.posix_fallocate(fd, 0, size)
        return
    pos = os.lseek(fd, 0, os.SEEK_END)
    block = b"\0" * (1 << 20)
    while pos < size:
        pos += os.write(fd, block[:min(len(block), size - pos)])


def pwrite(fd: int, data: memoryview, offset: int) -> int:
    """Positioned write (fallback: seek and write under a lock; the fd is not shared otherwise)."""
    if FAST["pwrite"]:
        return os.pwrite(fd, data, offset)
    with _seek_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def advise(mm: mmap.mmap, advice: str, start: int, length: int) -> None:
    """``madvise`` WILLNEED / DONTNEED (fallback: nothing; resident pages are then left to the OS)."""
    if FAST["madvise"]:
        mm.madvise(getattr(mmap, f"MADV_{advice}"), start, length)


def fadvise(fd: int, advice: str, offset: int = 0, length: int = 0) -> None:
    """``posix_fadvise`` WILLNEED (start reading now) / DONTNEED (on Linux this also starts the
    writeback of dirty pages at once, so output reaches the disk while the merge goes on).
    Fallback: nothing (reads and writeback then happen when the OS decides)."""
    if FAST["fadvise"]:
        os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))


def datasync(fd: int) -> None:
    """Data to disk (fallback: fsync)."""
    if FAST["fdatasync"]:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def lock_exclusive(fd: int) -> None:
    """Take an exclusive lock on an open file without waiting (BlockingIOError if held). ``flock``
    locks die with their process; the fallback (``msvcrt`` on Windows, else an O_EXCL-style
    check of the holder's pid written in the file) does the same for a process that is gone."""
    if FAST["flock"]:
        assert fcntl is not None  # FAST["flock"] is only true with fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    msvcrt: ModuleType | None
    try:
        import msvcrt
    except ImportError:
        msvcrt = None
    if msvcrt is not None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    holder = os.read(fd, 200).decode("utf-8", "replace").split()
    os.lseek(fd, 0, os.SEEK_SET)
    if len(holder) >= 2 and holder[0] == "process" and holder[1].isdigit() and int(holder[1]) != os.getpid():
        try:
            os.kill(int(holder[1]), 0)
        except ProcessLookupError:
            return  # the holder is gone
        except PermissionError:
            pass
        raise BlockingIOError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ru_maxrss is in kB on Linux, bytes on macOS
    (psutil's peak on Windows, 0 if unknown)."""
    if resource is None:
        try:
            import psutil
            return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
        except ImportError:
            return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024
