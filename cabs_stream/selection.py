"""What each task vector keeps, per tensor and chunk, for the baseline methods.

Per tensor: the selection mode, weights, densities and rescale factors (parameters may be
filtered by tensor name). For the methods that keep the top of |tau| over a whole tensor or
model, exact thresholds are found first by streaming passes over the chunks, without
holding a tensor:

1. a histogram of the top 16 bits of |tau| (as float32 bits, whose integer order is the
   magnitude order) gives the bin holding the K-th largest value;
2. a histogram of the low 16 bits inside that bin gives the value T itself and how many of
   the elements equal to T are kept (ties go to the lower index, so to the earlier chunks);
3. only if some but not all elements equal to T are kept: a count of them per chunk, so
   each chunk knows its share of that budget.

The merge pass then keeps |tau| > T, and == T within the chunk's budget: chunk-local again.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from . import baseline_kernels as BK
from . import checkpoint
from .config import MergeConfig
from .dtypes import FLOAT_CODES
from .methods import CA, MAGNITUDE, NM, OUTLIERS, RANDOM
from .plan import Plan, TensorJob

NONE_KEPT = np.uint32(0xFFFFFFFF)  # threshold that keeps nothing (with budget 0)


@dataclass(frozen=True)
class TensorSelection:
    """Selection parameters of one tensor (arrays over the k models)."""

    mode: int
    weight: np.ndarray  # float32
    scale: np.ndarray  # float32: 1/density for DARE rescale, else 1
    density: np.ndarray  # float64
    row_k: np.ndarray  # int64: kept per row (row scope)
    ranks: list[tuple[int, int]]  # per model: (K_lo, K_hi) rank targets (K_hi = -1: no band)
    tensor_key: int


def tensor_selection(cfg: MergeConfig, t: TensorJob) -> TensorSelection:
    spec = cfg.spec
    k = len(cfg.models)
    weight = np.array([cfg.model_param("weight", i, t.name, 1.0) for i in range(k)], np.float32)
    density = np.array([cfg.model_param("density", i, t.name, 1.0) for i in range(k)], np.float64)
    gamma = np.array([cfg.model_param("gamma", i, t.name, 0.01) for i in range(k)], np.float64)
    rescale = cfg.shared_param("rescale", t.name, spec.rescale)
    scale = np.array([1.0 / d if rescale and d > 0 else 1.0 for d in density], np.float32)
    scope = cfg.shared_param("scope", t.name, "tensor")
    n = t.numel
    cols = t.shape[-1] if len(t.shape) >= 2 else max(n, 1)
    row_k = np.array([top_count(d, cols) for d in density], np.int64)
    ranks = [(-1, -1)] * k
    if spec.selection == MAGNITUDE:
        mode = BK.SEL_ROW if scope == "row" else BK.SEL_TOP
        ranks = [(top_count(d, n), -1) for d in density]
    elif spec.selection == OUTLIERS:
        mode = BK.SEL_BAND
        ranks = []
        for d, g in zip(density, gamma):
            target, n_top = int(d * n), int(g * n)
            top = n - max(0, n - target - n_top) - target if d < 1 else 0
            ranks.append((top + target, top) if d < 1 else (n, 0))
    elif spec.selection == RANDOM:
        mode = BK.SEL_RANDOM
    elif spec.selection == CA:
        if cfg.shared_param("selection", t.name, "magnitude") == "magnitude":
            mode = BK.SEL_TOP
            ranks = [(top_count(d, n), -1) for d in density]
        else:  # random among the free positions, at the rate that keeps each model's density
            mode = BK.SEL_RANDOM
            taken = 0.0
            for i in cfg.order:
                d = density[i]
                density[i] = min(1.0, d / (1.0 - taken)) if taken < 1 else 0.0
                taken += d
    elif spec.selection == NM:
        mode = BK.SEL_MASK
    else:
        mode = BK.SEL_ALL
    return TensorSelection(mode, weight, scale, density, row_k, ranks, zlib.crc32(t.name.encode()))


def top_count(density: float, n: int) -> int:
    """mergekit's magnitude count: everything at density >= 1, nothing at <= 0, else
    max(1, int(density * n))."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


# ------------------------------------------------------------------ streaming threshold passes
def exclude_prior(taus: np.ndarray, done: list[int], thr: np.ndarray, bud: np.ndarray, count: int) -> np.ndarray:
    """CA over thresholds: zero each task vector where earlier ones (``done``, in pruning order,
    selected by their thresholds) kept; returns the used positions."""
    used = np.zeros(count, bool)
    keep = np.zeros((taus.shape[0], count), np.uint8)
    for i in done:
        taus[i][used] = 0
        BK.select(taus, i, count, BK.SEL_TOP, thr[i, 0], bud[i, 0], thr[i, 1], bud[i, 1], 1, 0, 1.0, 0, i, 0, 0, keep)
        used |= keep[i].astype(bool)
    return used


