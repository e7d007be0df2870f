"""Grown vocabularies: embedding and lm_head rows aligned across models by token.

Fine-tunes that added tokens have ``embed_tokens``/``lm_head`` with more rows than the base.

- ``tokenizer_source: base`` (the default): the output keeps the base's vocabulary; a
  fine-tune's rows past the base's are dropped (its first rows are the base's tokens, as when
  tokens are appended), with a one-line note naming the model and the count (``plan.py``).
- ``tokenizer_source: <model>`` or ``union``: as mergekit 0.1.5 defines them
  (``mergekit/tokenizer/build.py`` and ``embed.py``). The output vocabulary is that model's,
  or the union: the base's tokens, then every other token in model order, then added tokens.
  Every participant (the base, then each model) gets a permutation: output row -> its own row
  of the same token, or -1. A participant without the token takes a default row: the one
  model that has it, else the base's row, else the average over the models that have it
  (summed in the models' order, then the base, in the promoted dtype), else zeros. The merge
  then runs on these aligned rows as on any tensor, and ``vocab_size`` in the output's
  config is the new vocabulary's size.

Aligned tensors are ``RowsTensor``: read chunk by chunk like a file tensor, their rows gathered
into a per-thread buffer (``InputMaps.words``), so nothing is materialised on disk.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..dtypes import FLOAT_CODES, ITEMSIZE

from ..codec import decode, encode
from ..errors import ConfigError
from .model_files import config_value
from .inputs import Computed
from .safetensors_format import TensorInfo

PartWords = Callable[[TensorInfo | Computed, int, int], np.ndarray]  # InputMaps.words: a part may be computed

NONE, DONOR, ZERO, AVERAGE = 0, 1, 2, 3  # default row of a participant that lacks the token


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("tokenizer_source union or a model needs transformers to read the tokenizers: "
                          "pip install 'cabs-stream[vocab]'") from None
    return transformers


def load_tokenizer(folder: str, label: str) -> Any:
    """A model's fast tokenizer (mergekit reads them the same way)."""
    try:
        return _transformers().AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise bare Exceptions on bad files
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"cannot read the tokenizer of {label} ({folder}): {first}") from None


def config_vocab_size(folder: str) -> int | None:
    """``vocab_size`` of a model's config.json (None when absent)."""
    v = config_value(folder, "vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def union_tokenizer(base: Any, others: list[tuple[Any, int]]) -> Any:
    """mergekit's union: the base tokenizer, plus every token of the models (base first, in
    order; ids below each one's vocab size) that it lacks, then their added tokens."""
    import tempfile

    out_vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for tok, size in others:
        decoder = tok.added_tokens_decoder
        names = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in names and t not in out_vocab:
                out_vocab[t] = len(out_vocab)
        for i, info in decoder.items():
            if i < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy: the base tokenizer is left as it was
        base.save_pretrained(d, legacy_format=False)
        res = _transformers().AutoTokenizer.from_pretrained(d, use_fast=True)
    have = base.get_vocab()
    for t in out_vocab:
        if t not in added and t not in have:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


@dataclass(eq=False)
class Alignment:
    """Rows of the output vocabulary for every participant (0 = the base, then the models)."""

    size: int  # rows of the output vocabulary
    perm: np.ndarray  # (participants, size) int64: own row of each output token, or -1
    kind: np.ndarray  # (size,) int8: NONE (everyone has it), DONOR, ZERO or AVERAGE
    donor: np.ndarray  # (size,) int64: the participant a DONOR row comes from
    order: tuple[int, ...]  # participants in mergekit's order (models, then the base)
    tokenizer: Any = None  # the output tokenizer to save (union), or None: copy the source's files

    @property
    def identity(self) -> bool:
        """Every participant already has every output token at the same row."""
        return bool((self.perm == np.arange(self.size)).all())


def align(base_dir: str, model_dirs: list[str], labels: list[str], source: str,
          source_dir: str | None) -> Alignment:
    """The alignment for ``tokenizer_source`` ``source`` ('union' or a model, in ``source_dir``)."""
    dirs = [base_dir, *model_dirs]
    toks = [load_tokenizer(base_dir, labels[0])]
    for d, lbl in zip(model_dirs, labels[1:]):
        if any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                           "tokenizer.model", "vocab.json")):
            toks.append(load_tokenizer(d, lbl))
        else:  # as mergekit: a model without a tokenizer is taken to have the base's
            warnings.warn(f"{lbl} has no tokenizer; its vocabulary is taken to be the base's", stacklevel=2)
            toks.append(toks[0])
    sizes = [config_vocab_size(d) or len(t.get_vocab()) for d, t in zip(dirs, toks)]
    if source == "union":
        base_tok = _stripped(toks[0], sizes[0], labels[0])
        out = union_tokenizer(base_tok, list(zip(toks, sizes)))
    else:
        out = load_tokenizer(source_dir or source, source)
    vocab = out.get_vocab()
    size = len(vocab)
    perm = np.full((len(dirs), size), -1, np.int64)
    for p, (tok, limit) in enumerate(zip(toks, sizes)):
        own = tok.get_vocab()
        for t, i in vocab.items():
            j = own.get(t, -1)
            if 0 <= j < limit:
                perm[p, i] = j
    order = (*range(1, len(dirs)), 0)
    kind = np.zeros(size, np.int8)
    donor = np.zeros(size, np.int64)
    have = perm >= 0
    count = have.sum(axis=0)
    for i in np.flatnonzero(count < len(dirs)):
        if count[i] == 1:
            kind[i], donor[i] = DONOR, int(np.flatnonzero(have[:, i])[0])
        elif count[i] == 0:
            kind[i] = ZERO
        elif have[0, i]:
            kind[i], donor[i] = DONOR, 0
        else:
            kind[i] = AVERAGE
    return Alignment(size, perm, kind, donor, order, out if source == "union" else None)


