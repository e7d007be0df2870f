"""Numba kernels: decode raw words, form task vectors, select n:m with CA, sum, encode.

Everything a chunk needs happens in ``merge_chunk``, one group of m elements at a time, in
scratch buffers of O(k*m) allocated once per call: no per-group allocation and no Python in
the per-element loop. Inputs are raw little-endian words viewed as ``uint16`` (an fp32
element is two words), so bf16 needs no torch and fp16/fp32 need no conversion pass.
Each kernel has a plain-numpy reference in ``tests/reference.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dtypes import BF16, F16, F32

#: Selection modes of ``merge_chunk``.
KEEP_ALL = 0  # task arithmetic: every non-zero entry of every task vector
NM_CA = 1  # CABS: n:m per group, sequential, excluding positions already kept

_U16 = np.uint16
_U32 = np.uint32
_U64 = np.uint64
_ABS = _U32(0x7FFFFFFF)
_EXP = _U32(0x7F800000)


# --------------------------------------------------------------------------- decoding
@njit(inline="always")
def half_to_float(h):
    """IEEE binary16 bits -> float32 (exact)."""
    h = _U32(h)
    sign = _U32((h & _U32(0x8000)) << _U32(16))
    exp = (h >> _U32(10)) & _U32(0x1F)
    mant = h & _U32(0x3FF)
    if exp == 0:
        v = np.float32(mant) * np.float32(5.9604644775390625e-08)  # mant * 2**-24, exact
        return _U32(np.float32(v).view(_U32) | sign).view(np.float32)
    if exp == 31:
        return _U32(sign | _U32(0x7F800000) | (mant << _U32(13))).view(np.float32)
    return _U32(sign | ((exp + _U32(112)) << _U32(23)) | (mant << _U32(13))).view(np.float32)


@njit(inline="always")
def load(words, code, i):
    """Element ``i`` of a raw word buffer holding ``code`` data, as float32."""
    if code == BF16:
        return _U32(_U32(words[i]) << _U32(16)).view(np.float32)
    if code == F16:
        return half_to_float(words[i])
    return _U32(_U32(words[2 * i]) | (_U32(words[2 * i + 1]) << _U32(16))).view(np.float32)


# --------------------------------------------------------------------------- encoding
@njit(inline="always")
def float_to_bfloat(bits):
    """float32 bits -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN."""
    if (bits & _ABS) > _EXP:
        return _U16((bits >> _U32(16)) | _U32(0x40))
    return _U16((bits + _U32(0x7FFF) + ((bits >> _U32(16)) & _U32(1))) >> _U32(16))


@njit(inline="always")
def float_to_half(f):
    """float32 bits -> binary16 bits, round to nearest even (numpy's algorithm)."""
    h_sgn = _U32((f & _U32(0x80000000)) >> _U32(16))
    f_exp = f & _EXP
    if f_exp >= _U32(0x47800000):
        if f_exp == _EXP:
            f_sig = f & _U32(0x007FFFFF)
            if f_sig != 0:
                ret = _U32(0x7C00) + (f_sig >> _U32(13))
                if ret == _U32(0x7C00):
                    ret += _U32(1)
                return _U16(h_sgn + ret)
            return _U16(h_sgn + _U32(0x7C00))
        return _U16(h_sgn + _U32(0x7C00))
    if f_exp <= _U32(0x38000000):
        if f_exp < _U32(0x33000000):
            return _U16(h_sgn)
        e = f_exp >> _U32(23)
        f_sig = _U32(0x00800000) + (f & _U32(0x007FFFFF))
        f_sig = f_sig >> (_U32(113) - e)
        if ((f_sig & _U32(0x3FFF)) != _U32(0x1000)) or ((f & _U32(0x7FF)) != 0):
            f_sig += _U32(0x1000)
        return _U16(h_sgn + (f_sig >> _U32(13)))
    h_exp = _U32((f_exp - _U32(0x38000000)) >> _U32(13))
    f_sig = f & _U32(0x007FFFFF)
    if (f_sig & _U32(0x3FFF)) != _U32(0x1000):
        f_sig += _U32(0x1000)
    return _U16(h_sgn + h_exp + (f_sig >> _U32(13)))


@njit(inline="always")
def store(out, code, i, v):
    """Write float32 ``v`` as element ``i`` of a raw word buffer holding ``code`` data."""
    bits = np.float32(v).view(_U32)
    if code == BF16:
        out[i] = float_to_bfloat(bits)
    elif code == F16:
        out[i] = float_to_half(bits)
    else:
        out[2 * i] = _U16(bits & _U32(0xFFFF))
        out[2 * i + 1] = _U16(bits >> _U32(16))


@njit(nogil=True, cache=True)
def decode(words, code, count):
    """Raw words -> float32 array of ``count`` elements."""
    res = np.empty(count, np.float32)
    for i in range(count):
        res[i] = load(words, code, i)
    return res


@njit(nogil=True, cache=True)
def encode(values, code, out):
    """float32 array -> raw words of ``code`` data written into ``out``."""
    for i in range(values.shape[0]):
        store(out, code, i, values[i])


# --------------------------------------------------------------------------- selection
@njit(inline="always")
def _select_top(keys, c, q):
    """Reorder ``keys[:c]`` (distinct) so that ``keys[:q]`` holds the q largest. O(c) on average."""
    lo, hi, kth = 0, c - 1, q - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        a, b, d = keys[lo], keys[mid], keys[hi]
        if a < b:
            a, b = b, a
        if b < d:
            b = d if a > d else a
        pivot = b  # median of three
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break


@njit(inline="always")
def _pick(tau, g, m, q, used, want_used, keep, keys):
    """Mark in ``keep`` the q largest |tau| among non-zero positions whose ``used`` equals
    ``want_used``; equal magnitudes go to the lower index. Returns how many were marked."""
    if q <= 0:
        return 0
    c = 0
    for j in range(g):
        if used[j] == want_used:
            ab = np.float32(tau[j]).view(_U32) & _ABS
            if ab != 0:
                keys[c] = (_U64(ab) << _U64(32)) | _U64(m - 1 - j)
                c += 1
    if c > q:
        _select_top(keys, c, q)
        c = q
    for p in range(c):
        keep[m - 1 - np.int64(keys[p] & _U64(0xFFFFFFFF))] = True
    return c


# --------------------------------------------------------------------------- the chunk
@njit(nogil=True, cache=True)
def merge_chunk(base, base_code, fts, codes, lam, order, count, n, m, tail_n, mode, fill,
                out, out_code, masks, stats):
    """Merge ``count`` elements (a chunk starting at a multiple of m).

    base, fts[i]: raw uint16 words; codes: dtype code per fine-tuned model; lam: float32
    weights; order: pruning order (indices into fts); tail_n: quota of a final short group;
    mode: KEEP_ALL or NM_CA; fill: top up short groups from used positions (CA "fill").
    Writes the merged raw words to ``out``, packed masks to ``masks[i]`` (must be zeroed,
    bit j of byte j//8 little-endian) and adds counts to ``stats``:
    [kept_i (k), nonzero_i (k), non-finite_i (k), kept by both i and l, i < l (k*k)].
    """
    k = len(fts)
    b = np.empty(m, np.float32)
    taus = np.empty((k, m), np.float32)
    keep = np.empty((k, m), np.bool_)
    used = np.empty(m, np.bool_)
    keys = np.empty(m, _U64)
    for g0 in range(0, count, m):
        g = min(m, count - g0)
        q = n if g == m else tail_n
        for j in range(g):
            b[j] = load(base, base_code, g0 + j)
        for i in range(k):
            w = fts[i]
            c = codes[i]
            for j in range(g):
                t = load(w, c, g0 + j) - b[j]
                taus[i, j] = t
                bits = np.float32(t).view(_U32)
                keep[i, j] = False
                if (bits & _EXP) == _EXP:
                    stats[2 * k + i] += 1
                if (bits & _ABS) != 0:
                    stats[k + i] += 1
        if mode == KEEP_ALL:
            for i in range(k):
                for j in range(g):
                    keep[i, j] = (np.float32(taus[i, j]).view(_U32) & _ABS) != 0
        else:
            for j in range(g):
                used[j] = False
            for p in range(k):
                i = order[p]
                got = _pick(taus[i], g, m, q, used, False, keep[i], keys)
                if fill and got < q:
                    _pick(taus[i], g, m, q - got, used, True, keep[i], keys)
                for j in range(g):
                    if keep[i, j]:
                        used[j] = True
        for j in range(g):
            acc = np.float32(0.0)
            any_kept = False
            e = g0 + j
            for i in range(k):
                if keep[i, j]:
                    acc += lam[i] * taus[i, j]
                    any_kept = True
                    stats[i] += 1
                    masks[i, e >> 3] |= np.uint8(1 << (e & 7))
                    for l in range(i + 1, k):
                        if keep[l, j]:
                            stats[3 * k + i * k + l] += 1
            store(out, out_code, e, b[j] + acc if any_kept else b[j])
