"""PEFT LoRA adapter folders as models: ``adapter/`` alone (applied to the merge's base) or
mergekit's ``checkpoint+adapter``.

Such a model is the checkpoint it applies to with, on every target weight W,
``W + scaling * B @ A`` (a ``lora.LoraTensor``), where scaling = lora_alpha / r
(lora_alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` matched
as PEFT matches them), and every other tensor the adapter stores (``modules_to_save``,
trained biases, saved embedding base layers) in place of the checkpoint's, in its dtype.
The adapter's files are validated here (config and header, never the tensor data), with
errors naming the file and tensor; nothing is materialised.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from ..dtypes import FLOAT_CODES
from ..errors import CheckpointError, ConfigError
from . import hub
from .checkpoint import Checkpoint
from .model_files import load_json
from .lora import CastTensor, LoraTensor
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


def _number(v: object, what: str, label: str, path: str, integer: bool = False) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    # (ok means v is an int or a float: the isinstance only tells the type checker)
    if isinstance(v, bool) or not ok or not isinstance(v, (int, float)) or v <= 0:
        raise CheckpointError(f"{what} must be a positive {'integer' if integer else 'number'}, got {v!r}",
                              model=label, file=path)
    return v


def _patterns(doc: dict, key: str, label: str, path: str, integer: bool) -> dict:
    pats = doc.get(key) or {}
    if not isinstance(pats, dict):
        raise CheckpointError(f"{key} must be an object of module pattern -> value", model=label, file=path)
    for k, v in pats.items():
        _number(v, f"{key}[{k!r}]", label, path, integer)
        try:
            re.compile(k)
        except re.error as e:
            raise CheckpointError(f"{key} pattern {k!r} is not a valid regular expression ({e})",
                                  model=label, file=path) from None
    return pats


@dataclass(frozen=True)
class Settings:
    """What adapter_config.json says about the merged weights."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    ranks: dict  # rank_pattern
    alphas: dict  # alpha_pattern

    def scaling(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.alphas, module, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def read_config(config: str, label: str) -> Settings:
    """Validate adapter_config.json: a plain LoRA (variants refused, each by name)."""
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
    rslora, fifo = doc.get("use_rslora", False), doc.get("fan_in_fan_out", False)
    if not isinstance(rslora, bool) or not isinstance(fifo, bool):
        raise CheckpointError("use_rslora and fan_in_fan_out must be true or false", model=label, file=config)
    return Settings(int(_number(doc.get("r", 8), "r", label, config, integer=True)),  # PEFT's defaults
                    _number(doc.get("lora_alpha", 8), "lora_alpha", label, config), rslora, fifo,
                    _patterns(doc, "rank_pattern", label, config, integer=True),
                    _patterns(doc, "alpha_pattern", label, config, integer=False))


def open_adapter(folder: str, label: str) -> Adapter:
    """Read and validate an adapter folder (config and weights header; no tensor data)."""
    local = os.path.abspath(hub.local_path(folder))
    config, weights = os.path.join(local, CONFIG_NAME), os.path.join(local, WEIGHTS_NAME)
    settings = read_config(config, label)
    if not os.path.lexists(weights):
        bin_ = os.path.exists(os.path.join(local, "adapter_model.bin"))
        raise CheckpointError("adapter_model.bin (PyTorch pickle) is not read: save the adapter with "
                              "safe_serialization=True" if bin_ else f"{WEIGHTS_NAME} is missing next to "
                              f"{CONFIG_NAME}", model=label, file=weights)
    factors: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, bool] = {}
    replacements: dict[str, TensorInfo] = {}
    for key, info in read_header(weights, label)[0].items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"key does not start with {PREFIX!r}: not a PEFT LoRA state dict", model=label,
                                  file=weights, tensor=key)
        suffix = next((s for s in _FACTOR_KEYS if key.endswith(s)), None)
        if suffix is not None:
            module = key[len(PREFIX):-len(suffix)]
            which, kinds[module] = _FACTOR_KEYS[suffix]
            if info.dtype not in FLOAT_CODES or len(info.shape) != 2:
                raise CheckpointError(f"a LoRA factor must be a 2-D BF16, F16 or F32 tensor, got {info.dtype}"
                                      f"{list(info.shape)}", model=label, file=weights, tensor=key)
            factors.setdefault(module, {})[which] = info
        elif "lora_" in key or "trainable_tokens" in key:
            raise CheckpointError("unsupported adapter tensor (only lora_A/lora_B factors and full tensors are "
                                  "read; DoRA magnitudes, LoRA biases and token deltas are not)", model=label,
                                  file=weights, tensor=key)
        else:  # modules_to_save, trained biases, a target's saved base layer
            replacements[key[len(PREFIX):].replace(".base_layer.", ".")] = info
    targets = {}
    for module, ab in factors.items():
        key = PREFIX + module + (".lora_embedding_A" if kinds[module] else ".lora_A.weight")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"module {module} has only {'lora_A' if 'A' in ab else 'lora_B'}", model=label,
                                  file=weights, tensor=key)
        rank = int(pattern_value(settings.ranks, module, settings.r))
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have the rank {rank} "
                                  f"that r / rank_pattern give {module}", model=label, file=weights, tensor=key)
        targets[module + ".weight"] = Factors(key, a, b, kinds[module], settings.scaling(module, rank))
    if not targets and not replacements:
        raise CheckpointError("the adapter holds no tensors", model=label, file=weights)
    return Adapter(label, weights, config, settings.fan_in_fan_out, targets, replacements)


def attach(label: str, adapter: Adapter, under: Checkpoint) -> Checkpoint:
    """The model ``under`` + ``adapter``: targets become ``LoraTensor``s, stored tensors replace
    the checkpoint's, in its dtype (a tensor the base lacks is reported as ignored, as for any
    model)."""
    tensors = dict(under.tensors)
    for name, info in adapter.replacements.items():
        own = under.tensors.get(name)
        cast = own is not None and own.dtype != info.dtype and own.dtype in FLOAT_CODES and info.dtype in FLOAT_CODES
        tensors[name] = CastTensor(name, info, own.dtype) if cast and own is not None else info
    for name, f in adapter.targets.items():
        own = under.tensors.get(name)
        w = adapter.replacements.get(name) or own
        where = dict(model=label, file=adapter.weights, tensor=f.key)
        if own is None:
            raise CheckpointError(f"the LoRA target {name} is not in {under.label}", **where)
        assert isinstance(w, TensorInfo)  # a replacement, or a tensor of a checkpoint as opened
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
    return attach(spec, open_adapter(folder, spec), base if same or under_spec is None else open_checkpoint(under_spec))


def memory_needs(specs: Iterable[str]) -> tuple[float, int]:
    """Bytes per chunk element and per chunk in flight that adapters add (``LoraTensor.chunk_words``):
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
