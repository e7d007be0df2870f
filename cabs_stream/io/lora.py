"""The tensors of a LoRA model that are computed rather than read (``adapter.py`` opens
the adapter folders and builds them).

A ``LoraTensor`` is a target weight: ``W + scaling * B @ A`` (``(B @ A).T`` for embeddings
and ``fan_in_fan_out`` layers). Its words for a chunk are computed from the rows of the
factors the chunk needs, exactly as ``PeftModel.from_pretrained(...).merge_and_unload()``
computes them: the factors in float32, the product summed in rank order, scaled in
float32, added to W in float32 and rounded once to the checkpoint's dtype. A ``CastTensor``
is a tensor the adapter stores in another dtype than the checkpoint's, rounded to it as
PEFT loads it. Both are ``inputs.Computed`` tensors: read like a ``TensorInfo``, and
``InputMaps.words`` delegates their chunks to ``chunk_words``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from numba import njit

from ..dtypes import BF16, F16, FLOAT_CODES, ITEMSIZE

from ..codec import float_bits_to_bfloat, float_bits_to_half, half_to_float_bits, load, put
from .inputs import Computed
from .safetensors_format import TensorInfo

Words = Callable[[TensorInfo, int, int], np.ndarray]
Scratch = Callable[[str, tuple[int, ...], Any], np.ndarray]


@dataclass(frozen=True)
class LoraTensor(Computed):
    """A target weight of a LoRA model: ``under`` (W) plus ``scaling * B @ A`` (transposed:
    ``(B @ A).T``), in ``dtype`` (the checkpoint's); its words come from ``chunk_words``."""

    name: str
    under: TensorInfo  # the checkpoint's weight, or the base layer the adapter saved
    a: TensorInfo  # lora_A (r, in), or (r, rows) when transposed
    b: TensorInfo  # lora_B (out, r), or (cols, r) when transposed
    transposed: bool
    scaling: float
    file: str  # the adapter's weights (named in errors about this tensor)
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.under.shape

    @property
    def nbytes(self) -> int:
        return self.under.nbytes + self.a.nbytes + self.b.nbytes

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def ranges(self, start: int, count: int) -> list[tuple[TensorInfo, int, int]]:
        """The element ranges of its files a chunk reads: W's, the left factor's rows, the right factor."""
        cols = self.shape[1]
        r0, r1 = start // cols, (start + count - 1) // cols + 1
        left = (self.a, 0, self.a.numel) if self.transposed else (self.b, r0 * self.rank, (r1 - r0) * self.rank)
        return [(self.under, start, count), left, (self.b, 0, self.b.numel) if self.transposed
                else (self.a, 0, self.a.numel)]

    def chunk_words(self, start: int, count: int, words: Words, scratch: Scratch, slot: int) -> np.ndarray:
        """Raw words of elements [start, start + count) merged with the adapter, in a
        per-thread buffer of ``slot`` (one per model of a chunk)."""
        rows, cols = self.shape
        r = self.rank
        r0, r1 = start // cols, (start + count - 1) // cols + 1
        a, b = words(self.a, 0, self.a.numel), words(self.b, 0, self.b.numel)
        ca, cb = FLOAT_CODES[self.a.dtype], FLOAT_CODES[self.b.dtype]
        left = scratch("lora_left", (r1 - r0, r), np.float32)
        right = scratch("lora_right", (r, cols), np.float32)
        if self.transposed:  # W = (B @ A).T = A.T @ B.T: A (r, rows) read by columns, B (cols, r) transposed
            gather(a, ca, r0, 1, rows, left)
            gather(b, cb, 0, 1, r, right)
        else:  # W = B @ A: rows r0..r1 of B (rows, r), all of A (r, cols)
            gather(b, cb, r0 * r, r, 1, left)
            gather(a, ca, 0, cols, 1, right)
        out = scratch(f"lora_words{slot}", (count * ITEMSIZE[self.dtype] // 2,), np.uint16)
        merge_rows(words(self.under, start, count), FLOAT_CODES[self.under.dtype], left, right,
                   np.float32(self.scaling), start - r0 * cols, count, scratch("lora_acc", (cols,), np.float32),
                   out, FLOAT_CODES[self.dtype])
        return read_only(out)


@dataclass(frozen=True)
class CastTensor(Computed):
    """A tensor the adapter stores in another dtype than the checkpoint's: PEFT loads it
    into the checkpoint's dtype (rounding to nearest even)."""

    name: str
    source: TensorInfo
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return self.source.nbytes

    @property
    def file(self) -> str:
        return self.source.file

    def ranges(self, start: int, count: int) -> list[tuple[TensorInfo, int, int]]:
        return [(self.source, start, count)]

    def chunk_words(self, start: int, count: int, words: Words, scratch: Scratch, slot: int) -> np.ndarray:
        out = scratch(f"lora_words{slot}", (count * ITEMSIZE[self.dtype] // 2,), np.uint16)
        cast(words(self.source, start, count), FLOAT_CODES[self.source.dtype], count, out, FLOAT_CODES[self.dtype])
        return read_only(out)




# ------------------------------------------------------------------ a chunk's words
@njit(nogil=True, cache=True)
def gather(words, code, offset, row_stride, col_stride, out):
    """out[i, j] = element offset + i * row_stride + j * col_stride of raw words, as float32."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = load(words, code, offset + i * row_stride + j * col_stride)


@njit(inline="always")
def round_to(v, code):
    """float32 ``v`` rounded to ``code``'s precision (nearest even), as float32."""
    bits = np.float32(v).view(np.uint32)
    if code == BF16:
        return np.uint32(np.uint32(float_bits_to_bfloat(bits)) << np.uint32(16)).view(np.float32)
    if code == F16:
        return np.uint32(half_to_float_bits(float_bits_to_half(bits))).view(np.float32)
    return np.float32(v)


@njit(nogil=True, cache=True)
def merge_rows(under, under_code, left, right, scale, offset, count, acc, out, code):
    """Elements j < count of W + scale * (left @ right) flattened from ``offset`` (row 0 of
    ``left`` is the chunk's first row), written as ``code`` words into ``out`` (W first
    rounded to ``code``, as PEFT loads a saved base layer). Every row is computed whole,
    summing over the rank in order, so a value never depends on the chunking."""
    rank, cols = right.shape
    j = 0
    while j < count:
        row = (offset + j) // cols
        acc[:] = 0
        for k in range(rank):
            a = left[row, k]
            for c in range(cols):
                acc[c] += a * right[k, c]
        c0 = offset + j - row * cols
        n = min(cols - c0, count - j)
        if under_code == code:
            for i in range(n):
                put(out, code, j + i, load(under, code, j + i) + np.float32(acc[c0 + i] * scale))
        else:
            for i in range(n):
                w = round_to(load(under, under_code, j + i), code)
                put(out, code, j + i, w + np.float32(acc[c0 + i] * scale))
        j += n


@njit(nogil=True, cache=True)
def cast(words, code, count, out, out_code):
    for j in range(count):
        put(out, out_code, j, load(words, code, j))


def read_only(words: np.ndarray) -> np.ndarray:
    """A read-only view, as the mapped words are (the kernels take one array type for all)."""
    view = words.view()
    view.flags.writeable = False
    return view
