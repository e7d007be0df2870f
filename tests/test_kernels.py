"""Numba kernels against the plain-numpy reference (tests/reference.py), rule by rule and
with hypothesis over random shapes, dtypes, ties, zeros, tails, k, policies and modes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cabs_stream import codec
from cabs_stream.dtypes import FLOAT_CODES
from cabs_stream.methods import nm_kernel as K
from reference import decode_ref, encode_ref, merge_ref, nm_masks_ref, tail_quota, top_q

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_kernel(base, fts, lam, n=64, m=256, order=None, overlap="fill", method="cabs",
               dtypes=None, base_dtype="F32", out_dtype="F32"):
    """Encode float inputs as raw words, run merge_chunk, return (merged float32, masks, stats)."""
    k = len(fts)
    dtypes = dtypes or ["F32"] * k
    size = base.size
    bw = encode_ref(base, base_dtype)
    fw = tuple(encode_ref(f, d) for f, d in zip(fts, dtypes))
    for a in (bw, *fw):
        a.flags.writeable = False
    out = np.zeros(size * (2 if out_dtype == "F32" else 1), np.uint16)
    masks = np.zeros((k, -(-size // 8)), np.uint8)
    stats = np.zeros(3 * k + k * k, np.int64)
    ns = list(n) if isinstance(n, (list, tuple)) else [n] * k
    K.merge_chunk(bw, FLOAT_CODES[base_dtype], fw, np.array([FLOAT_CODES[d] for d in dtypes]),
                  np.array(lam, np.float32), np.array(order if order is not None else range(k), np.int64),
                  size, np.array(ns, np.int64), m, np.array([tail_quota(x, size % m, m) for x in ns], np.int64),
                  K.KEEP_ALL if method == "task_arithmetic" else K.NM_CA,
                  overlap == "fill", out, FLOAT_CODES[out_dtype], masks, stats)
    bits = [np.unpackbits(masks[i], bitorder="little")[:size].astype(bool) for i in range(k)]
    return decode_ref(out, out_dtype), bits, stats


# ------------------------------------------------------------------ the reference itself
def test_reference_tie_breaks_by_lower_index():
    tau = np.array([1, -2, 2, 2, 0, 1], np.float32)
    assert top_q(tau, np.ones(6, bool), 2).tolist() == [False, True, True, False, False, False]


def test_reference_never_keeps_zeros():
    tau = np.array([0, 0, 3, 0], np.float32)
    assert top_q(tau, np.ones(4, bool), 3).tolist() == [False, False, True, False]


def test_tail_rule():
    assert [tail_quota(64, r, 256) for r in (1, 2, 6, 10, 128, 255)] == [0, 1, 2, 3, 32, 64]
    assert tail_quota(3, 5, 32) == 0 and tail_quota(3, 6, 32) == 1  # 0.5625 -> 1, 0.46875 -> 0


def test_ca_sequential_fill_and_strict():
    # group of 4, n=2, two models; model 1 only has non-zeros where model 0 keeps
    t0 = np.array([5, 4, 1, 0], np.float32)
    t1 = np.array([3, 2, 0, 0], np.float32)
    strict = nm_masks_ref([t0, t1], 2, 4, overlap="strict")
    assert strict[0].tolist() == [True, True, False, False] and not strict[1].any()
    fill = nm_masks_ref([t0, t1], 2, 4, overlap="fill")
    assert fill[1].tolist() == [True, True, False, False]  # topped up from used positions
    order = nm_masks_ref([t0, t1], 2, 4, order=[1, 0], overlap="strict")
    assert order[1].tolist() == [True, True, False, False] and order[0].tolist() == [False, False, True, False]


# ------------------------------------------------------------------ kernel, rule by rule
def test_kernel_ties_zeros_tail_and_disjointness():
    m, n = 8, 2
    base = np.zeros(20, np.float32)  # two full groups and a tail of 4 (quota 1)
    t = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2 + [0, 2, 2, 0], np.float32)
    merged, masks, stats = run_kernel(base, [t, t, t, t], [1, 1, 1, 1], n=n, m=m, overlap="strict")
    assert masks[0][:8].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert masks[1][:8].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert not masks[2][:16].any() and not masks[3].any()  # zeros are never kept, strict keeps fewer
    assert masks[0][16:].tolist() == [0, 1, 0, 0] and masks[1][16:].tolist() == [0, 0, 1, 0]
    assert stats[3 * 4 + 1] == 0  # no overlap between model 0 and 1
    ref, ref_masks = merge_ref(base, [t] * 4, [1] * 4, n=n, m=m, overlap="strict")
    assert np.array_equal(merged, ref)


def test_kernel_disjoint_when_kn_le_m():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(4096).astype(np.float32)
    fts = [base + rng.standard_normal(4096).astype(np.float32) for _ in range(4)]
    _, masks, stats = run_kernel(base, fts, [1.0] * 4, n=64, m=256)
    total = np.sum(masks, axis=0)
    assert total.max() == 1 and total.sum() == 4 * 4096 // 4
    assert stats[12:].sum() == 0


def test_frozen_tensor_keeps_nothing_and_returns_base():
    base = np.linspace(-1, 1, 512).astype(np.float32)
    merged, masks, _ = run_kernel(base, [base, base + 1], [1.0, 1.0], n=64, m=256)
    assert not masks[0].any() and masks[1].sum() == 128  # the frozen one blocks nothing


def test_nonfinite_counted_per_model():
    base = np.zeros(16, np.float32)
    bad = base.copy()
    bad[3], bad[5] = np.inf, np.nan
    _, _, stats = run_kernel(base, [base + 1, bad], [1, 1], n=2, m=8)
    assert stats[4:6].tolist() == [0, 2]


# ------------------------------------------------------------------ property tests
dtype_st = st.sampled_from(["F32", "BF16", "F16"])


@st.composite
def merge_case(draw):
    k = draw(st.integers(1, 5))
    m = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 32, 100, 256]))
    n = draw(st.integers(1, m))
    if k > 1 and draw(st.booleans()):  # per-model n with the shared m
        n = [draw(st.integers(1, m)) for _ in range(k)]
    size = draw(st.integers(1, 3 * m + 7))
    levels = draw(st.sampled_from([3, 16, 1000]))  # few levels -> many ties
    zero_frac = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = (rng.integers(-levels, levels, size) / levels).astype(np.float32)
    fts = []
    for _ in range(k):
        d = (rng.integers(-levels, levels, size) / (4 * levels)).astype(np.float32)
        d[rng.random(size) < zero_frac] = 0
        fts.append(base + d)
    return dict(base=base, fts=fts, k=k, n=n, m=m,
                lam=[draw(st.sampled_from([1.0, 1.2, -0.5, 0.3])) for _ in range(k)],
                order=list(rng.permutation(k)), overlap=draw(st.sampled_from(["fill", "strict"])),
                method=draw(st.sampled_from(["cabs", "cabs", "task_arithmetic"])),
                dtypes=[draw(dtype_st) for _ in range(k)], base_dtype=draw(dtype_st), out_dtype=draw(dtype_st))


@SETTINGS
@given(merge_case())
def test_kernel_matches_reference(case):
    c = case
    merged, masks, stats = run_kernel(c["base"], c["fts"], c["lam"], n=c["n"], m=c["m"], order=c["order"],
                                      overlap=c["overlap"], method=c["method"], dtypes=c["dtypes"],
                                      base_dtype=c["base_dtype"], out_dtype=c["out_dtype"])
    base = decode_ref(encode_ref(c["base"], c["base_dtype"]), c["base_dtype"])
    fts = [decode_ref(encode_ref(f, d), d) for f, d in zip(c["fts"], c["dtypes"])]
    ref, ref_masks = merge_ref(base, fts, c["lam"], method=c["method"], n=c["n"], m=c["m"],
                               order=c["order"], overlap=c["overlap"])
    expect = decode_ref(encode_ref(ref, c["out_dtype"]), c["out_dtype"])
    k = c["k"]
    for i in range(k):
        assert np.array_equal(masks[i], ref_masks[i]), f"mask {i}"
    assert np.array_equal(merged.view(np.uint32), expect.view(np.uint32))
    assert stats[:k].tolist() == [int(mk.sum()) for mk in ref_masks]
    both = stats[3 * k:].reshape(k, k)
    for i in range(k):
        for j in range(i + 1, k):
            assert both[i, j] == int((ref_masks[i] & ref_masks[j]).sum())


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_decode_all_16bit_words(dtype):
    words = np.arange(65536, dtype=np.uint16)
    got = codec.decode(words, FLOAT_CODES[dtype], 65536)
    assert np.array_equal(got.view(np.uint32), decode_ref(words, dtype).view(np.uint32)) or \
        np.array_equal(np.isnan(got), np.isnan(decode_ref(words, dtype)))
    finite = ~np.isnan(got)
    assert np.array_equal(got[finite].view(np.uint32), decode_ref(words, dtype)[finite].view(np.uint32))


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_encode_round_to_nearest_even(dtype):
    rng = np.random.default_rng(3)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FF000, 0x477FEFFF,
                                     0x33000000, 0x33000001, 0x387FC000, 0x3F808000, 0x3F818000,
                                     0x7F7FFFFF], np.uint32)])
    vals = bits.view(np.float32)
    out = np.empty(vals.size * (2 if dtype == "F32" else 1), np.uint16)
    codec.encode(vals, FLOAT_CODES[dtype], out)
    ref = encode_ref(vals, dtype)
    nan = np.isnan(vals)
    if dtype == "F32":
        assert np.array_equal(out, ref)
    else:
        assert np.array_equal(out[~nan], ref[~nan])
        assert np.isnan(decode_ref(out[nan], dtype)).all()


@SETTINGS
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=200), dtype_st)
def test_decode_encode_property(values, dtype):
    vals = np.array(values, np.float32)
    out = np.empty(vals.size * (2 if dtype == "F32" else 1), np.uint16)
    codec.encode(vals, FLOAT_CODES[dtype], out)
    assert np.array_equal(out, encode_ref(vals, dtype))
    assert np.array_equal(codec.decode(out, FLOAT_CODES[dtype], vals.size).view(np.uint32),
                          decode_ref(out, dtype).view(np.uint32))
