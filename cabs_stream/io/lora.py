"""PEFT LoRA adapters as models: ``adapter/`` alone (applied to the merge's base) or
mergekit's ``checkpoint+adapter``.

Such a model is the checkpoint it applies to with, on every target weight W (out, in),
``W + scaling * B @ A`` (``(B @ A).T`` with ``fan_in_fan_out`` and for embeddings), where
scaling = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` and
``alpha_pattern`` matched as PEFT matches them), and, for every other tensor the adapter
stores (``modules_to_save``, trained biases, saved embedding base layers), that tensor.
Nothing is materialised: a target is a ``LoraTensor`` whose words for a chunk are computed
on the fly from the rows of the factors the chunk needs (``chunk_words``), exactly as
``PeftModel.from_pretrained(...).merge_and_unload()`` computes them: the factors in float32,
the product summed in rank order, scaled in float32, added to W in float32 and rounded once
to W's dtype.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from numba import njit

from ..codec import BF16, F16, FLOAT_CODES, ITEMSIZE, float_bits_to_bfloat, float_bits_to_half, \
    half_to_float_bits, load, store
from ..errors import CheckpointError, ConfigError
from . import hub
from .checkpoint import Checkpoint, load_json
from .safetensors_format import TensorInfo, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR_KEYS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
#: adapter_config.json options whose merged weight is not ``W + scaling * B @ A``.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true) rescales every column of the merged weight by a learned magnitude",
    "lora_bias": "lora_bias: true adds a trained bias through lora_B",
    "use_qalora": "QALoRA pools its inputs before lora_A",
    "trainable_token_indices": "trainable_token_indices stores token deltas, not low-rank factors",
    "layer_replication": "layer_replication changes the model's layer stack",
    "target_parameters": "target_parameters (LoRA on bare parameters) is stored under other names",
    "alora_invocation_tokens": "activated LoRA (aLoRA) cannot be merged into the weights",
    "velora_config": "VeLoRA is a LoRA variant", "monteclora_config": "MonteCLoRA is a LoRA variant",
    "use_bdlora": "BD-LoRA is a LoRA variant", "arrow_config": "Arrow routing is a LoRA variant",
    "kasa_config": "KaSA is a LoRA variant",
}
#: init_lora_weights values that change the base weights themselves (the adapter is relative to them).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
Words = Callable[[TensorInfo, int, int], np.ndarray]
Scratch = Callable[[str, tuple[int, ...], Any], np.ndarray]


@dataclass(frozen=True)
class LoraTensor:
    """A target weight of a LoRA model: ``under`` (W) plus ``scaling * B @ A`` (transposed:
    ``(B @ A).T``), in ``dtype`` (the checkpoint's). Read like a ``TensorInfo`` (``dtype``,
    ``shape``, ``file``, ``nbytes``); its words come from ``chunk_words``."""

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
    def numel(self) -> int:
        return self.under.numel

    @property
    def nbytes(self) -> int:
        return self.under.nbytes + self.a.nbytes + self.b.nbytes

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def ranges(self, start: int, count: int) -> list[tuple[TensorInfo, int, int]]:
        """The element ranges of its files a chunk reads: W's, the left factor's rows, the right factor."""
        rows, cols = self.shape
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
class CastTensor:
    """A tensor the adapter stores in another dtype than the checkpoint's: PEFT loads it
    into the checkpoint's dtype (rounding to nearest even)."""

    name: str
    source: TensorInfo
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def numel(self) -> int:
        return self.source.numel

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


#: A model tensor computed from its files chunk by chunk (``InputMaps.words`` delegates to it).
Derived = LoraTensor | CastTensor


@dataclass(frozen=True)
class Factors:
    key: str  # the lora_A key (named in errors)
    a: TensorInfo
    b: TensorInfo
    embedding: bool
    scaling: float


@dataclass
class Adapter:
    """A validated adapter folder: its factors per target weight and the full tensors it stores."""

    label: str
    weights: str
    config: str
    fan_in_fan_out: bool
    targets: dict[str, Factors]  # base weight name -> factors
    replacements: dict[str, TensorInfo]  # base tensor name -> tensor stored in the adapter


# ------------------------------------------------------------------ model specs
def spec_paths(spec: str) -> list[str]:
    """The paths a model spec names: ``X+adapter`` -> [X, adapter], else [spec]."""
    if "+" in spec and not os.path.exists(spec):
        return spec.split("+")
    return [spec]


def is_adapter(path: str) -> bool:
    """A folder holding adapter_config.json, and adapter weights or no full model weights."""
    local = hub.local_path(path)
    if not os.path.isfile(os.path.join(local, CONFIG_NAME)):
        return False
    names = os.listdir(local)
    full = any(n.endswith(".safetensors") and n != WEIGHTS_NAME or n.endswith(".index.json") for n in names)
    return WEIGHTS_NAME in names or "adapter_model.bin" in names or not full


