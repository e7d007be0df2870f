"""Plain-numpy references of every rule in cabs-algorithm.md, used only by the tests.

Written for clarity, not speed: a loop over groups, ``np.lexsort`` for the tie rule,
``ml_dtypes`` and numpy (independent implementations) for bfloat16 and float16 rounding.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

NUMPY_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def decode_ref(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian words (uint16 view) -> float32, via ml_dtypes / numpy."""
    return np.ascontiguousarray(raw, np.uint16).view(NUMPY_DTYPES[dtype]).astype(np.float32)


def encode_ref(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw words of ``dtype`` (round to nearest even), via ml_dtypes / numpy, as uint16."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf and NaN casts are the point
        return np.ascontiguousarray(values, np.float32).astype(NUMPY_DTYPES[dtype]).view(np.uint16)


def tail_quota(n: int, r: int, m: int) -> int:
    """Quota of a final short group of r < m elements (the tail rule)."""
    return math.floor(n * r / m + 0.5)


def top_q(tau: np.ndarray, eligible: np.ndarray, q: int) -> np.ndarray:
    """Mask of the q largest |tau| among eligible non-zero positions, ties to the lower index."""
    cand = np.flatnonzero(eligible & (tau != 0))
    order = np.lexsort((cand, -np.abs(tau[cand])))  # by |tau| descending, then index ascending
    sel = np.zeros(tau.shape, bool)
    sel[cand[order[:max(q, 0)]]] = True
    return sel


def nm_masks_ref(taus: list[np.ndarray], n: int | list[int], m: int, order: list[int] | None = None,
                 overlap: str = "fill") -> list[np.ndarray]:
    """CABS masks: n:m per group of the flat tensor (``n`` one for all or one per model),
    sequential in ``order``, CA excluding used."""
    k, size = len(taus), taus[0].size
    ns = list(n) if isinstance(n, (list, tuple)) else [n] * k
    order = list(range(k)) if order is None else order
    used = np.zeros(size, bool)
    masks = [np.zeros(size, bool) for _ in range(k)]
    for i in order:
        for g0 in range(0, size, m):
            grp = slice(g0, min(g0 + m, size))
            r = grp.stop - g0
            q = ns[i] if r == m else tail_quota(ns[i], r, m)
            sel = top_q(taus[i][grp], ~used[grp], q)
            if overlap == "fill" and sel.sum() < q:
                sel |= top_q(taus[i][grp], used[grp], q - int(sel.sum()))
            masks[i][grp] = sel
        used |= masks[i]
    return masks


def combine_ref(base: np.ndarray, taus: list[np.ndarray], masks: list[np.ndarray],
                lam: list[float]) -> np.ndarray:
    """W = W0 + sum_i lam_i * mask_i * tau_i in float32, summed in the models' listed order;
    a position no task vector keeps is the base value exactly."""
    acc = np.zeros(base.shape, np.float32)
    for t, mk, w in zip(taus, masks, lam):
        acc[mk] = acc[mk] + np.float32(w) * t[mk]
    anyk = np.logical_or.reduce(masks)
    return np.where(anyk, base + acc, base).astype(np.float32)


def merge_ref(base: np.ndarray, fts: list[np.ndarray], lam: list[float], method: str = "cabs",
              n: int | list[int] = 64, m: int = 256, order: list[int] | None = None,
              overlap: str = "fill") -> tuple[np.ndarray, list[np.ndarray]]:
    """Reference merge of flat float32 tensors: returns the float32 result and the masks."""
    base = base.astype(np.float32).ravel()
    taus = [(f.astype(np.float32).ravel() - base).astype(np.float32) for f in fts]
    if method == "task_arithmetic":
        masks = [t != 0 for t in taus]
    else:
        masks = nm_masks_ref(taus, n, m, order, overlap)
    return combine_ref(base, taus, masks, lam), masks


# ---------------------------------------------------------------- baseline methods
M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform_ref(seed: int, model: int, tensor_key: int, index: int) -> float:
    """Counter-based uniform draw keyed by (seed, model, tensor, element index)."""
    return (_mix(_mix(_mix(_mix(seed) ^ model) ^ tensor_key) ^ index) >> 11) / 2.0**53


def top_count(density: float, n: int) -> int:
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def band_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """breadcrumbs: (kept ranks end, outliers dropped from the top), mergekit's arithmetic."""
    if density >= 1:
        return n, 0
    target, n_top = int(density * n), int(gamma * n)
    top = n - max(0, n - target - n_top) - target
    return top + target, top


def select_ref(tau: np.ndarray, how: str, *, density=1.0, gamma=0.01, cols=None, seed=0, model=0,
               tensor_key=0) -> np.ndarray:
    """Mask of one task vector (flat) for the baseline selections."""
    nz = tau != 0
    if how == "all":
        return nz
    if how == "magnitude":
        return top_q(tau, nz, top_count(density, tau.size))
    if how == "row":
        rows = tau.reshape(-1, cols)
        return np.concatenate([top_q(r, r != 0, top_count(density, cols)) for r in rows])
    if how == "band":
        hi, lo = band_counts(density, gamma, tau.size)
        return top_q(tau, nz, hi) & ~top_q(tau, nz, lo)
    if how == "random":
        u = np.array([uniform_ref(seed, model, tensor_key, j) for j in range(tau.size)])
        return nz & (u < density)
    raise ValueError(how)


def combine_methods_ref(base, vals, keeps, w, scale, consensus=False, normalize=False, lam=1.0, linear=False):
    """mergekit's generalized task arithmetic (and linear), element by element in float32."""
    base = base.astype(np.float32)
    k = len(vals)
    w = np.asarray(w, np.float32)
    if linear:
        s = np.zeros_like(base)
        for i in range(k):
            s = s + (vals[i] * np.float32(1.0)) * w[i]
        total = w.sum(dtype=np.float32)
        return (s / total) if normalize and total != 0 else s  # weights summing to 0: no division
    wd = [np.where(keeps[i], (vals[i] * np.float32(scale[i])).astype(np.float32) * w[i], np.float32(0)).astype(np.float32)
          for i in range(k)]
    s = np.zeros_like(base)
    for x in wd:
        s = s + x
    if consensus:
        maj = np.where(s >= 0, np.float32(1), np.float32(-1))
        mixed = np.zeros_like(base)
        div = np.zeros_like(base)
        for i in range(k):
            agree = np.sign(wd[i]) == maj
            mixed = mixed + np.where(agree, wd[i], np.float32(0))
            div = div + np.where(agree, w[i], np.float32(0))
        div[div == 0] = 1
    else:
        mixed = s
        div = np.full_like(base, w.sum(dtype=np.float32))
        div[np.abs(div) < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * np.float32(lam)
    anyk = np.logical_or.reduce(keeps)
    return np.where(anyk, base + mixed, base).astype(np.float32)


# ---------------------------------------------------------------- della, sce, model_stock
def sequential_sum(x: np.ndarray) -> float:
    """Left-to-right float64 sum (the order the streaming statistics use)."""
    return float(np.cumsum(np.asarray(x, np.float64))[-1]) if np.size(x) else 0.0


def della_ref(tau: np.ndarray, cols: int, density: float, epsilon: float, *, seed=0, model=0, tensor_key=0,
              rescale=True, start=0) -> tuple[np.ndarray, np.ndarray]:
    """MAGPRUNE on one flat task vector: (kept mask, values after the 1/p rescale)."""
    keep = np.zeros(tau.size, bool)
    out = tau.astype(np.float32).copy()
    for r0 in range(0, tau.size, cols):
        row = tau[r0:r0 + cols]
        order = np.lexsort((np.arange(cols), np.abs(row)))  # |tau| ascending, ties: lower index first
        rank = np.empty(cols, np.int64)
        rank[order] = np.arange(cols)
        p = np.full(cols, density) if cols == 1 else (density - epsilon) + 2.0 * epsilon * rank / (cols - 1)
        u = np.array([uniform_ref(seed, model, tensor_key, start + r0 + j) for j in range(cols)])
        k = (row != 0) & (u < p)
        keep[r0:r0 + cols] = k
        if rescale:
            out[r0:r0 + cols][k] = (row[k].astype(np.float64) / p[k]).astype(np.float32)
    return keep, out


def variance_ref(tv: np.ndarray) -> np.ndarray:
    """Population variance over the models (axis 0), float32, two passes in model order."""
    k = tv.shape[0]
    s = np.zeros(tv.shape[1], np.float32)
    for i in range(k):
        s = s + tv[i]
    mean = s / np.float32(k)
    q = np.zeros(tv.shape[1], np.float32)
    for i in range(k):
        d = tv[i] - mean
        q = q + d * d
    return q / np.float32(k)


def sce_ref(base: np.ndarray, fts: list[np.ndarray], topk: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """mergekit's sce (select by variance, weights by mean square, erase minority signs)."""
    base = base.astype(np.float32).ravel()
    tv = np.stack([f.astype(np.float32).ravel() - base for f in fts]).astype(np.float32)
    k, n = tv.shape
    if topk < 1:
        var = variance_ref(tv)
        sel = top_q(var, np.ones(n, bool), int(np.count_nonzero(var) * max(topk, 0)))
    else:
        sel = np.ones(n, bool)
    tvm = np.where(sel, tv, np.float32(0)).astype(np.float32)
    ms = np.array([sequential_sum(tvm[i].astype(np.float64) ** 2) for i in range(k)]) / max(n, 1)
    total = ms.sum()
    w = (np.full(k, 1.0 / k) if abs(total) < 1e-6 else ms / total).astype(np.float32)
    s = np.zeros(n, np.float32)
    for i in range(k):
        s = s + tvm[i]
    pos = s >= 0
    agree = [((tvm[i] > 0) & pos) | ((tvm[i] < 0) & ~pos) for i in range(k)]
    mixed = np.zeros(n, np.float32)
    div = np.zeros(n, np.float32)
    for i in range(k):
        mixed = mixed + np.where(agree[i], tv[i] * w[i], np.float32(0))
        div = div + np.where(agree[i], w[i], np.float32(0))
    anyk = np.logical_or.reduce(agree) & sel
    res = np.where(anyk, base + mixed / np.maximum(div, np.float32(1e-6)), base).astype(np.float32)
    return res, agree


def model_stock_ref(base: np.ndarray, fts: list[np.ndarray], cols: int | None) -> np.ndarray:
    """mergekit's model_stock; ``cols``: one ratio per row of that many elements (filter_wise), else per tensor."""
    base = base.astype(np.float32).ravel()
    ws = [f.astype(np.float32).ravel() for f in fts]
    k, n = len(ws), base.size
    cols = cols or max(n, 1)
    tv = [w - base for w in ws]
    t = np.zeros(max(n // cols, 1), np.float32)
    for r in range(len(t)):
        seg = slice(r * cols, (r + 1) * cols)
        norm = [math.sqrt(sequential_sum(tv[i][seg].astype(np.float64) ** 2)) for i in range(k)]
        cos = []
        for i in range(k):
            for j in range(i + 1, k):
                dot = sequential_sum(tv[i][seg].astype(np.float64) * tv[j][seg].astype(np.float64))
                cos.append(min(max(dot / max(norm[i] * norm[j], 1e-6), -1.0), 1.0))
        c = sum(cos) / len(cos)
        den = 1 + (k - 1) * c
        t[r] = 0.0 if abs(den) < 1e-6 else k * c / den
    s = np.zeros(n, np.float32)
    for w in ws:
        s = s + w
    avg = s / np.float32(k)
    tt = np.repeat(t, cols)[:n] if len(t) > 1 else np.full(n, t[0], np.float32)
    return (tt * avg + (np.float32(1) - tt) * base).astype(np.float32)
