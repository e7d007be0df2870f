"""The run context: everything one run opens or caches, closed when the run ends.

``merge()`` creates a ``RunContext``; every task of the run's graph receives it (or, on a
process pool, a ``ContextRef`` resolved to the copy that pool's initializer installed).
Memory maps, output file descriptors, Zarr handles and per-thread scratch buffers live on
it and are released by ``close()``, on success or error: nothing outlives the run in module
globals, so a run after a failed one, or two runs in two threads, never see each other's state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io.inputs import InputMaps, thread_buffer
from ..io.output import ShardFiles
from ..methods.base import Method
from ..plan import Plan
from .workstate import MaskStore, WorkState


@dataclass
class RunContext:
    """One run: its plan, method, per-tensor parameters, outputs and open resources."""

    plan: Plan
    method: Method
    prep: list[Any]  # per tensor: the method's prepared parameters (None for copied tensors)
    shards: ShardFiles | None  # None in dry runs (statistics only)
    state: WorkState
    masks: MaskStore | None = None
    allow_nonfinite: bool = False
    durable: bool = False  # fdatasync each chunk's bytes before recording it done
    store: Any = None  # TaskVectorStore being written (prune / --keep-task-vectors)
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
    import pickle

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
