"""Every Numba kernel of the non-fused methods against its plain-numpy reference, with
hypothesis over random sizes, values with many ties and zeros, and random chunkings."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cabs_stream import thresholds
from cabs_stream.methods import gta_kernels as GK
from cabs_stream.methods import model_stock as MS
from cabs_stream.methods import sce_kernels as SCE
from cabs_stream.methods import stock_kernels as MSK
from reference import (band_counts, combine_methods_ref, della_ref, model_stock_ref, select_ref, sequential_sum,
                       top_count, top_q, uniform_ref, variance_ref)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def task_vectors(draw, k_min=1, k_max=4, size_max=300):
    """(k, size) float32 task vectors with few distinct levels (ties) and exact zeros."""
    k = draw(st.integers(k_min, k_max))
    size = draw(st.integers(1, size_max))
    levels = draw(st.sampled_from([2, 5, 50, 10_000]))
    zero = draw(st.sampled_from([0.0, 0.3, 0.9]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tv = (rng.integers(-levels, levels + 1, (k, size)) / levels).astype(np.float32)
    tv[rng.random((k, size)) < zero] = 0
    return tv


def _keys(tv: np.ndarray) -> np.ndarray:
    return np.abs(tv).view(np.uint32) & np.uint32(0x7FFFFFFF)


def _random_cuts(draw, size: int) -> list[tuple[int, int]]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(size - 1, 1)), max_size=6))) - {size})
    edges = [0, *[c for c in cuts if 0 < c < size], size]
    return list(zip(edges[:-1], edges[1:]))


# ------------------------------------------------------------------ histogram passes
@SETTINGS
@given(task_vectors(k_max=1), st.data())
def test_histogram_kernels_match_bincount(tv, data):
    keys = _keys(tv)[0]
    hi = np.zeros(32768, np.int64)
    thresholds.hist_high(keys, hi)
    nz = keys[keys != 0]
    assert np.array_equal(hi, np.bincount(nz >> 16, minlength=32768))
    high = int(data.draw(st.sampled_from(sorted(set((nz >> 16).tolist())) or [0])))
    lo = np.zeros(65536, np.int64)
    thresholds.hist_low(keys, high, lo)
    sel = nz[(nz >> 16) == high]
    assert np.array_equal(lo, np.bincount(sel & 0xFFFF, minlength=65536))
    value = np.uint32(data.draw(st.sampled_from(keys.tolist())))
    assert thresholds.count_equal(keys, value) == int((keys == value).sum())


@SETTINGS
@given(task_vectors(), st.data())
def test_thresholds_across_random_chunkings_keep_exact_top_k(tv, data):
    """find() over any chunking, then SEL_TOP / SEL_BAND chunk by chunk, keeps exactly the
    reference top-K (ties to the lower index), band included."""
    k, size = tv.shape
    spans = _random_cuts(data.draw, size)
    keys = _keys(tv)
    ranks = []
    for _ in range(k):
        K = data.draw(st.integers(0, size + 2))
        band = data.draw(st.booleans())
        ranks.append((K, data.draw(st.integers(0, K))) if band else (K, -1))
    thr, bud = thresholds.find(lambda c: keys[:, spans[c][0]:spans[c][1]], list(range(len(spans))), ranks)
    for i, (lo_rank, hi_rank) in enumerate(ranks):
        got = np.zeros(size, bool)
        for c, (a, b) in enumerate(spans):
            keep = np.zeros((k, b - a), np.uint8)
            mode = GK.SEL_BAND if hi_rank >= 0 else GK.SEL_TOP
            GK.select(np.ascontiguousarray(tv[:, a:b]), i, b - a, mode, thr[c, i, 0], bud[c, i, 0], thr[c, i, 1],
                      bud[c, i, 1], 1, 0, 1.0, 0, i, 0, a, keep)
            got[a:b] = keep[i].astype(bool)
        want = top_q(tv[i], np.ones(size, bool), lo_rank)
        if hi_rank >= 0:
            want &= ~top_q(tv[i], np.ones(size, bool), hi_rank)
        assert np.array_equal(got, want), (i, lo_rank, hi_rank, spans)


# ------------------------------------------------------------------ selections and combine
@SETTINGS
@given(task_vectors(size_max=200), st.data())
def test_select_modes_match_reference(tv, data):
    k, size = tv.shape
    cols = data.draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    seed, key, start = data.draw(st.integers(0, 2**31)), data.draw(st.integers(0, 2**32 - 1)), data.draw(
        st.integers(0, 10**6))
    i = data.draw(st.integers(0, k - 1))
    none = np.uint32(0xFFFFFFFF)
    for mode, how in ((GK.SEL_ALL, "all"), (GK.SEL_ROW, "row"), (GK.SEL_RANDOM, "random")):
        keep = np.zeros((k, size), np.uint8)
        GK.select(tv, i, size, mode, none, 0, none, 0, cols, top_count(density, cols), density, seed, i, key,
                  start, keep)
        if how == "random":
            u = np.array([uniform_ref(seed, i, key, start + j) for j in range(size)])
            want = (tv[i] != 0) & (u < density)
        else:
            want = select_ref(tv[i], how, density=density, cols=cols)
        assert np.array_equal(keep[i].astype(bool), want), how
    hi, lo = band_counts(density, 0.1, size)  # the band's rank arithmetic, then the band through find()
    thr, bud = thresholds.find(lambda c: _keys(tv[i:i + 1]), [0], [(hi, lo)])
    keep = np.zeros((k, size), np.uint8)
    GK.select(tv, i, size, GK.SEL_BAND, thr[0, 0, 0], bud[0, 0, 0], thr[0, 0, 1], bud[0, 0, 1], 1, 0, 1.0, 0, i,
              0, 0, keep)
    assert np.array_equal(keep[i].astype(bool), select_ref(tv[i], "band", density=density, gamma=0.1))


@SETTINGS
@given(task_vectors(), st.data())
def test_combine_matches_reference(tv, data):
    k, size = tv.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    base = (rng.integers(-8, 9, size) / 8).astype(np.float32)
    keep = (rng.random((k, size)) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))).astype(np.uint8) & (tv != 0)
    w = np.array(data.draw(st.lists(st.sampled_from([1.0, 0.5, -0.7, 0.0, 1.3]), min_size=k, max_size=k)),
                 np.float32)
    scale = np.array(data.draw(st.lists(st.sampled_from([1.0, 2.0, 1 / 0.3]), min_size=k, max_size=k)), np.float32)
    consensus, normalize, linear = (data.draw(st.booleans()) for _ in range(3))
    if linear:  # scale applies to task vectors only; linear always passes ones
        scale = np.ones(k, np.float32)
    lam = np.float32(data.draw(st.sampled_from([1.0, 0.7])))
    vals = (base + tv).astype(np.float32) if linear else tv
    out = np.zeros(2 * size, np.uint16)
    masks = np.zeros((k, -(-size // 8)), np.uint8)
    stats = np.zeros(3 * k + k * k, np.int64)
    GK.combine(base, np.ascontiguousarray(vals), keep, w, scale, consensus, normalize, lam, linear, size, out, 0,
               masks, stats)
    want = combine_methods_ref(base, list(vals), [kp.astype(bool) for kp in keep], w, scale, consensus, normalize,
                               float(lam), linear)
    got = out.view(np.float32)
    assert np.array_equal(got, want, equal_nan=True) and np.array_equal(np.signbit(got), np.signbit(want))
    if not linear:
        bits = np.unpackbits(masks, axis=1, bitorder="little")[:, :size]
        assert np.array_equal(bits, keep)
        assert stats[:k].tolist() == keep.sum(axis=1).tolist()


# ------------------------------------------------------------------ della, sce, model_stock kernels
@SETTINGS
@given(task_vectors(k_max=2, size_max=240), st.data())
def test_della_select_matches_reference(tv, data):
    k, size = tv.shape
    cols = data.draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    density = data.draw(st.sampled_from([0.2, 0.5, 0.8]))
    eps = data.draw(st.sampled_from([0.0, 0.1, 0.15]))
    seed, key, start = data.draw(st.integers(0, 99)), data.draw(st.integers(0, 2**32 - 1)), data.draw(
        st.integers(0, 1000)) * cols
    rescale = data.draw(st.booleans())
    vals = tv.copy()
    keep = np.zeros((k, size), np.uint8)
    for i in range(k):
        GK.della_select(vals, i, size, cols, density, eps, rescale, seed, i, key, start, keep)
        want_keep, want_vals = della_ref(tv[i], cols, density, eps, seed=seed, model=i, tensor_key=key,
                                         rescale=rescale, start=start)
        assert np.array_equal(keep[i].astype(bool), want_keep)
        assert np.array_equal(vals[i][want_keep].view(np.uint32), want_vals[want_keep].view(np.uint32))


@SETTINGS
@given(task_vectors(k_min=2, size_max=200), st.data())
def test_sce_kernels_match_reference(tv, data):
    k, size = tv.shape
    var = np.empty(size, np.float32)
    SCE.variance(tv, size, var)
    assert np.array_equal(var.view(np.uint32), variance_ref(tv).view(np.uint32))
    sel = (np.random.default_rng(size).random((1, size)) < 0.6).astype(np.uint8)
    acc = np.zeros(k, np.float64)
    SCE.sum_squares(tv, sel, size, acc)
    assert acc.tolist() == [sequential_sum(np.where(sel[0] != 0, tv[i], 0).astype(np.float64) ** 2) for i in range(k)]
    base = np.linspace(-1, 1, size).astype(np.float32)
    topk = data.draw(st.sampled_from([1.0, 0.5, 0.1, 0.0]))
    want, agree = _sce_through_kernels(base, tv, topk)
    from reference import sce_ref
    ref, ref_agree = sce_ref(base, list(base + tv), topk)
    assert np.array_equal(want.view(np.uint32), ref.view(np.uint32))


def _sce_through_kernels(base, tv, topk):
    """sce on one tensor through the method's kernels and thresholds (one chunk)."""
    k, size = tv.shape
    vals = ((base + tv) - base).astype(np.float32)  # the task vectors as the engine decodes them
    var = np.empty((1, size), np.float32)
    SCE.variance(vals, size, var[0])
    sel = np.ones((1, size), np.uint8)
    if topk < 1:
        keys = var.view(np.uint32) & np.uint32(0x7FFFFFFF)
        thr, bud = thresholds.find(lambda c: keys, [0], lambda totals: [(int(totals[0] * topk), -1)], rows=1)
        sel[:] = 0
        GK.select(var, 0, size, GK.SEL_TOP, thr[0, 0, 0], bud[0, 0, 0], thr[0, 0, 1], bud[0, 0, 1], 1, 0, 1.0, 0,
                  0, 0, 0, sel)
    acc = np.zeros(k, np.float64)
    SCE.sum_squares(vals, sel, size, acc)
    ms = acc / size
    w = (np.full(k, 1.0 / k) if abs(ms.sum()) < 1e-6 else ms / ms.sum()).astype(np.float32)
    out = np.zeros(2 * size, np.uint16)
    masks = np.zeros((k, -(-size // 8)), np.uint8)
    SCE.erase_combine(base, vals, sel, w, size, out, 0, masks, np.zeros(3 * k + k * k, np.int64))
    return out.view(np.float32), masks


@SETTINGS
@given(task_vectors(k_min=2, size_max=200), st.data())
def test_model_stock_kernels_match_reference(tv, data):
    k, size = tv.shape
    cols = data.draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    per_row = data.draw(st.booleans())
    base = np.linspace(-1, 1, size).astype(np.float32)
    ws = (base + tv).astype(np.float32)
    taus = (ws - base).astype(np.float32)
    c = cols if per_row else size
    dots = np.zeros((size // c, k, k), np.float64)
    for a, b in _random_cuts(data.draw, size):  # any chunking gives the same sums
        MSK.dot_products(np.ascontiguousarray(taus[:, a:b]), a, c, per_row, dots)
    t = MS.ratio(dots)
    out = np.zeros(2 * size, np.uint16)
    MSK.interpolate(base, ws, t, 0, c, per_row, size, out, 0, np.zeros((k, -(-size // 8)), np.uint8),
                   np.zeros(3 * k + k * k, np.int64))
    want = model_stock_ref(base, list(ws), c if per_row else None)
    assert np.array_equal(out.view(np.float32).view(np.uint32), want.view(np.uint32))