def split_spec(spec: str) -> tuple[str | None, str] | None:
    """(checkpoint the adapter applies to, or None for the base; adapter) if ``spec`` names a
    LoRA adapter, else None."""
    parts = spec_paths(spec)
    if len(parts) == 1:
        return (None, spec) if is_adapter(spec) else None
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"model {spec!r}: write a model with an adapter as checkpoint+adapter (one '+')")
    if not is_adapter(parts[1]):
        raise CheckpointError(f"{parts[1]} is not a LoRA adapter folder (no {CONFIG_NAME})", model=spec)
    return parts[0], parts[1]


# ------------------------------------------------------------------ adapter folders
def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first pattern that matches the module name's end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _number(doc: dict, key: str, label: str, path: str, integer: bool = False, default: object = None) -> float:
    v = doc.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    if isinstance(v, bool) or not ok or v <= 0:
        raise CheckpointError(f"{key} must be a positive {'integer' if integer else 'number'}, got {v!r}",
                              model=label, file=path)
    return v


def _patterns(doc: dict, key: str, label: str, path: str, integer: bool) -> dict:
    pats = doc.get(key) or {}
    if not isinstance(pats, dict):
        raise CheckpointError(f"{key} must be an object of module pattern -> value", model=label, file=path)
    for k in pats:
        _number(pats, k, label, path, integer)
        try:
            re.compile(k)
        except re.error as e:
            raise CheckpointError(f"{key} pattern {k!r} is not a valid regular expression ({e})",
                                  model=label, file=path) from None
    return pats


def open_adapter(folder: str, label: str) -> Adapter:
    """Read and validate an adapter folder (config and weights header; no tensor data)."""
    local = os.path.abspath(hub.local_path(folder))
    config = os.path.join(local, CONFIG_NAME)
    doc = load_json(config, label, CONFIG_NAME)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{CONFIG_NAME} is not a JSON object", model=label, file=config)
    if doc.get("peft_type") != "LORA":
        raise CheckpointError(f"peft_type {doc.get('peft_type')!r} is not supported: cabs-stream reads LoRA "
                              "adapters (peft_type LORA)", model=label, file=config)
    for key, why in UNSUPPORTED.items():
        if doc.get(key):
            raise CheckpointError(f"{key} is set: {why}, which cabs-stream does not merge (plain LoRA only)",
                                  model=label, file=config)
    init = str(doc.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise CheckpointError(f"init_lora_weights {init!r} changes the base weights when the adapter is loaded; "
                              "convert the adapter to a plain LoRA first (PEFT's save_pretrained with "
                              "path_initial_model_for_weight_conversion)", model=label, file=config)
    r = _number(doc, "r", label, config, integer=True, default=8)
    alpha = _number(doc, "lora_alpha", label, config, default=8)
    rslora, fifo = doc.get("use_rslora", False), doc.get("fan_in_fan_out", False)
    if not isinstance(rslora, bool) or not isinstance(fifo, bool):
        raise CheckpointError("use_rslora and fan_in_fan_out must be true or false", model=label, file=config)
    ranks = _patterns(doc, "rank_pattern", label, config, integer=True)
    alphas = _patterns(doc, "alpha_pattern", label, config, integer=False)

    weights = os.path.join(local, WEIGHTS_NAME)
    if not os.path.lexists(weights):
        bin_ = os.path.exists(os.path.join(local, "adapter_model.bin"))
        raise CheckpointError("adapter_model.bin (PyTorch pickle) is not read: save the adapter with "
                              "safe_serialization=True" if bin_ else f"{WEIGHTS_NAME} is missing next to "
                              f"{CONFIG_NAME}", model=label, file=weights)
    tensors, _ = read_header(weights, label)
    factors: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, bool] = {}
    replacements: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"key does not start with {PREFIX!r}: not a PEFT LoRA state dict", model=label,
                                  file=weights, tensor=key)
        suffix = next((s for s in _FACTOR_KEYS if key.endswith(s)), None)
        if suffix is not None:
            module = key[len(PREFIX):-len(suffix)]
            which, embedding = _FACTOR_KEYS[suffix]
            if info.dtype not in FLOAT_CODES or len(info.shape) != 2:
                raise CheckpointError(f"a LoRA factor must be a 2-D BF16, F16 or F32 tensor, got {info.dtype}"
                                      f"{list(info.shape)}", model=label, file=weights, tensor=key)
            factors.setdefault(module, {})[which] = info
            kinds[module] = embedding
        elif "lora_" in key or "trainable_tokens" in key:
            raise CheckpointError("unsupported adapter tensor (only lora_A/lora_B factors and full tensors are "
                                  "read; DoRA magnitudes, LoRA biases and token deltas are not)", model=label,
                                  file=weights, tensor=key)
        else:
            replacements[key[len(PREFIX):].replace(".base_layer.", ".")] = info
    targets = {}
    for module, ab in factors.items():
        key = PREFIX + module + (".lora_embedding_A" if kinds[module] else ".lora_A.weight")
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"module {module} has no {missing}", model=label, file=weights, tensor=key)
        rank = int(pattern_value(ranks, module, r))
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have the rank {rank} "
                                  f"that r / rank_pattern give {module}", model=label, file=weights, tensor=key)
        alpha_m = pattern_value(alphas, module, alpha)
        scaling = alpha_m / math.sqrt(rank) if rslora else alpha_m / rank
        targets[module + ".weight"] = Factors(key, a, b, kinds[module], scaling)
    if not targets and not replacements:
        raise CheckpointError("the adapter holds no tensors", model=label, file=weights)
    return Adapter(label, weights, config, fifo, targets, replacements)


