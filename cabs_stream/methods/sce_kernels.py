"""SCE's chunk kernels (``sce.py``): variance across the models, sums of squares, erase and combine."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..codec import put

_U32 = np.uint32


@njit(nogil=True, cache=True)
def variance(vals, count, var):
    """var[j] = population variance of vals[:, j] over the models (float32, two passes)."""
    k = vals.shape[0]
    for j in range(count):
        s = np.float32(0.0)
        for i in range(k):
            s += vals[i, j]
        mean = s / np.float32(k)
        q = np.float32(0.0)
        for i in range(k):
            d = vals[i, j] - mean
            q += d * d
        var[j] = q / np.float32(k)


@njit(nogil=True, cache=True)
def sum_squares(vals, sel, count, acc):
    """acc[i] += sum of vals[i, j]**2 over selected j, in float64, in element order."""
    for i in range(vals.shape[0]):
        a = acc[i]
        for j in range(count):
            if sel[0, j] != 0:
                v = np.float64(vals[i, j])
                a += v * v
        acc[i] = a


@njit(nogil=True, cache=True)
def erase_combine(b, vals, sel, w, count, out, out_code, masks, stats):
    """Step 3 on one chunk (stats layout as in nm_kernel.merge_chunk)."""
    k = vals.shape[0]
    for j in range(count):
        s = np.float32(0.0)
        for i in range(k):
            v = vals[i, j]
            bits = np.float32(v).view(_U32) & _U32(0x7FFFFFFF)
            if bits != 0:
                stats[k + i] += 1
            if bits >= _U32(0x7F800000):
                stats[2 * k + i] += 1
            if sel[0, j] != 0:
                s += v
        if sel[0, j] == 0:
            put(out, out_code, j, b[j])
            continue
        positive = s >= 0
        mixed = np.float32(0.0)
        div = np.float32(0.0)
        anyk = False
        for i in range(k):
            v = vals[i, j]
            if (v > 0 and positive) or (v < 0 and not positive):
                mixed += v * w[i]
                div += w[i]
                anyk = True
                stats[i] += 1
                masks[i, j >> 3] |= np.uint8(1 << (j & 7))
                for l in range(i + 1, k):
                    x = vals[l, j]
                    if (x > 0 and positive) or (x < 0 and not positive):
                        stats[3 * k + i * k + l] += 1
        if not anyk:
            put(out, out_code, j, b[j])
            continue
        put(out, out_code, j, b[j] + mixed / max(div, np.float32(1e-6)))
