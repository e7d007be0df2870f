"""Plain-numpy references of every rule in cabs-algorithm.md, used only by the tests.

Written for clarity, not speed: a loop over groups, ``np.lexsort`` for the tie rule, torch
(an independent implementation) for bfloat16 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def decode_ref(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian words (uint16 view) -> float32, via torch."""
    data = torch.frombuffer(bytearray(raw.tobytes()), dtype=TORCH_DTYPES[dtype]) if raw.size else torch.empty(0)
    return data.to(torch.float32).numpy()


def encode_ref(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw words of ``dtype`` (round to nearest even), via torch, as uint16."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(TORCH_DTYPES[dtype])
    return t.view(torch.int16).numpy().view(np.uint16) if dtype != "F32" else \
        t.numpy().view(np.uint16)


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


def nm_masks_ref(taus: list[np.ndarray], n: int, m: int, order: list[int] | None = None,
                 overlap: str = "fill") -> list[np.ndarray]:
    """CABS masks: n:m per group of the flat tensor, sequential in ``order``, CA excluding used."""
    k, size = len(taus), taus[0].size
    order = list(range(k)) if order is None else order
    used = np.zeros(size, bool)
    masks = [np.zeros(size, bool) for _ in range(k)]
    for i in order:
        for g0 in range(0, size, m):
            grp = slice(g0, min(g0 + m, size))
            r = grp.stop - g0
            q = n if r == m else tail_quota(n, r, m)
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
              n: int = 64, m: int = 256, order: list[int] | None = None,
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
        return (s / w.sum(dtype=np.float32)) if normalize else s
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
