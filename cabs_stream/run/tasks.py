"""What each node of a run's graph does. Every task takes the run (or a reference to it).

- ``merge_chunk``: read a chunk's element range of the base and every fine-tuned model through
  the run's memory maps, call the method's chunk function, add the balance counts, write the
  merged bytes into the preallocated shard, store the masks, record the chunk as done;
- ``verify``: on resume, check a recorded chunk's row and its bytes before reusing it;
- ``copy_tensor``: copy a tensor the merge does not touch (integer buffers) from the base;
- ``prepass``: the method's tensor-level pass (thresholds, statistics);
- ``high_part`` ... ``share_global``: the threshold passes of ``scope: global``, one partial
  per tensor and a reduction per pass (``thresholds.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import thresholds
from ..codec import FLOAT_CODES, ITEMSIZE
from ..errors import CheckpointError
from ..methods.base import Chunk
from ..report import counts
from .context import ContextRef, RunContext
from .workstate import crc

Ref = RunContext | ContextRef


def merge_chunk(ref: Ref, index: int, pre: Any) -> np.ndarray:
    """Merge one chunk; returns its stats row (also recorded in the work state)."""
    run = ref.get()
    plan = run.plan
    ch = plan.chunks[index]
    t = plan.tensors[ch.tensor]
    k = len(t.fts)
    base, fts = run.maps.read_chunk(t.base, t.fts, ch.start, ch.count)
    if index + 1 < len(plan.chunks):  # overlap I/O with compute: start reading the next chunk
        nxt = plan.chunks[index + 1]
        tn = plan.tensors[nxt.tensor]
        run.maps.prefetch((tn.base, *tn.fts), nxt.start, nxt.count)
    out = run.scratch("out", (ch.count * ITEMSIZE[t.out_dtype] // 2,), np.uint16)
    masks = run.scratch("masks", (k, -(-ch.count // 8)), np.uint8)
    masks[:] = 0
    stats = np.zeros(counts.width(k), np.int64)
    chunk = Chunk(index, ch.ordinal, t, ch.start, ch.count, base, FLOAT_CODES[t.base.dtype], fts,
                  np.array([FLOAT_CODES[f.dtype] for f in t.fts], np.int64), out, FLOAT_CODES[t.out_dtype],
                  masks, stats[:counts.kernel_width(k)], run.prep[ch.tensor], pre, run.scratch, run.store)
    run.method.merge_chunk(run, chunk)
    stored = chunk.stored
    del chunk, base, fts
    run.maps.release((t.base, *t.fts), ch.start, ch.count)
    known = run.method.known_counts(len(plan.chunks)) if hasattr(run.method, "known_counts") else None
    if known is not None:  # the masks came from a store: their balance was counted when it was written
        stats[counts.kernel_width(k):] = known[index, counts.kernel_width(k):]
    else:
        stats[counts.kernel_width(k):] = counts.balance(masks, ch.start, ch.count, plan.group, t.shape)

    bad = stats[2 * k:3 * k]
    if bad.any() and not run.allow_nonfinite:
        i = int(np.flatnonzero(bad)[0])
        raise CheckpointError(f"task vector has {int(bad[i])} NaN/Inf values in elements "
                              f"[{ch.start}, {ch.start + ch.count}); pass `allow_nonfinite=True` to merge anyway",
                              model=plan.config.models[i].path, file=t.fts[i].file, tensor=t.name)
    data = memoryview(out).cast("B")
    if run.shards is not None:
        run.shards.write(t.shard, data, t.out_start + ch.start * ITEMSIZE[t.out_dtype], sync=run.durable)
    if run.masks is not None:
        run.masks.write(t.name, ch.start, masks)
    if run.store is not None:
        run.store.write_counts(index, stats)
    run.state.record(index, stats, crc(data), stored if run.store is not None else crc(masks))  # now it is done
    return stats


def verify(ref: Ref, index: int, row: np.ndarray) -> bool:
    """Whether a recorded chunk can be reused: its row is intact and its bytes in the partial
    output (and masks) still have the recorded CRCs."""
    run = ref.get()
    if not run.state.intact(index, row):
        return False
    plan = run.plan
    ch = plan.chunks[index]
    t = plan.tensors[ch.tensor]
    size = ITEMSIZE[t.out_dtype]
    if run.shards is not None:
        data = run.shards.read(t.shard, t.out_start + ch.start * size, ch.count * size)
        if data is None or crc(data) != int(row[-3]):
            return False
    try:
        if run.store is not None:
            return run.store.written_crc(t, ch.start, len(t.fts)) == int(row[-2])
        if run.masks is not None:
            return crc(run.masks.read(t.name, ch.start, -(-ch.count // 8))) == int(row[-2])
    except Exception:  # noqa: BLE001 - an unreadable store or mask chunk is redone
        return False
    return True


def copy_tensor(ref: Ref, index: int) -> None:
    """Copy a tensor's bytes from the base into the output (integer buffers)."""
    run = ref.get()
    t = run.plan.tensors[index]
    with open(t.base.file, "rb") as src:
        src.seek(t.base.start)
        data = src.read(t.base.nbytes)
    run.shards.write(t.shard, memoryview(data), t.out_start)


def prepass(ref: Ref, tensor: int, chunks: list[int]) -> Any:
    run = ref.get()
    return run.method.prepass(run, tensor, chunks, run.prep[tensor])


# ------------------------------------------------------------------ scope: global thresholds
def _keys(run: RunContext):
    return lambda c: run.method.threshold_keys(run, c)


def high_part(ref: Ref, chunks: list[int], rows: int) -> np.ndarray:
    run = ref.get()
    return thresholds.high_histogram(_keys(run), chunks, rows)


def locate_high(ranks: list[tuple[int, int]], parts: list[np.ndarray]) -> thresholds.Located:
    return thresholds.locate_high(np.sum(parts, axis=0), ranks)


def low_part(ref: Ref, chunks: list[int], loc: thresholds.Located) -> np.ndarray:
    run = ref.get()
    return thresholds.low_histogram(_keys(run), chunks, loc)


def locate_low(loc: thresholds.Located, ranks: list[tuple[int, int]], parts: list[np.ndarray]) \
        -> thresholds.Located:
    return thresholds.locate_low(loc, np.sum(parts, axis=0), ranks)


def eq_part(ref: Ref, chunks: list[int], loc: thresholds.Located) -> np.ndarray:
    run = ref.get()
    return thresholds.equal_counts(_keys(run), chunks, loc)


def share_global(loc: thresholds.Located, parts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Budgets shared out over every chunk in model order; returned per tensor."""
    thr, bud = thresholds.share(loc, np.concatenate(parts))
    out, pos = [], 0
    for p in parts:
        out.append((thr[pos:pos + len(p)], bud[pos:pos + len(p)]))
        pos += len(p)
    return out


def pick(items: list, i: int) -> Any:
    return items[i]