def _stripped(tok: Any, size: int, label: str) -> Any:
    """The base tokenizer without tokens at ids >= its vocab size (mergekit refuses the same cases)."""
    if all(i < size for i in tok.get_vocab().values()):
        return tok
    raise ConfigError(f"the base {label} has tokenizer tokens past its vocab_size {size}; tokenizer_source union "
                      "cannot use it")


def promoted(dtypes: list[str]) -> str:
    """torch.promote_types over the participants' dtypes (the dtype mergekit aligns rows in)."""
    kinds = set(dtypes)
    return next(iter(kinds)) if len(kinds) == 1 else "F32"


@dataclass(eq=False)
class RowsTensor(Computed):
    """One participant's view of a vocabulary tensor, its rows aligned to the output vocabulary."""

    name: str
    parts: tuple[TensorInfo | Computed, ...]  # the tensor in every participant (base first)
    own: int  # which participant this is
    align: Alignment
    dtype: str  # the promoted dtype its words are given in

    @property
    def cols(self) -> int:
        return int(np.prod(self.parts[0].shape[1:]))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.align.size, *self.parts[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def file(self) -> str:
        return self.parts[self.own].file

    def ranges(self, start: int, count: int) -> list[tuple[TensorInfo, int, int]]:
        """File ranges a chunk reads (for read-ahead): rows are gathered, so none in particular."""
        return []

    def chunk_words(self, start: int, count: int, words: PartWords,
                    scratch: Callable[[str, tuple[int, ...], Any], np.ndarray], slot: int) -> np.ndarray:
        """Words (in ``dtype``) of elements [start, start + count), in the thread's buffer ``slot``."""
        return chunk_words(self, start, count, words, scratch, slot)


def chunk_words(t: RowsTensor, start: int, count: int, words: PartWords,
                scratch: Callable[[str, tuple[int, ...], Any], np.ndarray], slot: int) -> np.ndarray:
    """Words (in ``t.dtype``) of elements [start, start + count) of the aligned tensor."""
    cols, a = t.cols, t.align
    r0, r1 = start // cols, -(-(start + count) // cols)
    code = FLOAT_CODES[t.dtype]
    wpv = ITEMSIZE[t.dtype] // 2
    out = scratch(f"vocab-words:{slot}", ((r1 - r0) * cols * wpv,), np.uint16)
    src = a.perm[t.own, r0:r1]
    # runs of rows this participant has at consecutive own rows are moved as one block (most
    # of a grown vocabulary); rows it lacks take their default one by one
    cut = np.flatnonzero((np.diff(src) != 1) | (src[1:] < 0) | (src[:-1] < 0)) + 1
    for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), r1 - r0]):
        r, dst = r0 + lo, out[lo * cols * wpv:hi * cols * wpv]
        if src[lo] >= 0:
            _put(dst, t.parts[t.own], int(src[lo]), hi - lo, cols, code, words)
        elif a.kind[r] == DONOR:
            _put(dst, t.parts[a.donor[r]], int(a.perm[a.donor[r], r]), 1, cols, code, words)
        elif a.kind[r] == ZERO:
            dst[:] = 0  # +0.0 in every float format
        else:
            encode(_average(t, r, cols, words), code, dst)  # exact: a value of the promoted dtype
    lo = (start - r0 * cols) * wpv
    return out[lo:lo + count * wpv]


def _put(dst: np.ndarray, info: TensorInfo | Computed, row: int, n: int, cols: int, code: int,
         words: PartWords) -> None:
    """Rows [row, row + n) of ``info`` into ``dst`` as words of dtype ``code``: copied when it is
    the tensor's own dtype, else converted (exact: the promoted dtype holds every value)."""
    w = words(info, row * cols, n * cols)
    if FLOAT_CODES[info.dtype] == code:
        dst[:] = w
    else:
        encode(decode(w, FLOAT_CODES[info.dtype], n * cols), code, dst)


def _row(info: TensorInfo | Computed, row: int, cols: int, words: PartWords) -> np.ndarray:
    return decode(words(info, row * cols, cols), FLOAT_CODES[info.dtype], cols)


def _average(t: RowsTensor, r: int, cols: int, words: PartWords) -> np.ndarray:
    """mergekit's average of the participants that have token row r: a running sum in the
    promoted dtype (rounded after every add, as torch does), then divided by their number."""
    code = FLOAT_CODES[t.dtype]
    acc = np.zeros(cols, np.float32)
    n = 0
    for p in t.align.order:
        src = t.align.perm[p, r]
        if src >= 0:
            acc = _round(acc + _row(t.parts[p], src, cols, words), code)
            n += 1
    return _round(acc / np.float32(n), code)


def _round(x: np.ndarray, code: int) -> np.ndarray:
    """float32 values rounded to the dtype ``code`` (round to nearest even), as float32."""
    words = np.empty(x.size * (2 if code == FLOAT_CODES["F32"] else 1), np.uint16)
    encode(np.ascontiguousarray(x, np.float32), code, words)
    return decode(words, code, x.size)
