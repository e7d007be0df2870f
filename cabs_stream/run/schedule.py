"""Running a run's graph on the chosen Dask scheduler.

threads (default: the kernels release the GIL), processes (a pool made for this run only; its
initializer installs the run's context once per worker process, and tasks carry a small
``ContextRef``) or synchronous. The pool belongs to the run: on success or error it is shut
down and every task in flight has finished before ``execute`` returns, so no task of a run
outlives it.
"""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import dask
import dask.multiprocessing
import dask.threaded

from .context import ContextRef, RunContext, install


def reference(ctx: RunContext, scheduler: str) -> RunContext | ContextRef:
    """What the graph's tasks carry to reach the run."""
    return ContextRef(ctx.token) if scheduler == "processes" else ctx


def execute(ctx: RunContext, dsk: dict, keys: list, scheduler: str, workers: int,
            callbacks: tuple = ()) -> list[Any]:
    """Compute ``keys`` of ``dsk``; returns their results in order."""
    if not keys:
        return []
    cbs = [c._callback for c in callbacks]
    if scheduler == "synchronous":
        return list(dask.get(dsk, keys, callbacks=cbs))
    if scheduler == "threads":
        pool: Executor = ThreadPoolExecutor(workers, thread_name_prefix="cabs-stream")
        try:
            return list(dask.threaded.get(dsk, keys, num_workers=workers, pool=pool, callbacks=cbs))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    blob = pickle.dumps(ctx)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=install,
                               initargs=(blob,))
    try:
        return list(dask.multiprocessing.get(dsk, keys, num_workers=workers, pool=pool, callbacks=cbs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