def attach(label: str, adapter: Adapter, under: Checkpoint) -> Checkpoint:
    """The model ``under`` + ``adapter``: targets become ``LoraTensor``s, stored tensors replace
    the checkpoint's, in its dtype (a tensor the base lacks is reported as ignored, as for any
    model)."""
    tensors = dict(under.tensors)
    for name, info in adapter.replacements.items():
        own = under.tensors.get(name)
        cast = own is not None and own.dtype != info.dtype and own.dtype in FLOAT_CODES and info.dtype in FLOAT_CODES
        tensors[name] = CastTensor(name, info, own.dtype) if cast else info
    for name, f in adapter.targets.items():
        own = under.tensors.get(name)
        w = adapter.replacements.get(name) or own
        where = dict(model=label, file=adapter.weights, tensor=f.key)
        if own is None:
            raise CheckpointError(f"the LoRA target {name} is not in {under.label}", **where)
        if own.dtype not in FLOAT_CODES or w.dtype not in FLOAT_CODES:
            raise CheckpointError(f"the LoRA target {name} has dtype {w.dtype} (expected BF16, F16 or F32)", **where)
        if w.shape != own.shape:
            raise CheckpointError(f"the adapter stores {name} with shape {list(w.shape)} but {under.label} has "
                                  f"{list(own.shape)} (a resized vocabulary is not supported)", **where)
        if len(w.shape) != 2:
            raise CheckpointError(f"the LoRA target {name} has shape {list(w.shape)}: only 2-D weights (linear "
                                  "and embedding layers) are supported, not convolutions", **where)
        plain = w.shape == (f.b.shape[0], f.a.shape[1])
        flipped = w.shape == (f.a.shape[1], f.b.shape[0])
        # PEFT transposes embeddings always, and linear layers per layer type (fan_in_fan_out is
        # the config's word for GPT-2 style Conv1D): a shape that fits only one way decides.
        transposed = True if f.embedding else (flipped if adapter.fan_in_fan_out else not plain)
        if not (flipped if transposed else plain):
            raise CheckpointError(f"lora_A {list(f.a.shape)} and lora_B {list(f.b.shape)} do not fit {name} "
                                  f"{list(w.shape)} (expected lora_A [r, {w.shape[0 if transposed else 1]}] and "
                                  f"lora_B [{w.shape[1 if transposed else 0]}, r])", **where)
        tensors[name] = LoraTensor(name, w, f.a, f.b, transposed, f.scaling, adapter.weights, own.dtype)
    return Checkpoint(label, under.root, [*under.files, adapter.weights, adapter.config], tensors)


def open_model(spec: str, base_spec: str, base: Checkpoint, open_checkpoint: Callable[[str], Checkpoint]) \
        -> Checkpoint:
    """A model of the merge: a checkpoint, an adapter (applied to ``base``) or ``X+adapter``
    (``X`` opened with ``open_checkpoint``, or ``base`` itself when it is the base)."""
    split = split_spec(spec)
    if split is None:
        return open_checkpoint(spec)
    under_spec, folder = split
    same = under_spec is None or (os.path.realpath(hub.local_path(under_spec))
                                  == os.path.realpath(hub.local_path(base_spec)))
    return attach(spec, open_adapter(folder, spec), base if same else open_checkpoint(under_spec))


def memory_needs(specs: Iterable[str]) -> tuple[float, int]:
    """Bytes per chunk element and per chunk in flight that adapters add (``chunk_words``):
    each adapter model's words (4 an element at most), the left factor's rows (decoded and
    mapped), the right factor (decoded and mapped), a row accumulator and the partial rows."""
    per_element, rows, per_chunk = 0.0, 0.0, 0
    for spec in specs:
        split = split_spec(spec)
        if split is None:
            continue
        per_element += 4
        for f in open_adapter(split[1], spec).targets.values():
            r, (lo, hi) = f.a.shape[0], sorted((f.a.shape[1], f.b.shape[0]))
            rows = max(rows, 8 * r / lo)
            per_chunk = max(per_chunk, 8 * r * hi + 4 * hi + 16 * r)
    return per_element + rows, per_chunk


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
        c = offset + j - row * cols
        while c < cols and j < count:
            w = load(under, under_code, j)
            if under_code != code:
                w = round_to(w, code)
            store(out, code, j, w + np.float32(acc[c] * scale))
            c += 1
            j += 1


@njit(nogil=True, cache=True)
def cast(words, code, count, out, out_code):
    for j in range(count):
        store(out, out_code, j, load(words, code, j))


def read_only(words: np.ndarray) -> np.ndarray:
    """A read-only view, as the mapped words are (the kernels take one array type for all)."""
    view = words.view()
    view.flags.writeable = False
    return view
