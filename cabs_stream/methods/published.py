"""CABS as the authors' 2024 scripts computed it (``variant: published-2024``).

For reproducing the paper's numbers (e.g. the 7B recipe: 64:256, lambda 1.2 for both models):
two models only; task vectors and the merge in fp16 (each operation rounded to fp16);
selection by |tau| per group of m where zeros may be claimed; the first model in pruning
order takes its top n; when n >= m/2 the second keeps the complement of the first mask plus
its own top m//2 inside the first mask, otherwise its top n outside it; an incomplete last
group selects nothing. Ties go to the lower index (torch.topk's order is undefined, the one
point where bit-for-bit agreement cannot be promised). Chunk-local like everything else.
"""

from __future__ import annotations

import numpy as np


def _top(mag: np.ndarray, allowed: np.ndarray, q: int) -> np.ndarray:
    """Per row of (groups, m): the q largest mag among allowed positions (zeros included),
    ties to the lower index."""
    key = np.where(allowed, mag.astype(np.float32), -1.0)
    order = np.argsort(-key, axis=1, kind="stable")[:, :q]
    sel = np.zeros(mag.shape, bool)
    np.put_along_axis(sel, order, True, axis=1)
    return sel & allowed


def published_2024(base: np.ndarray, fts: np.ndarray, lam: np.ndarray, n: int, m: int,
                   order: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Merge float32 ``base`` (L,) and ``fts`` (2, L); returns (fp16 result as float32, keep (2, L))."""
    size = base.size
    full = size // m * m
    b16 = base.astype(np.float16)
    taus = [(f.astype(np.float16) - b16) for f in fts]  # fp16 subtraction
    keep = np.zeros((2, size), bool)
    if full:
        first, second = order
        g1 = np.abs(taus[first][:full]).reshape(-1, m)
        g2 = np.abs(taus[second][:full]).reshape(-1, m)
        every = np.ones(g1.shape, bool)
        m1 = _top(g1, every, n)
        if 2 * n >= m:
            m2 = ~m1 | _top(g2, m1, m // 2)
        else:
            m2 = _top(g2, ~m1, n)
        keep[first, :full] = m1.reshape(-1)
        keep[second, :full] = m2.reshape(-1)
    out = b16
    for i in range(2):
        contrib = np.float16(lam[i]) * np.where(keep[i], taus[i], np.float16(0))
        out = out + contrib
    return out.astype(np.float32), keep