def _chunk_keys(plan: Plan, index: int, prior=None) -> np.ndarray:
    """|tau| bits (k, count) of one chunk (with ``prior`` = (thr, bud, done): zero where the
    models in ``done`` keep, for CA)."""
    ch = plan.chunks[index]
    t = plan.tensors[ch.tensor]
    k = len(t.fts)
    base, fts = checkpoint.read_chunk(t.base, t.fts, ch.start, ch.count)
    b = np.empty(ch.count, np.float32)
    taus = np.empty((k, ch.count), np.float32)
    BK.decode_chunk(base, FLOAT_CODES[t.base.dtype], fts, np.array([FLOAT_CODES[f.dtype] for f in t.fts]),
                    ch.count, b, taus, False)
    checkpoint.release_chunk((t.base, *t.fts), ch.start, ch.count)
    if prior is not None:
        thr, bud, done = prior
        used = exclude_prior(taus, done, thr[index], bud[index], ch.count)
        taus[:, used] = 0
    return taus.view(np.uint32) & np.uint32(0x7FFFFFFF)


def group_thresholds(plan: Plan, chunks: list[int], ranks: list[tuple[int, int]], prior=None) \
        -> tuple[np.ndarray, np.ndarray]:
    """Thresholds and tie budgets (len(chunks), k, 2) of one group of chunks (a tensor, or the
    whole model), for the rank targets ``ranks[i] = (K_lo, K_hi)`` of each model (-1: none).
    Runs the three passes of the module docstring over the group's chunks, one chunk in memory."""
    k = len(plan.config.models)
    hi = np.zeros((k, 32768), np.int64)
    for c in chunks:  # pass 1
        keys = _chunk_keys(plan, c, prior)
        for i in range(k):
            BK.hist_high(keys[i], hi[i])
    value = np.full((k, 2), NONE_KEPT, np.uint32)
    budget = np.zeros((k, 2), np.int64)
    bins = np.full((k, 2), -1, np.int64)
    above = np.zeros((k, 2), np.int64)
    for i in range(k):
        total = int(hi[i].sum())
        for r, K in enumerate(ranks[i]):
            if K >= total:
                value[i, r] = 0  # every non-zero key is > 0: all kept
            elif K > 0:
                bins[i, r], above[i, r] = _locate(hi[i], K)
    if (bins >= 0).any():
        lo = np.zeros((k, 2, 65536), np.int64)
        for c in chunks:  # pass 2
            keys = _chunk_keys(plan, c, prior)
            for i in range(k):
                for r in range(2):
                    if bins[i, r] >= 0:
                        BK.hist_low(keys[i], bins[i, r], lo[i, r])
        need_eq = False
        for i in range(k):
            for r in range(2):
                if bins[i, r] >= 0:
                    low, above_lo = _locate(lo[i, r], int(ranks[i][r] - above[i, r]))
                    value[i, r] = np.uint32((int(bins[i, r]) << 16) | low)
                    budget[i, r] = ranks[i][r] - above[i, r] - above_lo
                    need_eq |= bool(budget[i, r] < lo[i, r, low])
    thr = np.broadcast_to(value, (len(chunks), k, 2)).copy()
    bud = np.broadcast_to(budget, (len(chunks), k, 2)).copy()
    if (bins >= 0).any() and need_eq:  # pass 3: share the tie budget out in chunk order
        left = budget.copy()
        for n, c in enumerate(chunks):
            keys = _chunk_keys(plan, c, prior)
            for i in range(k):
                for r in range(2):
                    here = BK.count_equal(keys[i], value[i, r])
                    bud[n, i, r] = min(max(left[i, r], 0), here)
                    left[i, r] -= bud[n, i, r]
    return thr, bud


def _locate(hist: np.ndarray, K: int) -> tuple[int, int]:
    """Largest bin b with count(bins >= b) >= K, and count(bins > b)."""
    cum = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(cum, K))
    return len(hist) - 1 - idx, int(cum[idx - 1]) if idx > 0 else 0


def thresholds(plan: Plan, groups: list[list[int]], ranks: list[list[tuple[int, int]]], run,
               ca_order: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds (n_chunks, k, 2) and tie budgets for every chunk of each group (in parallel
    over groups with ``run(fn, args_list)``); with ``ca_order`` one model after another, each
    over the positions the earlier ones did not keep (conflict-aware magnitude selection)."""
    k = len(plan.config.models)
    thr = np.full((len(plan.chunks), k, 2), NONE_KEPT, np.uint32)
    bud = np.zeros((len(plan.chunks), k, 2), np.int64)
    rounds = [(None, list(range(k)))] if ca_order is None else \
        [(list(ca_order[:p]), [i]) for p, i in enumerate(ca_order)]
    for done, models in rounds:
        prior = None if done is None else (thr, bud, done)
        args = [(plan, g, [r if i in models else (-1, -1) for i, r in enumerate(rk)], prior)
                for g, rk in zip(groups, ranks)]
        for g, (t_g, b_g) in zip(groups, run(group_thresholds, args)):
            thr[np.ix_(g, models)], bud[np.ix_(g, models)] = t_g[:, models], b_g[:, models]
    return thr, bud
