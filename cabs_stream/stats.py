"""Per-chunk counts (the stats row every chunk task returns) and their description.

A chunk's stats row (int64) holds, per fine-tuned model i (k models):
  kept_i, nonzero_i, nonfinite_i                      (written by the kernel)
  both_i_l for i < l, as a k x k block                 (written by the kernel)
  rows_i, sum_i, sumsq_i of kept counts per row        (balance over rows wholly in the chunk)
  groups_i, gsum_i, gsumsq_i of kept counts per group  (balance over full groups of m)
Rows are the last dimension of the tensor (1-D tensors have no row statistics).
"""

from __future__ import annotations

import math

import numpy as np


#: Set bits per byte value (used by the balance counts and by the kernels' kept-by-both counts).
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def width(k: int) -> int:
    return 3 * k + k * k + 6 * k


def kernel_width(k: int) -> int:
    return 3 * k + k * k


def _counts_per_segment(masks: np.ndarray, first: int, count: int, seg: int) -> np.ndarray:
    """Kept bits per segment of ``seg`` elements in elements [first, first + count*seg) of packed masks."""
    k = masks.shape[0]
    if count <= 0:
        return np.zeros((k, 0), np.int64)
    if first % 8 == 0 and seg % 8 == 0:
        bytes_ = masks[:, first // 8: (first + count * seg) // 8]
        return POPCOUNT[bytes_].reshape(k, count, seg // 8).sum(axis=2, dtype=np.int64)
    bits = np.unpackbits(masks, axis=1, bitorder="little")[:, first: first + count * seg]
    return bits.reshape(k, count, seg).sum(axis=2, dtype=np.int64)


def balance(masks: np.ndarray, start: int, count: int, m: int, shape: tuple[int, ...]) -> np.ndarray:
    """Row and group balance counts (6k values) of one chunk's packed masks."""
    k = masks.shape[0]
    out = np.zeros((6, k), np.int64)
    if len(shape) >= 2:
        cols = shape[-1]
        r0 = -(-start // cols) * cols
        rows = max(0, (start + count) // cols - r0 // cols)
        c = _counts_per_segment(masks, r0 - start, rows, cols)
        out[0], out[1], out[2] = rows, c.sum(axis=1), (c * c).sum(axis=1)
    groups = count // m
    g = _counts_per_segment(masks, 0, groups, m)
    out[3], out[4], out[5] = groups, g.sum(axis=1), (g * g).sum(axis=1)
    return out.T.reshape(-1)  # model-major: [rows, sum, sumsq, groups, gsum, gsumsq] per model


def _cv(n: int, s: int, sq: int) -> float | None:
    if n < 2 or s == 0:
        return None
    mean = s / n
    return math.sqrt(max(sq / n - mean * mean, 0.0)) / mean


def _overlap(kept: np.ndarray, both: np.ndarray) -> list[list[float | None]]:
    k = len(kept)
    sym = both + both.T
    return [[None if i == j or kept[i] == 0 else float(sym[i, j] / kept[i]) for j in range(k)]
            for i in range(k)]


def describe(row: np.ndarray, k: int, numel: int) -> dict:
    """Density, overlap |A and B| / |A| and balance (coefficient of variation) of a stats row."""
    kept, nz = row[:k], row[k:2 * k]
    both = row[3 * k:3 * k + k * k].reshape(k, k)
    bal = row[3 * k + k * k:].reshape(k, 6)
    return {"numel": numel, "kept": kept.tolist(), "nonzero": nz.tolist(),
            "density": (kept / max(numel, 1)).tolist(), "overlap": _overlap(kept, both),
            "cv_rows": [_cv(*b[0:3]) for b in bal], "cv_groups": [_cv(*b[3:6]) for b in bal]}
