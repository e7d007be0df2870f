"""Model Stock's chunk kernels (``model_stock.py``): the tensor's dot products and the interpolation."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..codec import put

_U32 = np.uint32


@njit(nogil=True, cache=True)
def dot_products(taus, start, cols, per_row, dots):
    """dots[r, i, l] += sum of tau_i * tau_l (i <= l) over the chunk's elements of row r
    (row 0 for everything unless ``per_row``), in float64, in element order."""
    k = taus.shape[0]
    for j in range(taus.shape[1]):
        r = (start + j) // cols if per_row else 0
        for i in range(k):
            a = np.float64(taus[i, j])
            for l in range(i, k):
                dots[r, i, l] += a * np.float64(taus[l, j])


@njit(nogil=True, cache=True)
def interpolate(b, vals, t, start, cols, per_row, count, out, out_code, masks, stats):
    """W = t * mean_i(W_i) + (1 - t) * W0 in float32 (vals hold the models' weights);
    every non-zero task-vector entry counts as kept."""
    k = vals.shape[0]
    for j in range(count):
        tt = t[(start + j) // cols] if per_row else t[0]
        s = np.float32(0.0)
        for i in range(k):
            v = vals[i, j]
            s += v
            d = np.float32(v - b[j])
            bits = d.view(_U32) & _U32(0x7FFFFFFF)
            if bits != 0:
                stats[i] += 1
                stats[k + i] += 1
                masks[i, j >> 3] |= np.uint8(1 << (j & 7))
                for l in range(i + 1, k):
                    if np.float32(vals[l, j] - b[j]) != 0:
                        stats[3 * k + i * k + l] += 1
            if bits >= _U32(0x7F800000):
                stats[2 * k + i] += 1
        avg = s / np.float32(k)
        put(out, out_code, j, tt * avg + (np.float32(1.0) - tt) * b[j])
