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
    row_k = np.array([_top_count(d, cols) for d in density], np.int64)
    ranks = [(-1, -1)] * k
    if spec.selection == MAGNITUDE:
        mode = BK.SEL_ROW if scope == "row" else BK.SEL_TOP
        ranks = [(_top_count(d, n), -1) for d in density]
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
            ranks = [(_top_count(d, n), -1) for d in density]
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


def _top_count(density: float, n: int) -> int:
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
    base = checkpoint.read_words(t.base, ch.start, ch.count, np.dtype(np.uint16))
    fts = tuple(checkpoint.read_words(f, ch.start, ch.count, np.dtype(np.uint16)) for f in t.fts)
    b = np.empty(ch.count, np.float32)
    taus = np.empty((k, ch.count), np.float32)
    BK.decode_chunk(base, FLOAT_CODES[t.base.dtype], fts, np.array([FLOAT_CODES[f.dtype] for f in t.fts]),
                    ch.count, b, taus, False)
    for info in (t.base, *t.fts):
        checkpoint.release(info, ch.start, ch.count)
    if prior is not None:
        thr, bud, done = prior
        used = exclude_prior(taus, done, thr[index], bud[index], ch.count)
        taus[:, used] = 0
    return taus.view(np.uint32) & np.uint32(0x7FFFFFFF)


def hist_pass(plan: Plan, chunks: list[int], bins: np.ndarray | None, prior=None) -> np.ndarray:
    """Pass 1 (bins is None): (k, 32768) counts of the top 16 bits of non-zero keys.
    Pass 2: (k, targets, 65536) counts of the low 16 bits of keys whose top bits equal bins[i, r]."""
    k = len(plan.config.models)
    out = np.zeros((k, 32768) if bins is None else (k, bins.shape[1], 65536), np.int64)
    for c in chunks:
        keys = _chunk_keys(plan, c, prior)
        for i in range(k):
            nz = keys[i][keys[i] != 0]
            if bins is None:
                out[i] += np.bincount(nz >> 16, minlength=32768)
            else:
                for r in range(bins.shape[1]):
                    if bins[i, r] >= 0:
                        sel = nz[(nz >> 16) == bins[i, r]]
                        out[i, r] += np.bincount(sel & 0xFFFF, minlength=65536)
    return out


def eq_pass(plan: Plan, chunks: list[int], thr: np.ndarray, prior=None) -> np.ndarray:
    """Pass 3: (len(chunks), k, targets) counts of keys equal to thr[i, r]."""
    k = len(plan.config.models)
    out = np.zeros((len(chunks), k, thr.shape[1]), np.int64)
    for n, c in enumerate(chunks):
        keys = _chunk_keys(plan, c, prior)
        for i in range(k):
            for r in range(thr.shape[1]):
                out[n, i, r] = np.count_nonzero(keys[i] == thr[i, r])
    return out


def _locate(hist: np.ndarray, K: int) -> tuple[int, int]:
    """Largest bin b with count(bins >= b) >= K, and count(bins > b)."""
    cum = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(cum, K))
    return len(hist) - 1 - idx, int(cum[idx - 1]) if idx > 0 else 0


def thresholds(plan: Plan, groups: list[list[int]], ranks: list[list[tuple[int, int]]], run,
               ca_order: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds for all models at once, or with ``ca_order`` one model after another, each
    over the positions the earlier ones did not keep (conflict-aware magnitude selection)."""
    if ca_order is None:
        return _thresholds(plan, groups, ranks, run)
    k = len(plan.config.models)
    thr = np.full((len(plan.chunks), k, 2), NONE_KEPT, np.uint32)
    bud = np.zeros((len(plan.chunks), k, 2), np.int64)
    for p, i in enumerate(ca_order):
        only = [[r if j == i else (-1, -1) for j, r in enumerate(g)] for g in ranks]
        t_i, b_i = _thresholds(plan, groups, only, run, prior=(thr, bud, list(ca_order[:p])))
        thr[:, i], bud[:, i] = t_i[:, i], b_i[:, i]
    return thr, bud


def _thresholds(plan: Plan, groups: list[list[int]], ranks: list[list[tuple[int, int]]], run,
                prior=None) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds (n_chunks, k, 2) and budgets for every chunk of each group of chunks.

    ``groups`` are lists of chunk indices sharing one threshold (a tensor, or the whole model),
    ``ranks[g][i]`` the (K_lo, K_hi) targets of model i in group g, and ``run(fn, args_list)``
    maps a pass over the groups (in parallel)."""
    k = len(plan.config.models)
    thr = np.full((len(plan.chunks), k, 2), NONE_KEPT, np.uint32)
    bud = np.zeros((len(plan.chunks), k, 2), np.int64)
    h1 = run(hist_pass, [(plan, g, None, prior) for g in groups])
    bins = np.full((len(groups), k, 2), -1, np.int64)
    above = np.zeros((len(groups), k, 2), np.int64)
    targets = np.zeros((len(groups), k, 2), np.int64)
    keep_all = np.zeros((len(groups), k, 2), bool)
    for gi, hist in enumerate(h1):
        for i in range(k):
            total = int(hist[i].sum())
            for r, K in enumerate(ranks[gi][i]):
                if K < 0:
                    continue
                targets[gi, i, r] = K
                if K >= total:
                    keep_all[gi, i, r] = True
                elif K > 0:
                    bins[gi, i, r], above[gi, i, r] = _locate(hist[i], K)
    h2 = run(hist_pass, [(plan, g, bins[gi], prior) for gi, g in enumerate(groups)])
    value = np.full((len(groups), k, 2), NONE_KEPT, np.uint32)
    budget = np.zeros((len(groups), k, 2), np.int64)
    need_eq = []
    for gi, hist in enumerate(h2):
        for i in range(k):
            for r in range(2):
                if keep_all[gi, i, r]:
                    value[gi, i, r], budget[gi, i, r] = 0, 0  # every non-zero key is > 0
                elif bins[gi, i, r] >= 0:
                    lo, above_lo = _locate(hist[i, r], int(targets[gi, i, r] - above[gi, i, r]))
                    value[gi, i, r] = np.uint32((int(bins[gi, i, r]) << 16) | lo)
                    budget[gi, i, r] = targets[gi, i, r] - above[gi, i, r] - above_lo
                    if budget[gi, i, r] < hist[i, r, lo]:
                        need_eq.append(gi)
    need = sorted(set(need_eq))
    eq = dict(zip(need, run(eq_pass, [(plan, groups[gi], value[gi], prior) for gi in need])))
    for gi, g in enumerate(groups):
        left = budget[gi].copy()
        for n, c in enumerate(g):
            thr[c] = value[gi]
            if gi in eq:
                here = eq[gi][n]
                bud[c] = np.clip(left, 0, here)
                left = left - bud[c]
            else:
                bud[c] = budget[gi]  # all elements equal to T are kept (or none exist)
    return thr, bud
