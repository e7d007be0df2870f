"""The dtype codec: raw bf16/fp16/fp32 words <-> float32 (Numba).

Inputs are read as raw little-endian words viewed as ``uint16`` (an fp32 element is two
words), so bf16 needs no torch and fp16/fp32 need no conversion pass. ``load`` and ``put``
are inlined into every Numba kernel; decoding is exact and encoding rounds to nearest even
(NaN stays NaN). Plain-numpy references (``ml_dtypes``) are in ``tests/reference.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dtypes import BF16, F16, F32, FLOAT_CODES, ITEMSIZE  # noqa: F401 - the codes the kernels take

_U16 = np.uint16
_U32 = np.uint32
#: float32 bits: all but the sign (|x| as an order-preserving key) and the exponent (inf/NaN).
ABS_BITS = _U32(0x7FFFFFFF)
EXP_BITS = _U32(0x7F800000)
_ABS = ABS_BITS
_EXP = EXP_BITS


# --------------------------------------------------------------------------- decoding
@njit(inline="always")
def half_to_float_bits(h):
    """IEEE binary16 bits -> float32 bits (exact), branch-free (selects) so that loops vectorize."""
    h = _U32(h)
    sign = _U32((h & _U32(0x8000)) << _U32(16))
    exp = (h >> _U32(10)) & _U32(0x1F)
    mant = h & _U32(0x3FF)
    sub = np.float32(np.float32(mant) * np.float32(5.9604644775390625e-08)).view(_U32)
    big = _U32(0x7F800000) if exp == _U32(31) else _U32((exp + _U32(112)) << _U32(23))
    norm = _U32(big | (mant << _U32(13)))
    return _U32((sub if exp == _U32(0) else norm) | sign)


@njit(inline="always")
def load(words, code, i):
    """Element ``i`` of a raw word buffer holding ``code`` data, as float32."""
    if code == BF16:
        return _U32(_U32(words[i]) << _U32(16)).view(np.float32)
    if code == F16:
        return _U32(half_to_float_bits(words[i])).view(np.float32)
    return _U32(_U32(words[2 * i]) | (_U32(words[2 * i + 1]) << _U32(16))).view(np.float32)


@njit(inline="always")
def float_bits_to_bfloat(bits):
    """float32 bits -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN."""
    if (bits & _ABS) > _EXP:
        return _U16((bits >> _U32(16)) | _U32(0x40))
    return _U16((bits + _U32(0x7FFF) + ((bits >> _U32(16)) & _U32(1))) >> _U32(16))


@njit(inline="always")
def float_bits_to_half(f):
    """float32 bits -> binary16 bits, round to nearest even (numpy's algorithm), computed
    branch-free (every case, then selects) so that loops vectorize."""
    f = _U32(f)
    h_sgn = _U32((f & _U32(0x80000000)) >> _U32(16))
    f_exp = _U32(f & _EXP)
    mant = _U32(f & _U32(0x007FFFFF))
    # overflow / inf / nan
    nan = _U32(_U32(0x7C00) + (mant >> _U32(13)))
    nan = _U32(nan + _U32(nan == _U32(0x7C00)))
    big = nan if (f_exp == _EXP and mant != _U32(0)) else _U32(0x7C00)
    # subnormal result (shift clamped to stay defined; the case is selected away otherwise)
    e = _U32(f_exp >> _U32(23))
    sh = _U32(min(max(np.int64(113) - np.int64(e), np.int64(0)), np.int64(31)))
    s_sig = _U32((_U32(0x00800000) + mant) >> sh)
    s_sig = _U32(s_sig + _U32(0x1000) * _U32(((s_sig & _U32(0x3FFF)) != _U32(0x1000))
                                             | ((f & _U32(0x7FF)) != _U32(0))))
    sub = _U32(s_sig >> _U32(13)) if f_exp >= _U32(0x33000000) else _U32(0)
    # normal result
    h_exp = _U32((f_exp - _U32(0x38000000)) >> _U32(13))
    n_sig = _U32(mant + _U32(0x1000) * _U32((mant & _U32(0x3FFF)) != _U32(0x1000)))
    norm = _U32(h_exp + (n_sig >> _U32(13)))
    r = big if f_exp >= _U32(0x47800000) else (sub if f_exp <= _U32(0x38000000) else norm)
    return _U16(h_sgn + r)


@njit(inline="always")
def put(out, code, i, v):
    """Write float32 ``v`` as element ``i`` of a raw word buffer holding ``code`` data."""
    bits = np.float32(v).view(_U32)
    if code == BF16:
        out[i] = float_bits_to_bfloat(bits)
    elif code == F16:
        out[i] = float_bits_to_half(bits)
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
        put(out, code, i, values[i])


@njit(nogil=True, cache=True)
def decode_chunk(base, base_code, fts, codes, count, b, vals, values):
    """b[j] = base element j; vals[i, j] = task vector i (or, if ``values``, model i's weight)."""
    for j in range(count):
        b[j] = load(base, base_code, j)
    for i in range(len(fts)):
        w = fts[i]
        c = codes[i]
        for j in range(count):
            v = load(w, c, j)
            vals[i, j] = v if values else v - b[j]
