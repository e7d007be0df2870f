"""Numba kernels: decode raw words, form task vectors, select n:m with CA, sum, encode.

Everything a chunk needs happens in ``merge_chunk``, one group of m elements at a time, in
scratch buffers of O(k*m) allocated once per call: no per-group allocation and no Python in
the per-element loop. Inputs are raw words (see ``codec``), decoded inline.
Each kernel has a plain-numpy reference in ``tests/reference.py``.

Speed notes (``benchmarks/kernel_bench.py`` measures them):

* Every per-element loop runs over one group and one model with the dtype branch hoisted
  out of it, on scratch indexed by (row, j) and inputs indexed by an unsigned offset, and
  counts into local scalars, so LLVM vectorizes it; ``stats`` and ``masks`` are written once
  per group or chunk.
* The n:m selection is a threshold search instead of a sort: the magnitude bits of a float
  (``|tau|`` bits, NaN above inf) order like the magnitudes, so the kept set is the keys
  ``>= T`` for the q-th largest key T. Each search step is one vectorized count over the
  group; steps interpolate on the counts (with bisection as a safeguard) starting from the
  previous group's threshold, and stop as soon as exactly q keys reach the probe. Only when
  several keys equal T does a tie pass run: it finds the cut for "lower index first" eight
  flags at a time.
* Masks are packed one byte (8 flags) at a time and OR-ed into ``masks`` once per group.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from ..dtypes import BF16, F16
from ..stats import POPCOUNT

from ..codec import half_to_float_bits, float_bits_to_half, float_bits_to_bfloat

#: Selection modes of ``merge_chunk``.
KEEP_ALL = 0  # task arithmetic: every non-zero entry of every task vector
NM_CA = 1  # CABS: n:m per group, sequential, excluding positions already kept

_U16 = np.uint16
_U32 = np.uint32
_U64 = np.uint64
_ABS = _U32(0x7FFFFFFF)
_EXP = _U32(0x7F800000)
_ONES = _U64(0x0101010101010101)
_PAD = 8  # zero flags kept on both sides of a group's flags, for byte packing


# --------------------------------------------------------------------------- group steps
# Per-group helpers index 2-D scratch by (row, j) and inputs by an unsigned offset: no array
# views inside the group loop (each view costs atomic reference counting) and no negative
# index wraparound checks, so every loop over j vectorizes.

@njit(inline="always")
def _magnitude(t):
    """Selection key of a float32: its bits without the sign (0 for +-0, NaN above inf)."""
    return _U32(np.float32(t).view(_U32) & _ABS)


@njit(inline="always")
def _task_vector(words, code, g0, g, b, taus, keys, i):
    """taus[i, j] = element g0+j of ``words`` minus b[j]; keys[i, j] = its magnitude bits.
    Returns (non-zero count, non-finite count). One loop per dtype code. (No helper that
    returns a tuple inside these loops: that stops LLVM from vectorizing them.)"""
    nz = np.int32(0)
    nf = np.int32(0)
    if code == BF16:
        o = _U64(g0)
        for j in range(g):
            t = _U32(_U32(words[o + _U64(j)]) << _U32(16)).view(np.float32) - b[j]
            a = _magnitude(t)
            taus[i, j] = t
            keys[i, j] = a
            nz = np.int32(nz + np.int32(a != _U32(0)))
            nf = np.int32(nf + np.int32(a >= _EXP))
    elif code == F16:
        o = _U64(g0)
        for j in range(g):
            t = _U32(half_to_float_bits(words[o + _U64(j)])).view(np.float32) - b[j]
            a = _magnitude(t)
            taus[i, j] = t
            keys[i, j] = a
            nz = np.int32(nz + np.int32(a != _U32(0)))
            nf = np.int32(nf + np.int32(a >= _EXP))
    else:
        o = _U64(2 * g0)
        for j in range(g):
            p = o + _U64(2 * j)
            bits = _U32(_U32(words[p]) | (_U32(words[p + _U64(1)]) << _U32(16)))
            t = bits.view(np.float32) - b[j]
            a = _magnitude(t)
            taus[i, j] = t
            keys[i, j] = a
            nz = np.int32(nz + np.int32(a != _U32(0)))
            nf = np.int32(nf + np.int32(a >= _EXP))
    return nz, nf


@njit(inline="always")
def load_group(words, code, g0, g, b):
    """b[j] = element g0+j of ``words`` as float32, one loop per dtype code."""
    if code == BF16:
        o = _U64(g0)
        for j in range(g):
            b[j] = _U32(_U32(words[o + _U64(j)]) << _U32(16)).view(np.float32)
    elif code == F16:
        o = _U64(g0)
        for j in range(g):
            b[j] = _U32(half_to_float_bits(words[o + _U64(j)])).view(np.float32)
    else:
        o = _U64(2 * g0)
        for j in range(g):
            p = o + _U64(2 * j)
            b[j] = _U32(_U32(words[p]) | (_U32(words[p + _U64(1)]) << _U32(16))).view(np.float32)


@njit(inline="always")
def put_group(out, code, g0, g, b, acc, anyk):
    """Element g0+j of ``out`` = b[j] + acc[j] where anyk[j], else b[j] exactly; one loop
    per dtype code."""
    if code == BF16:
        o = _U64(g0)
        for j in range(g):
            v = b[j] + acc[j] if anyk[j] != 0 else b[j]
            out[o + _U64(j)] = float_bits_to_bfloat(np.float32(v).view(_U32))
    elif code == F16:
        o = _U64(g0)
        for j in range(g):
            v = b[j] + acc[j] if anyk[j] != 0 else b[j]
            out[o + _U64(j)] = float_bits_to_half(np.float32(v).view(_U32))
    else:
        o = _U64(2 * g0)
        for j in range(g):
            v = b[j] + acc[j] if anyk[j] != 0 else b[j]
            bits = np.float32(v).view(_U32)
            p = o + _U64(2 * j)
            out[p] = _U16(bits & _U32(0xFFFF))
            out[p + _U64(1)] = _U16(bits >> _U32(16))


@njit(inline="always")
def _count_ge(key, g, t):
    """Number of key[j] >= t, j < g (vectorized: 32-bit counter)."""
    c = np.int32(0)
    for j in range(g):
        c = np.int32(c + np.int32(key[j] >= t))
    return c


@njit(inline="always")
def _high_bit(x):
    """Index of the highest set bit of a non-zero uint32 (exact via float64's exponent)."""
    return np.int64(np.float64(x).view(np.int64) >> 52) - 1023


@njit(inline="always")
def _eligible(keys, i, used, want, g, key):
    """key[j] = keys[i, j] where used[j] == want, else 0. Returns (number of non-zero keys,
    largest key, smallest non-zero key, OR of all keys) for ``_select``."""
    nnz = np.int32(0)
    hi = _U32(0)
    lo = _U32(0xFFFFFFFF)  # smallest key - 1: a zero key gives 2**32 - 1 and never wins
    ors = _U32(0)
    for j in range(g):
        x = keys[i, j] if used[j] == want else _U32(0)
        key[j] = x
        nnz = np.int32(nnz + np.int32(x != _U32(0)))
        hi = max(hi, x)
        lo = min(lo, _U32(x - _U32(1)))
        ors |= x
    return nnz, hi, _U32(lo + _U32(1)), ors


@njit(inline="always")
def _select(key, g, q, flags, i, nnz, hi, lo, ors, hint, eq, eqw):
    """flags[i, _PAD + j] = 1 for the q largest non-zero key[j] (ties to the lower j), else 0.

    Keys are |float32| bits, so integer order is magnitude order (NaN above inf); nnz, hi,
    lo, ors come from ``_eligible``; hint: a likely threshold (the previous group's), only
    for speed; eq, eqw: scratch bytes (>= g + 8) and their uint64 view.
    Returns (how many were flagged = min(q, nnz), threshold for the next hint)."""
    if q <= 0:
        for j in range(g):
            flags[i, _PAD + j] = 0
        return 0, hint
    if nnz <= q:
        for j in range(g):
            flags[i, _PAD + j] = key[j] != _U32(0)
        return np.int64(nnz), hint
    # Search the threshold x (a multiple of u: keys have no bit below the lowest set bit of
    # their OR) in a bracket count(key >= a) > q > count(key >= b), by interpolation on the
    # counts (every other step a bisection when that shrank the bracket less than half).
    # When count(key >= x) == q those keys are the selection; otherwise the bracket closes
    # to b = a + u, and T = a is the q-th largest key with ties.
    u = np.int64(1) << _high_bit(_U32(ors & ~_U32(ors - _U32(1))))
    a = np.int64(lo)
    ca = np.int64(nnz)
    b = np.int64(hi) + u
    cb = np.int64(0)
    x = hint
    bisect = False
    while b - a > u:
        w = b - a
        if not (a < x < b):
            x = a + (w >> 1) if bisect else a + (w * (ca - q)) // (ca - cb)
        x = min(max(x & -u, a + u), b - u)
        c = np.int64(_count_ge(key, g, _U32(x)))
        if c == q:
            for j in range(g):
                flags[i, _PAD + j] = key[j] >= _U32(x)
            return np.int64(q), x
        if c > q:
            a, ca = x, c
        else:
            b, cb = x, c
        bisect = not bisect and 2 * (b - a) > w
        x = np.int64(-1)
    thr = _U32(a)
    above = cb
    # several keys equal T: take those above it and the first ``left`` equal ones, found
    # 8 at a time: byte flags of equality read as uint64 words, counted by multiplication
    left = q - above
    for j in range(g):
        y = key[j]
        flags[i, _PAD + j] = y > thr
        eq[j] = y == thr
    for j in range(g, g + 8):
        eq[j] = 0
    cut = g
    for t in range((g + 7) >> 3):
        run = eqw[t] * _ONES  # byte b: equal keys among the word's bytes 0..b
        c = np.int64(run >> _U64(56))
        if c >= left:  # the left-th equal key is in this word: its byte index = #(run < left)
            cut = 8 * t
            for bb in range(8):
                cut += np.int64((run >> _U64(8 * bb)) & _U64(0xFF)) < left
            break
        left -= c
    for j in range(cut + 1):
        flags[i, _PAD + j] |= eq[j]
    return np.int64(q), a


@njit(inline="always")
def _pack_or(flags, i, g0, g, masks):
    """OR the flags of a group (flags[i, _PAD + j] for element g0+j, zeros around them) into
    the little-endian bit-packed ``masks[i]``, one byte at a time."""
    off = g0 & 7
    byte0 = _U64(g0 >> 3)
    s = _PAD - off
    for t in range((off + g + 7) >> 3):
        p = s + 8 * t
        v = (flags[i, p] | (flags[i, p + 1] << 1) | (flags[i, p + 2] << 2)
             | (flags[i, p + 3] << 3) | (flags[i, p + 4] << 4) | (flags[i, p + 5] << 5)
             | (flags[i, p + 6] << 6) | (flags[i, p + 7] << 7))
        masks[i, byte0 + _U64(t)] |= np.uint8(v)


@njit(inline="always")
def _both(flags, i, l, g):
    """Number of j < g flagged in both rows i and l."""
    c = np.int32(0)
    for j in range(g):
        c = np.int32(c + np.int32(flags[i, _PAD + j] & flags[l, _PAD + j]))
    return np.int64(c)


# --------------------------------------------------------------------------- the chunk
@njit(nogil=True, cache=True)
def merge_chunk(base, base_code, fts, codes, lam, order, count, ns, m, tails, mode, fill,
                out, out_code, masks, stats):
    """Merge ``count`` elements (a chunk starting at a multiple of m).

    base, fts[i]: raw uint16 words; codes: dtype code per fine-tuned model; lam: float32
    weights; order: pruning order (indices into fts); ns[i]: model i's n (kept per group of m);
    tails[i]: its quota in a final short group;
    mode: KEEP_ALL or NM_CA; fill: top up short groups from used positions (CA "fill").
    Writes the merged raw words to ``out``, packed masks to ``masks[i]`` (must be zeroed,
    bit j of byte j//8 little-endian) and adds counts to ``stats``:
    [kept_i (k), nonzero_i (k), non-finite_i (k), kept by both i and l, i < l (k*k)].
    """
    k = len(fts)
    b = np.empty(m, np.float32)
    taus = np.empty((k, m), np.float32)
    keys = np.empty((k, m), _U32)  # |tau| bits per model
    key = np.empty(m, _U32)  # keys eligible for the current selection (others 0)
    flags = np.zeros((k + 1, m + 2 * _PAD), np.uint8)  # kept flags at _PAD + j; row k: top-up
    used = np.empty(m, np.uint8)
    eq = np.zeros(8 * ((m + 15) >> 3), np.uint8)  # tie flags of a selection
    eqw = eq.view(_U64)
    filled = np.zeros(k, np.bool_)  # per group: model i was topped up from used positions
    hints = np.full(k, -1, np.int64)  # last threshold per model (speeds up the next search)
    acc = np.empty(m, lam.dtype)  # same arithmetic type as ``acc += lam[i] * tau``
    anyk = np.empty(m, np.uint8)
    cnt = np.zeros(3 * k + k * k, np.int64)
    for g0 in range(0, count, m):
        g = min(m, count - g0)
        if g < m:  # short group: clear flags past its end (read by the byte packing)
            flags[:, _PAD + g:_PAD + m] = 0
        load_group(base, base_code, g0, g, b)
        for i in range(k):
            nz, nf = _task_vector(fts[i], codes[i], g0, g, b, taus, keys, i)
            cnt[k + i] += nz
            cnt[2 * k + i] += nf
        if mode == KEEP_ALL:
            for i in range(k):
                for j in range(g):
                    flags[i, _PAD + j] = keys[i, j] != _U32(0)
                cnt[i] = cnt[k + i]  # every non-zero entry is kept
        else:
            for j in range(g):
                used[j] = 0
            for p in range(k):
                i = order[p]
                q = ns[i] if g == m else tails[i]
                filled[i] = False
                got = 0
                for want in range(2):  # positions not used yet; then "fill" from used ones
                    if want == 1 and not (fill and got < q):
                        break
                    nnz, hi, lo, ors = _eligible(keys, i, used, want, g, key)
                    c, t = _select(key, g, q - got, flags, i if want == 0 else k, nnz, hi,
                                   lo, ors, hints[i] if want == 0 else np.int64(-1), eq, eqw)
                    if want == 0:
                        hints[i] = t
                    elif c > 0:
                        filled[i] = True
                        for j in range(g):
                            flags[i, _PAD + j] |= flags[k, _PAD + j]
                    got += c
                cnt[i] += got
                if p < k - 1:
                    for j in range(g):
                        used[j] |= flags[i, _PAD + j]
        # pairwise overlap: CA masks are disjoint except where a "fill" top-up reused positions
        for i in range(k):
            for l in range(i + 1, k):
                if mode == KEEP_ALL or filled[i] or filled[l]:
                    cnt[3 * k + i * k + l] += _both(flags, i, l, g)
        # weighted sum in listed model order, skipping unkept; unkept everywhere -> base
        for j in range(g):
            acc[j] = 0.0
            anyk[j] = 0
        for i in range(k):
            w = lam[i]
            for j in range(g):
                f = flags[i, _PAD + j]
                acc[j] = acc[j] + w * taus[i, j] if f != 0 else acc[j]
                anyk[j] |= f
            _pack_or(flags, i, g0, g, masks)
        put_group(out, out_code, g0, g, b, acc, anyk)
    for x in range(3 * k + k * k):
        stats[x] += cnt[x]


@njit(nogil=True, cache=True)
def sum_nm(base, base_code, vals, codes, masks, lam, count, m, ns, out, out_code, stats):
    """W = W0 + sum_i lam_i * tau_i over kept positions, in listed order, float32 (as
    ``nm_kernel.merge_chunk``); tau_i = (model i's stored word, decoded) - W0. Each group's
    ns[i] stored values of model i are decoded at once (dtype branch hoisted), then added at
    the kept positions, found set bit by set bit in 64-bit words (n per group, not m). Adds
    kept_i and kept-by-both counts to ``stats`` (layout of ``nm_kernel.merge_chunk``)."""
    k = len(vals)
    b = np.empty(m, np.float32)
    acc = np.empty(m, np.float32)
    anyk = np.empty(m, np.uint8)
    v = np.empty(max(ns.max(), 1), np.float32)
    one = np.uint64(1)
    for g0 in range(0, count, m):
        g = min(m, count - g0)
        load_group(base, base_code, g0, g, b)
        acc[:g] = 0.0
        anyk[:g] = 0
        e1 = g0 + g
        last = (e1 - 1) >> 3  # the group's last mask byte
        for i in range(k):
            n = ns[i]
            load_group(vals[i], codes[i], (g0 // m) * n, n, v)
            w = lam[i]
            p = 0
            mi = masks[i]
            for byte in range(g0 >> 3, last + 1, 8):
                lo = byte << 3
                bits = np.uint64(0)
                for q in range(min(8, last + 1 - byte)):
                    bits |= np.uint64(mi[byte + q]) << np.uint64(8 * q)
                if lo < g0:
                    bits &= ~((one << np.uint64(g0 - lo)) - one)
                if lo + 64 > e1:
                    bits &= (one << np.uint64(e1 - lo)) - one
                while bits != 0:
                    j = lo + trailing_zeros(bits) - g0
                    acc[j] = acc[j] + w * (v[p] - b[j])
                    anyk[j] = 1
                    p += 1
                    bits &= bits - one
            stats[i] += p
        put_group(out, out_code, g0, g, b, acc, anyk)
    for i in range(k):
        for l in range(i + 1, k):
            both = 0
            for byte in range((count + 7) >> 3):
                both += POPCOUNT[masks[i, byte] & masks[l, byte]]
            stats[3 * k + i * k + l] += both
