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

from typing import Any, Callable

import numpy as np

from .. import stats, thresholds
from ..dtypes import FLOAT_CODES, ITEMSIZE
from ..errors import CheckpointError
from ..io.checksum import crc
from ..io.safetensors_format import TensorInfo
from ..methods.base import ChunkData
from .context import ContextRef, RunContext

Ref = RunContext | ContextRef


def merge_chunk(ref: Ref, index: int, pre: Any) -> np.ndarray:
    """Merge one chunk; returns its stats row (also recorded in the work state)."""
    ctx = ref.get()
    plan = ctx.plan
    with ctx.read(index) as (ch, t, base, fts):
        k = len(t.fts)
        ctx.prefetch(index + 1)  # overlap I/O with compute: start reading the next chunk
        out = ctx.scratch("out", (ch.count * ITEMSIZE[t.out_dtype] // 2,), np.uint16)
        masks = ctx.scratch("masks", (k, -(-ch.count // 8)), np.uint8)
        masks[:] = 0
        row = np.zeros(stats.width(k), np.int64)
        chunk = ChunkData(ch.ordinal, t, ch.start, ch.count, base, FLOAT_CODES[t.base.dtype], fts,
                          np.array([FLOAT_CODES[f.dtype] for f in t.fts], np.int64), out, FLOAT_CODES[t.out_dtype],
                          masks, row[:stats.kernel_width(k)], ctx.prep[ch.tensor], pre, ctx.scratch, ctx.store)
        ctx.method.merge_chunk(chunk)
        stored = chunk.stored
        del chunk, base, fts
    known = ctx.method.known_counts(len(plan.chunks))
    if known is not None:  # the masks came from a store: their balance was counted when it was written
        row[stats.kernel_width(k):] = known[index, stats.kernel_width(k):]
    else:
        row[stats.kernel_width(k):] = stats.balance(masks, ch.start, ch.count, plan.group, t.shape)

    bad = row[2 * k:3 * k]
    if bad.any() and not ctx.allow_nonfinite:
        i = int(np.flatnonzero(bad)[0])
        raise CheckpointError(f"task vector has {int(bad[i])} NaN/Inf values in elements "
                              f"[{ch.start}, {ch.start + ch.count}); pass `allow_nonfinite=True` to merge anyway",
                              model=plan.config.models[i].path, file=t.fts[i].file, tensor=t.name)
    data = out.data.cast("B")  # .data is memoryview(out)
    if ctx.shards is not None:
        ctx.shards.write(t.shard, data, t.out_start + ch.start * ITEMSIZE[t.out_dtype], sync=ctx.durable)
    if ctx.masks is not None:
        ctx.masks.write(t.name, ch.start, masks)
    if ctx.store is not None:
        ctx.store.write_counts(index, row)
    ctx.state.record(index, row, crc(data), stored if ctx.store is not None else crc(masks))  # now it is done
    return row


def verify(ref: Ref, index: int, row: np.ndarray) -> bool:
    """Whether a recorded chunk can be reused: its row is intact and its bytes in the partial
    output (and masks) still have the recorded CRCs."""
    ctx = ref.get()
    if not ctx.state.intact(index, row):
        return False
    plan = ctx.plan
    ch = plan.chunks[index]
    t = plan.tensors[ch.tensor]
    size = ITEMSIZE[t.out_dtype]
    if ctx.shards is not None:
        data = ctx.shards.read(t.shard, t.out_start + ch.start * size, ch.count * size)
        if data is None or crc(data) != int(row[-3]):
            return False
    try:
        if ctx.store is not None:
            return ctx.store.written_crc(t, ch.start, len(t.fts)) == int(row[-2])
        if ctx.masks is not None:
            return crc(ctx.masks.read(t.name, ch.start, -(-ch.count // 8))) == int(row[-2])
    except Exception:  # noqa: BLE001 - an unreadable store or mask chunk is redone
        return False
    return True


def copy_tensor(ref: Ref, index: int) -> None:
    """Copy a tensor's bytes from the base into the output (integer buffers)."""
    ctx = ref.get()
    t = ctx.plan.tensors[index]
    assert isinstance(t.base, TensorInfo)  # a copied tensor is the base checkpoint's own
    with open(t.base.file, "rb") as src:
        src.seek(t.base.start)
        data = src.read(t.base.nbytes)
    assert ctx.shards is not None  # copies are scheduled only when there is an output (graph.py)
    ctx.shards.write(t.shard, memoryview(data), t.out_start)


def prepass(ref: Ref, tensor: int, chunks: list[int]) -> Any:
    ctx = ref.get()
    return ctx.method.prepass(ctx, ctx.plan.tensors[tensor], chunks, ctx.prep[tensor])


# ------------------------------------------------------------------ scope: global thresholds
def _keys(ctx: RunContext) -> Callable[[int], np.ndarray]:
    return lambda c: ctx.method.threshold_keys(ctx, c)


def high_part(ref: Ref, chunks: list[int], rows: int) -> np.ndarray:
    ctx = ref.get()
    return thresholds.high_histogram(_keys(ctx), chunks, rows)


def locate_high(ranks: list[tuple[int, int]], parts: list[np.ndarray]) -> thresholds.Located:
    return thresholds.locate_high(np.sum(parts, axis=0), ranks)


def low_part(ref: Ref, chunks: list[int], loc: thresholds.Located) -> np.ndarray:
    ctx = ref.get()
    return thresholds.low_histogram(_keys(ctx), chunks, loc)


def locate_low(loc: thresholds.Located, ranks: list[tuple[int, int]], parts: list[np.ndarray]) \
        -> thresholds.Located:
    return thresholds.locate_low(loc, np.sum(parts, axis=0), ranks)


def eq_part(ref: Ref, chunks: list[int], loc: thresholds.Located) -> np.ndarray:
    ctx = ref.get()
    return thresholds.equal_counts(_keys(ctx), chunks, loc)


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
