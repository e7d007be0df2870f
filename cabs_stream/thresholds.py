"""Exact streaming top-K thresholds over a tensor or a whole model, one chunk in memory.

Methods that keep the top of a key (|tau|, or a variance) over a whole tensor or model find
exact thresholds first, by passes over the chunks in order, without holding a tensor. A key
is a non-negative float32 read as its bits (integer order = magnitude order; 0 = never kept).
For each key row r (a model, or one derived row) and rank target K:

1. ``high_histogram``: a histogram of the top 16 bits of the keys gives the bin holding the
   K-th largest key (``locate_high``);
2. ``low_histogram``: a histogram of the low 16 bits inside that bin gives the value T itself
   and how many keys equal to T are kept (``locate_low``; ties go to the lower index, so to
   the earlier chunks);
3. ``equal_counts``: only if some but not all keys equal to T are kept, a count of them per
   chunk, so each chunk knows its share of that budget (``share``).

A chunk then keeps key > T, and key == T within its budget: chunk-local again. Each pass
returns partial sums that can be computed per tensor and added up in any order (integers),
so ``scope: global`` runs as parallel per-tensor tasks with small reductions
(``run/graph.py``), and ``find`` runs all passes in one task for a single tensor.

``keys(chunk_index)`` supplies the (rows, count) uint32 keys of a chunk; ``ranks[r]`` is a
pair (K_lo, K_hi) of rank targets per row (-1: none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit

NONE_KEPT = np.uint32(0xFFFFFFFF)  # threshold that keeps nothing (with budget 0)
Keys = Callable[[int], np.ndarray]


@njit(nogil=True, cache=True)
def hist_high(keys, hist):
    """hist[key >> 16] += 1 for every non-zero key."""
    for j in range(keys.shape[0]):
        if keys[j] != 0:
            hist[keys[j] >> 16] += 1


@njit(nogil=True, cache=True)
def hist_low(keys, high, hist):
    """hist[key & 0xFFFF] += 1 for every non-zero key whose top 16 bits equal ``high``."""
    for j in range(keys.shape[0]):
        if keys[j] != 0 and (keys[j] >> 16) == high:
            hist[keys[j] & 0xFFFF] += 1


@njit(nogil=True, cache=True)
def count_equal(keys, value):
    """Number of keys equal to ``value``."""
    c = 0
    for j in range(keys.shape[0]):
        c += keys[j] == value
    return c


@dataclass
class Located:
    """Where the rank targets fall: per (row, target) value, tie budget, bin and count above."""

    value: np.ndarray  # (rows, 2) uint32
    budget: np.ndarray  # (rows, 2) int64
    bins: np.ndarray  # (rows, 2) int64: high bin still to resolve, -1 = resolved
    above: np.ndarray  # (rows, 2) int64: keys above the bin
    need_eq: bool = False  # pass 3 needed


def _locate(hist: np.ndarray, K: int) -> tuple[int, int]:
    """Largest bin b with count(bins >= b) >= K, and count(bins > b)."""
    cum = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(cum, K))
    return len(hist) - 1 - idx, int(cum[idx - 1]) if idx > 0 else 0


def high_histogram(keys: Keys, chunks: list[int], rows: int) -> np.ndarray:
    """Pass 1 over ``chunks``: (rows, 32768) counts of the keys' top 16 bits."""
    hi = np.zeros((rows, 32768), np.int64)
    for c in chunks:
        kk = keys(c)
        for r in range(rows):
            hist_high(kk[r], hi[r])
    return hi


def locate_high(hist: np.ndarray, ranks: list[tuple[int, int]]) -> Located:
    rows = hist.shape[0]
    loc = Located(np.full((rows, 2), NONE_KEPT, np.uint32), np.zeros((rows, 2), np.int64),
                  np.full((rows, 2), -1, np.int64), np.zeros((rows, 2), np.int64))
    for r in range(rows):
        total = int(hist[r].sum())
        for s, K in enumerate(ranks[r]):
            if K >= total:
                loc.value[r, s] = 0  # every non-zero key is > 0: all kept
            elif K > 0:
                loc.bins[r, s], loc.above[r, s] = _locate(hist[r], K)
    return loc


def low_histogram(keys: Keys, chunks: list[int], loc: Located) -> np.ndarray:
    """Pass 2: (rows, 2, 65536) counts of the low 16 bits of the keys in each unresolved bin."""
    rows = loc.bins.shape[0]
    lo = np.zeros((rows, 2, 65536), np.int64)
    if (loc.bins >= 0).any():
        for c in chunks:
            kk = keys(c)
            for r in range(rows):
                for s in range(2):
                    if loc.bins[r, s] >= 0:
                        hist_low(kk[r], loc.bins[r, s], lo[r, s])
    return lo


def locate_low(loc: Located, lo: np.ndarray, ranks: list[tuple[int, int]]) -> Located:
    out = Located(loc.value.copy(), loc.budget.copy(), np.full_like(loc.bins, -1), loc.above)
    for r in range(loc.bins.shape[0]):
        for s in range(2):
            if loc.bins[r, s] >= 0:
                low, above_lo = _locate(lo[r, s], int(ranks[r][s] - loc.above[r, s]))
                out.value[r, s] = np.uint32((int(loc.bins[r, s]) << 16) | low)
                out.budget[r, s] = ranks[r][s] - loc.above[r, s] - above_lo
                out.need_eq |= bool(out.budget[r, s] < lo[r, s, low])
    return out


def equal_counts(keys: Keys, chunks: list[int], loc: Located) -> np.ndarray:
    """Pass 3: (len(chunks), rows, 2) number of keys equal to each threshold, per chunk."""
    rows = loc.value.shape[0]
    eq = np.zeros((len(chunks), rows, 2), np.int64)
    if loc.need_eq:
        for n, c in enumerate(chunks):
            kk = keys(c)
            for r in range(rows):
                for s in range(2):
                    eq[n, r, s] = count_equal(kk[r], loc.value[r, s])
    return eq


def share(loc: Located, eq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds and tie budgets (n_chunks, rows, 2), budgets shared out in chunk order."""
    n = eq.shape[0]
    thr = np.broadcast_to(loc.value, (n, *loc.value.shape)).copy()
    bud = np.broadcast_to(loc.budget, (n, *loc.budget.shape)).copy()
    if loc.need_eq:
        left = loc.budget.copy()
        for c in range(n):
            bud[c] = np.minimum(np.maximum(left, 0), eq[c])
            left -= bud[c]
    return thr, bud


def find(keys: Keys, chunks: list[int], ranks: list[tuple[int, int]] | Callable[[np.ndarray], list],
         rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All passes over one group of chunks (in order): thresholds and tie budgets
    (len(chunks), rows, 2) for ``ranks``, or for ``ranks(totals)`` where totals[r] is the
    number of non-zero keys of row r (then ``rows`` says how many rows the keys have)."""
    if not rows:
        assert not callable(ranks), "rows is needed when ranks is a function"
        rows = len(ranks)
    hist = high_histogram(keys, chunks, rows)
    if callable(ranks):
        ranks = ranks(hist.sum(axis=1))
    loc = locate_high(hist, ranks)
    loc = locate_low(loc, low_histogram(keys, chunks, loc), ranks)
    return share(loc, equal_counts(keys, chunks, loc))
