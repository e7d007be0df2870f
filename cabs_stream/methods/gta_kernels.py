"""Numba kernels of generalized task arithmetic (TIES, DARE, DELLA, magnitude, breadcrumbs...).

A chunk is decoded into float32 task vectors (``codec.decode_chunk``), each task vector is
pruned by one selection (a threshold found beforehand by ``thresholds.py``, a per-row top-k,
a counter-based random draw, DELLA's rank-based draw, or all non-zero entries), and the kept
values are combined with mergekit's formula (weights, optional TIES sign election, optional
normalization, lambda). Plain-numpy references live in tests/reference.py. CABS and plain
task arithmetic run in the fused kernel (``nm_kernel.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..codec import ABS_BITS as _ABS
from ..codec import EXP_BITS as _EXP
from ..codec import put

SEL_ALL, SEL_TOP, SEL_BAND, SEL_ROW, SEL_RANDOM = 0, 1, 2, 3, 4

_U32 = np.uint32
_U64 = np.uint64


@njit(inline="always")
def _mix(z):
    """splitmix64 finalizer."""
    z = _U64(z + _U64(0x9E3779B97F4A7C15))
    z = _U64((z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9))
    z = _U64((z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB))
    return _U64(z ^ (z >> _U64(31)))


@njit(inline="always")
def uniform(seed, model, tensor_key, index):
    """A uniform draw in [0, 1) keyed by (seed, model, tensor, element index): the same for any
    chunking, worker count or scheduler."""
    u = _mix(_mix(_mix(_mix(_U64(seed)) ^ _U64(model)) ^ _U64(tensor_key)) ^ _U64(index))
    return np.float64(u >> _U64(11)) * (1.0 / 9007199254740992.0)


@njit(nogil=True, cache=True)
def uniforms(seed, model, tensor_key, start, count):
    """The draws of elements [start, start + count) (used by the tests)."""
    out = np.empty(count, np.float64)
    for j in range(count):
        out[j] = uniform(seed, model, tensor_key, start + j)
    return out


@njit(nogil=True, cache=True)
def select(taus, i, count, mode, t_lo, b_lo, t_hi, b_hi, cols, row_k, density, seed, model,
           tensor_key, start, keep):
    """keep[i, j] = 1 where task vector i keeps element j (zeros are never kept).

    SEL_TOP: key > t_lo, or key == t_lo for the first b_lo such elements of the chunk.
    SEL_BAND: in the top set of (t_lo, b_lo) and not in the top set of (t_hi, b_hi).
    SEL_ROW: the row_k largest of each row of ``cols`` elements (ties to the lower index).
    SEL_RANDOM: uniform(seed, model, tensor, start + j) < density. SEL_ALL: every non-zero.
    """
    eq_lo = 0
    eq_hi = 0
    if mode == SEL_ROW:
        keys = np.empty(cols, np.int64)
        for r0 in range(0, count, cols):
            for j in range(cols):
                keys[j] = -np.int64(np.float32(taus[i, r0 + j]).view(_U32) & _ABS)
                keep[i, r0 + j] = 0
            order = np.argsort(keys, kind="mergesort")  # stable: ties keep the lower index first
            for p in range(min(row_k, cols)):
                j = order[p]
                if keys[j] == 0:
                    break
                keep[i, r0 + j] = 1
        return
    for j in range(count):
        key = np.float32(taus[i, j]).view(_U32) & _ABS
        if key == 0:
            keep[i, j] = 0
            continue
        if mode == SEL_ALL:
            k = True
        elif mode == SEL_RANDOM:
            k = uniform(seed, model, tensor_key, start + j) < density
        else:
            k = key > t_lo
            if key == t_lo:
                k = eq_lo < b_lo
                eq_lo += 1
            if mode == SEL_BAND and k:
                top = key > t_hi
                if key == t_hi:
                    top = eq_hi < b_hi
                    eq_hi += 1
                k = not top
            elif mode == SEL_BAND and key == t_hi:
                eq_hi += 1
        keep[i, j] = 1 if k else 0


@njit(nogil=True, cache=True)
def della_select(taus, i, count, cols, density, epsilon, rescale, seed, model, tensor_key, start, keep):
    """DELLA's MAGPRUNE on task vector i: in each row of ``cols`` elements, rank r = 0..cols-1
    by |tau| ascending (ties: lower index first), keep probability
    p = density - epsilon + 2 * epsilon * r / (cols - 1) (p = density for a one-element row),
    keep where uniform(seed, model, tensor, start + j) < p and tau != 0; with ``rescale`` a kept
    value becomes float32(tau / p) (computed in float64)."""
    keys = np.empty(cols, np.int64)
    for r0 in range(0, count, cols):
        for j in range(cols):
            keys[j] = np.int64(np.float32(taus[i, r0 + j]).view(_U32) & _ABS)
        order = np.argsort(keys, kind="mergesort")  # stable: ties rank the lower index first
        for rank in range(cols):
            j = order[rank]
            p = density if cols == 1 else (density - epsilon) + 2.0 * epsilon * rank / (cols - 1)
            kept = keys[j] != 0 and uniform(seed, model, tensor_key, start + r0 + j) < p
            keep[i, r0 + j] = 1 if kept else 0
            if kept and rescale:
                taus[i, r0 + j] = np.float32(np.float64(taus[i, r0 + j]) / p)


@njit(nogil=True, cache=True)
def combine(b, vals, keep, w, scale, consensus, normalize, lam, linear, count, out, out_code, masks, stats):
    """Combine kept values and write the output words; pack masks and add counts to ``stats``
    (layout as in kernels.merge_chunk).

    Task vectors (mergekit's generalized task arithmetic): d_i = tau_i * scale_i where kept,
    wd_i = d_i * w_i; with ``consensus`` the sign of sum_i wd_i is elected and only agreeing
    entries are summed (their weights form the divisor), else all (divisor sum_i w_i); with
    ``normalize`` the sum is divided by the divisor; then times lam; W = W0 + that, or W0
    exactly where nothing is kept. ``linear``: W = sum_i w_i W_i (/ sum_i w_i if normalize).
    """
    k = vals.shape[0]
    wd = np.empty(k, np.float32)
    for j in range(count):
        s = np.float32(0.0)
        anyk = False
        for i in range(k):
            v = vals[i, j]
            bits = np.float32(v).view(_U32)
            if not linear:
                if (bits & _ABS) != 0:
                    stats[k + i] += 1
                if (bits & _EXP) == _EXP:
                    stats[2 * k + i] += 1
            kept = keep[i, j] != 0 or linear
            x = np.float32(0.0)
            if kept:
                x = np.float32(v * scale[i]) * w[i]
                anyk = True
                if not linear:
                    stats[i] += 1
                    masks[i, j >> 3] |= np.uint8(1 << (j & 7))
                    for l in range(i + 1, k):
                        if keep[l, j] != 0:
                            stats[3 * k + i * k + l] += 1
            wd[i] = x
            s += x
        if linear:
            div = np.float32(0.0)
            for i in range(k):
                div += w[i]
            res = s / div if normalize and div != 0 else s
            put(out, out_code, j, res)
            continue
        if not anyk:
            put(out, out_code, j, b[j])
            continue
        if consensus:
            maj = np.float32(1.0) if s >= 0 else np.float32(-1.0)
            mixed = np.float32(0.0)
            div = np.float32(0.0)
            for i in range(k):
                x = wd[i]
                if (x > 0 and maj > 0) or (x < 0 and maj < 0):
                    mixed += x
                    div += w[i]
            if div == 0:
                div = np.float32(1.0)
        else:
            mixed = s
            div = np.float32(0.0)
            for i in range(k):
                div += w[i]
            if abs(div) < 1e-8:
                div = np.float32(1.0)
        if normalize:
            mixed = mixed / div
        if lam != 1:
            mixed = mixed * lam
        put(out, out_code, j, b[j] + mixed)
