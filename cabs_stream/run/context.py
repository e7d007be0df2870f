"""The run context: everything one run opens or caches, closed when the run ends.

``pipeline`` creates a ``RunContext``; every task of the run's graph receives it (or, on a
process pool, a ``ContextRef`` resolved to the copy that pool's initializer installed).
Memory maps, output file descriptors, Zarr handles and per-thread scratch buffers live on
it and are released by ``close()``, on success or error: nothing outlives the run in module
globals, so a run after a failed one, or two runs in two threads, never see each other's state.

It is also the methods' ``ChunkSource``: the one place that reads a chunk's input words
(``read``) and decodes them for the tensor-level passes (``taus``, ``keys``).
"""

from __future__ import annotations

import pickle
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..dtypes import FLOAT_CODES
from ..io.inputs import InputMaps, thread_buffer
from ..io.output import ShardFiles
from ..io.store import TaskVectorStore
from ..io.workstate import SavedMasks, WorkState
from ..layout import ChunkSpec, TensorJob
from ..methods.base import Method
from ..plan import Plan


@dataclass
class RunContext:
    """One run: its plan, method, per-tensor parameters, outputs and open resources."""

    plan: Plan
    method: Method
    prep: list[Any]  # per tensor: the method's prepared parameters (None for copied tensors)
    shards: ShardFiles | None  # None in dry runs (statistics only)
    state: WorkState
    masks: SavedMasks | None = None
    allow_nonfinite: bool = False
    durable: bool = False  # fdatasync each chunk's bytes before recording it done
    store: TaskVectorStore | None = None  # the task-vector store being written (prune / --keep-task-vectors)
    token: str = ""  # identifies the run to its process-pool workers
    maps: InputMaps = field(default_factory=InputMaps)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    closed: bool = False

    def scratch(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A per-thread buffer of this run, reused across chunks (grown when needed)."""
        return thread_buffer(self._local, name, shape, dtype)

    def get(self) -> "RunContext":
        if self.closed:
            raise RuntimeError("this run has ended")
        return self

    # ------------------------------------------------------------------ reading chunks
    @contextmanager
    def read(self, index: int) -> Iterator[tuple[ChunkSpec, TensorJob, np.ndarray, tuple[np.ndarray, ...]]]:
        """The raw words of chunk ``index`` of the base and every model (views of the memory
        maps), released when the block ends."""
        ch = self.plan.chunks[index]
        t = self.plan.tensors[ch.tensor]
        base, fts = self.maps.read_chunk(t.base, t.fts, ch.start, ch.count)
        try:
            yield ch, t, base, fts
        finally:
            del base, fts
            self.maps.release((t.base, *t.fts), ch.start, ch.count)

    def prefetch(self, index: int) -> None:
        """Start reading chunk ``index`` (overlaps I/O with the compute of the chunk before it)."""
        if index < len(self.plan.chunks):
            ch = self.plan.chunks[index]
            t = self.plan.tensors[ch.tensor]
            self.maps.prefetch((t.base, *t.fts), ch.start, ch.count)

    def start(self, index: int) -> int:
        return self.plan.chunks[index].start

    def taus(self, index: int) -> np.ndarray:
        """The task vectors (k, count) of chunk ``index`` as float32 (new arrays)."""
        from ..codec import decode_chunk

        with self.read(index) as (ch, t, base, fts):
            b = np.empty(ch.count, np.float32)
            taus = np.empty((len(t.fts), ch.count), np.float32)
            decode_chunk(base, FLOAT_CODES[t.base.dtype], fts, np.array([FLOAT_CODES[f.dtype] for f in t.fts]),
                         ch.count, b, taus, False)
        return taus

    def keys(self, index: int) -> np.ndarray:
        """|tau| bits (k, count) of chunk ``index``."""
        return self.taus(index).view(np.uint32) & np.uint32(0x7FFFFFFF)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release every resource (idempotent)."""
        self.closed = True
        self.maps.close()
        if self.shards is not None:
            self.shards.close()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        """Shipped to a worker process without its open resources (reopened there on use)."""
        d = dict(self.__dict__)
        d["maps"] = None
        d["_local"] = None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self.maps = InputMaps()
        self._local = threading.local()

    def __enter__(self) -> "RunContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A worker process of a ``processes`` run holds that run's context here, installed by the
# pool initializer; the pool (and the process) ends with the run.
_worker_context: dict[str, RunContext] = {}


def install(blob: bytes) -> None:
    """Pool initializer: unpickle the run's context once per worker process."""
    ctx = pickle.loads(blob)
    _worker_context.clear()
    _worker_context[ctx.token] = ctx


@dataclass(frozen=True)
class ContextRef:
    """A tiny stand-in for the context in tasks sent to a process pool."""

    token: str

    def get(self) -> RunContext:
        try:
            return _worker_context[self.token]
        except KeyError:
            raise RuntimeError("no run context installed in this process") from None
