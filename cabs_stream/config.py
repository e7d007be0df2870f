"""Merge configuration: a mergekit-style YAML file or keyword arguments, validated up front.

Which parameters exist, their kinds, defaults and bounds come from the chosen method's schema
(``methods/``): a parameter the method does not take is an error naming it, never ignored.
"""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from .dtypes import parse_dtype
from .errors import ConfigError
from .methods import registry
from .methods.base import Method, Param

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "exclude"}
#: mergekit keys and methods cabs-stream cannot run, and what it does instead (refused up front).
UNSUPPORTED_KEYS = {
    "slices": "layer slicing (frankenmerges) is not supported: cabs-stream merges whole models tensor by tensor",
    "tokenizer": "the 'tokenizer:' section is not supported; use tokenizer_source",
    "modules": "per-module configs are not supported; use filter lists in parameters",
    "chat_template": "chat_template is not supported; the chosen tokenizer source's template is copied",
}
_RUNS = "; cabs-stream runs linear, task arithmetic and the task-vector pruning methods (cabs, ties, dare, della, ...)"
UNSUPPORTED_METHODS = {
    "slerp": "it interpolates two models along a sphere, not a sum of task vectors" + _RUNS,
    "nuslerp": "it interpolates two models (or their task vectors) along a sphere, not a sum of task vectors" + _RUNS,
    "multislerp": "it takes a spherical weighted mean of the models, not a sum of task vectors" + _RUNS,
    "karcher": "it takes the models' Riemannian (Karcher) mean, not a sum of task vectors" + _RUNS,
    "nearswap": "it blends one model into the base by how near each weight is to the base's, not a sum of task "
                "vectors" + _RUNS,
    "arcee_fusion": "it fuses one model into the base where a per-row KL importance passes a threshold that "
                    "mergekit estimates from a random sample of the tensor (so its output varies from run to "
                    "run)" + _RUNS,
    "passthrough": "it stacks layers (frankenmerges); cabs-stream merges whole models",
}
#: mergekit's spellings of CABS' n:m (its merge method and pull request 568).
NM_SPELLINGS = {"default_n_m_ratio": "n:m", "default_n_val": "n", "default_m_val": "m"}
MODEL_NM_SPELLINGS = {"n_m_ratio": "n:m", "n_val": "n", "m_val": "m"}
_MODEL_KEYS = {"model", "parameters"}
MAX_YAML_BYTES = 1 << 20  # a merge recipe is a few hundred bytes
MAX_YAML_NODES = 100_000  # values after alias expansion (a "billion laughs" file is refused)
FLOAT32_MAX = 3.4028234663852886e38

#: A parameter value: a scalar, a ``Gradient``, or mergekit's list of {filter, value}
#: conditions (the first whose filter is absent, "*" or a substring of the tensor name
#: applies), kept as a tuple.
Value = Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class Gradient:
    """mergekit's gradient: numbers spread evenly over the layers, interpolated linearly in
    between (``weight: [0, 0.5, 1]``). Layer i of L sits at t = i / (L - 1) (t = 1 when L = 1);
    tensors outside the layers (embeddings, final norm, lm_head) at t = 0, as in mergekit."""

    values: tuple[float, ...]

    def at(self, t: float) -> float:
        scaled = t * (len(self.values) - 1)
        i0 = int(scaled)
        i1 = min(len(self.values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.values[i0] + frac * self.values[i1]


def layer_index(tensor: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


def layer_position(tensor: str, layers: int) -> float:
    """t of a tensor for gradients: its layer index / (layers - 1); 0 outside the layers."""
    i = layer_index(tensor)
    if i is None or layers <= 0:
        return 0.0
    return i / (layers - 1) if layers > 1 else 1.0


def resolve(value: Value, tensor: str, layers: int = 0) -> Any:
    """The value of a (possibly filtered, possibly gradient) parameter for one tensor of a model
    with ``layers`` layers; None if no condition matches."""
    if isinstance(value, tuple):
        for flt, v in value:
            if flt is None or flt == "*" or flt in tensor:
                return resolve(v, tensor, layers)
        return None
    if isinstance(value, Gradient):
        return value.at(layer_position(tensor, layers))
    return value


@dataclass(frozen=True, init=False)
class ModelSpec:
    """A fine-tuned model and its own parameters (``weight`` is the lambda of its task vector)."""

    path: str
    params: tuple[tuple[str, Value], ...]

    def __init__(self, path: str, params: dict[str, Value] | None = None, **kw: Value) -> None:
        items = {k: v for k, v in {**(params or {}), **kw}.items() if v is not None}
        object.__setattr__(self, "path", str(path))
        object.__setattr__(self, "params", tuple(sorted(items.items())))

    def get(self, name: str) -> Value:
        return dict(self.params).get(name)

    @property
    def weight(self) -> Value:
        w = self.get("weight")
        return 1.0 if w is None else w


@dataclass(frozen=True)
class MergeConfig:
    """Everything that determines the merged tensors (engine options do not)."""

    method: str
    base: str
    models: tuple[ModelSpec, ...]
    params: dict[str, Any] = field(default_factory=dict)  # global values (and per-model defaults)
    dtype: str | None = None  # output float dtype (safetensors name); None = base's
    tokenizer_source: str | None = None
    allow_missing: bool = False
    exclude: tuple[str, ...] = ()  # tensor-name substrings copied from the base
    layers: int = 0  # layers of the base, where gradients are interpolated (set by the plan)
    base_given: bool = True  # False: no base_model (linear); ``base`` is the first model, for the layout

    @property
    def spec(self) -> Method:
        return registry.get(self.method)

    def value(self, name: str, tensor: str = "", model: int | None = None, default: Any = None) -> Any:
        """A parameter for one tensor: the model's own, else the global one, else the method's default."""
        v = resolve(self.models[model].get(name), tensor, self.layers) if model is not None else None
        if v is None:
            v = resolve(self.params.get(name), tensor, self.layers)
        if v is None:
            p = self.spec.param(name)
            v = p.default if p is not None else None
        return default if v is None else v

    @property
    def k(self) -> int:
        """The number of fine-tuned models."""
        return len(self.models)

    @property
    def model_paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.models)

    # conveniences for the n:m methods
    @property
    def n(self) -> int:
        return int(self.value("n"))

    @property
    def ns(self) -> tuple[int, ...]:
        """n per model (a model's own, else the shared one)."""
        return tuple(int(self.value("n", model=i)) for i in range(len(self.models)))

    @property
    def m(self) -> int:
        return int(self.value("m"))

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(self.params.get("pruning_order") or range(len(self.models)))

    def excluded(self, tensor: str) -> bool:
        return any(p in tensor for p in self.exclude)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for the manifest and the fingerprint)."""
        def plain(v: Value) -> Any:
            if isinstance(v, Gradient):
                return list(v.values)
            return [{"filter": f, "value": plain(x)} for f, x in v] if isinstance(v, tuple) else v

        params = {k: plain(v) for k, v in sorted(self.params.items()) if k != "pruning_order"}
        d: dict[str, Any] = {
            "merge_method": self.method,
            "base_model": self.base if self.base_given else None,
            "models": [{"model": s.path, "weight": plain(_first(s.get("weight"), self.params.get("weight"), 1.0)),
                        **{k: plain(v) for k, v in s.params if k != "weight"}} for s in self.models],
            "parameters": params,
            "exclude": list(self.exclude),
            "dtype": self.dtype,
            "tokenizer_source": self.tokenizer_source,
            "allow_missing": self.allow_missing,
        }
        d.update(self.spec.describe(self))
        return d


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


# ------------------------------------------------------------------------ value checks
def check_value(p: Param, value: Any, where: str, models: list[str] | None = None) -> Any:
    """Validate one value against its parameter (filter lists element by element)."""
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value) and p.kind != "models":
        if not p.filterable:
            raise ConfigError(f"{where}: {p.name} cannot be a filter list")
        out = []
        for c in value:
            _unknown(c, {"filter", "value"}, f"{where} ({p.name} condition)")
            if "value" not in c:
                raise ConfigError(f"{where}: each {p.name} condition needs a 'value'")
            flt = c.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{where}: the filter of a {p.name} condition must be a string, got {flt!r}")
            out.append((flt, check_value(p, c["value"], where)))
        return tuple(out)
    if isinstance(value, tuple) and p.kind != "models":  # already checked (a ModelSpec re-used)
        return tuple((f, check_value(p, v, where)) for f, v in value)
    if isinstance(value, Gradient):  # already checked (a ModelSpec re-used)
        return value
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in value) and p.kind in ("float", "int"):
        if not p.filterable:
            raise ConfigError(f"{where}: {p.name} cannot be a gradient (one value for the whole model)")
        return Gradient(tuple(float(check_value(p, x, where)) for x in value))
    if isinstance(value, list) and p.kind != "models":
        raise ConfigError(f"{where}: {p.name} is a list {_short(value)}; give one value, a gradient of numbers "
                          "(interpolated over the layers) or a filter list of {filter, value}")
    what = f"{where}: {p.name}"
    if p.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{what} must be a finite number, got {_short(value)}")
        value = float(value)
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(f"{what} must fit in float32 (|x| <= 3.4e38), got {value!r}")
    elif p.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} must be an integer, got {_short(value)}")
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"{what} is out of range (64-bit integers), got {_short(value)}")
    elif p.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {_short(value)}")
    elif p.kind == "choice":
        if not isinstance(value, str) or value not in p.choices:
            raise ConfigError(f"{what} must be one of {', '.join(p.choices)}, got {_short(value)}")
    elif p.kind == "models":
        return _model_order(value, models or [], what)
    if p.lo is not None and not p.lo <= value <= p.hi:
        raise ConfigError(f"{what} must be between {p.lo:g} and {p.hi:g}, got {value!r}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_order(value: Any, models: list[str], what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, (str, os.PathLike)) for x in value):
        raise ConfigError(f"{what} must be a list of model paths, got {_short(value)}")
    index = {os.path.realpath(p): i for i, p in enumerate(models)}
    order = []
    for p in value:
        i = index.get(os.path.realpath(str(p)))
        if i is None:
            raise ConfigError(f"{what} names {str(p)!r}, which is not a listed model")
        order.append(i)
    if sorted(order) != list(range(len(models))):
        raise ConfigError(f"{what} must list every model exactly once")
    return tuple(order)


def _unknown(keys: Iterable[Any], allowed: set[str], where: str) -> None:
    extra = sorted((k for k in keys if k not in allowed), key=str)
    if extra:
        raise ConfigError(f"unknown key {_short(extra[0])} in {where} (allowed: {', '.join(sorted(allowed))})")


def _not_for_method(name: str, method: Method, where: str) -> ConfigError:
    takes = ", ".join(p.name for p in method.params) or "none"
    elsewhere = [m for m in registry.names() if registry.get(m).param(name)]
    if not elsewhere:
        return ConfigError(f"unknown key {name!r} in {where} (allowed for {method.name}: {takes})")
    return ConfigError(f"parameter {name!r} in {where} does not apply to merge_method {method.name} (it belongs "
                       f"to {', '.join(elsewhere)}); {method.name} takes: {takes}")


# ------------------------------------------------------------------------ building
def build_config(*, method: str = "cabs", base: str | None, models: list[str] | list[ModelSpec],
                 weights: list[float] | None = None, n: int | None = None, m: int | None = None,
                 sparsity: float | None = None, overlap: str | None = None,
                 pruning_order: list[str] | None = None, dtype: str | None = None,
                 tokenizer_source: str | None = None, allow_missing: bool = False,
                 density: float | None = None, params: dict[str, Any] | None = None,
                 model_params: list[dict[str, Any]] | None = None,
                 exclude: list[str] | None = None) -> MergeConfig:
    """Validate arguments and build a ``MergeConfig`` (the API and the CLI flags use this).

    ``params`` holds the method's global parameters by their YAML names (values may be
    mergekit filter lists); ``n``, ``m``, ``sparsity``, ``overlap``, ``pruning_order`` and
    ``density`` are shorthands for entries of it. ``weights`` gives one weight per model and
    ``model_params`` one dict of per-model parameters per model (both in the models' order).
    """
    if not isinstance(method, str) or method not in registry.names():
        raise ConfigError(f"unknown merge_method {_short(method)}; choose one of {', '.join(registry.names())}")
    spec = registry.get(method)
    base_given = base is not None
    if base_given and (not base or not isinstance(base, (str, os.PathLike))):
        raise ConfigError(f"base_model must be a path, got {_short(base)}")
    if not base_given and not spec.base_optional:
        raise ConfigError(f"merge_method {spec.name} needs a base_model (task vectors are taken from it); only "
                          + ", ".join(n for n in registry.names() if registry.get(n).base_optional)
                          + " can run without one")
    for model in models:
        if not isinstance(model, (ModelSpec, str, os.PathLike)):
            raise ConfigError(f"a model must be a path, got {_short(model)}")
    for what, text in (("dtype", dtype), ("tokenizer_source", tokenizer_source)):
        if text is not None and not isinstance(text, (str, os.PathLike)):
            raise ConfigError(f"{what} must be a string, got {_short(text)}")
    if tokenizer_source == "base":  # mergekit's keyword for the default: the base's vocabulary
        tokenizer_source = None
    specs = [s if isinstance(s, ModelSpec) else ModelSpec(str(s)) for s in models]
    if not specs:
        raise ConfigError("at least one fine-tuned model is required")
    if not base_given:
        base = specs[0].path  # lays out the output (tensors, config, tokenizer), as in mergekit
    assert base is not None  # given, or the first model's
    paths = [s.path for s in specs]
    if weights:
        if len(weights) != len(specs):
            raise ConfigError(f"{len(weights)} weights given for {len(specs)} models; give one per model")
        specs = [ModelSpec(s.path, {**dict(s.params), "weight": w}) for s, w in zip(specs, weights)]
    if model_params:
        if len(model_params) != len(specs):
            raise ConfigError(f"per-model parameters given for {len(model_params)} models, but there are "
                              f"{len(specs)}; give one value, or one per model")
        specs = [ModelSpec(s.path, {**dict(s.params), **{k: v for k, v in mp.items() if v is not None}})
                 for s, mp in zip(specs, model_params)]

    given = {k: v for k, v in (params or {}).items() if v is not None}
    for key, v in (("n", n), ("m", m), ("sparsity", sparsity), ("overlap", overlap),
                   ("pruning_order", pruning_order), ("density", density)):
        if v is not None and v != []:
            given[key] = v
    if given.pop("int8_mask", None) is not None:  # mergekit's memory option, for any method
        warnings.warn("int8_mask is accepted and ignored: masks are always bit-packed here", stacklevel=2)
    shared: dict[str, Any] = {}
    for key, v in given.items():
        p = spec.param(key)
        if p is None:
            raise _not_for_method(key, spec, "parameters")
        shared[key] = check_value(p, v, "parameters", paths)
    owns = []
    for s in specs:
        own = {}
        for key, v in s.params:
            p = spec.param(key)
            if p is None:
                raise _not_for_method(key, spec, f"parameters of {s.path}")
            if not p.per_model:
                raise ConfigError(f"parameter {key!r} of {s.path} is global for {spec.name}; "
                                  "give it under the top-level parameters")
            own[key] = check_value(p, v, f"parameters of {s.path}")
        owns.append(own)
    shared = spec.resolve(shared, len(owns))
    checked = [ModelSpec(s.path, spec.resolve_model(own, shared, f"parameters of {s.path}"))
               for s, own in zip(specs, owns)]

    real = os.path.realpath
    seen: dict[str, str] = {real(base): base} if base_given else {}
    for s in checked:
        r = real(s.path)
        if r in seen:
            what = "the base model" if r == real(base) else f"model {seen[r]}"
            raise ConfigError(f"model {s.path} is listed twice (same as {what})")
        seen[r] = s.path
    try:
        out_dtype = parse_dtype(str(dtype)) if dtype else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return MergeConfig(spec.name, str(base), tuple(checked), shared, out_dtype, tokenizer_source,
                       allow_missing, tuple(exclude or ()), base_given=base_given)


def load_config(path: str, **overrides: Any) -> MergeConfig:
    """Read a mergekit-style YAML file. ``overrides`` (non-None) replace its values; its
    ``params`` entries replace single parameters."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config {path} is not a regular file")
        if st.st_size > MAX_YAML_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_YAML_BYTES >> 10} KiB; a merge recipe is far smaller")
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
    _check_size(doc, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping with merge_method, base_model and models")
    method = doc.get("merge_method", "cabs")
    refused = [why for key, why in UNSUPPORTED_KEYS.items() if key in doc]
    if isinstance(method, str) and method in UNSUPPORTED_METHODS:
        refused.append(f"merge_method {method} is not supported: {UNSUPPORTED_METHODS[method]}")
    if refused:  # every reason at once, not one per rerun
        raise ConfigError(f"config {path}: " + ("; and ".join(refused) if len(refused) < 3 else
                                                "".join(f"\n  - {r}" for r in refused)))
    _unknown(doc, _TOP_KEYS, f"config {path}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("'parameters' must be a mapping")
    params = _nm_spellings(dict(params), NM_SPELLINGS, "parameters")
    entries = doc.get("models") or []
    if not isinstance(entries, list):
        raise ConfigError("'models' must be a list")
    specs = []
    m_from = False  # m came from a model entry (else from the top-level parameters)
    base = doc.get("base_model")
    for e in entries:
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict) or not isinstance(e.get("model"), str):
            raise ConfigError(f"each models entry needs a 'model' path, got {_short(e)}")
        _unknown(e, _MODEL_KEYS, f"models entry {e['model']}")
        p = e.get("parameters") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"parameters of {e['model']} must be a mapping")
        if isinstance(base, str) and os.path.realpath(e["model"]) == os.path.realpath(base):
            warnings.warn(f"the base model {e['model']} is also listed under models (as mergekit recipes often do); "
                          "it contributes no task vector and is skipped", stacklevel=2)
            continue
        p = _nm_spellings(dict(p), MODEL_NM_SPELLINGS, f"parameters of {e['model']}")
        if "m" in p:  # one m for every model; n may differ per model
            m = p.pop("m")
            if params.setdefault("m", m) != m:
                raise ConfigError(f"{e['model']} asks for m={m} but {'another model' if m_from else 'parameters'} "
                                  f"for m={params['m']}: every task vector is cut into the same groups of m "
                                  "consecutive weights (conflict-aware pruning compares them position by "
                                  "position), so m must be the same for all models; n may differ")
            m_from = True
        specs.append(ModelSpec(e["model"], p))
    dtype = doc.get("dtype")
    if doc.get("out_dtype") is not None:
        if dtype is not None:
            warnings.warn(f"dtype {dtype} is accepted as mergekit's compute dtype and not used: cabs-stream "
                          "computes in float32 and writes out_dtype", stacklevel=2)
        dtype = doc["out_dtype"]
    tok = doc.get("tokenizer_source")
    if tok == "base":  # mergekit's keyword for the base model's tokenizer
        tok = None
    elif isinstance(tok, dict):
        raise ConfigError(f"config {path}: tokenizer_source {_short(tok)} is not supported; use base (the "
                          "default), union, or the path of a model")
    kw: dict[str, Any] = dict(method=method, base=base, models=specs,
                              dtype=dtype, tokenizer_source=tok,
                              params=dict(params), exclude=_strings(doc.get("exclude"), "exclude"))
    extra = {k: v for k, v in (overrides.pop("params", None) or {}).items() if v is not None}
    for key in ("n", "m", "sparsity", "overlap", "pruning_order", "density"):
        if overrides.get(key) is not None:
            extra[key] = overrides.pop(key)
        overrides.pop(key, None)
    if "n" in extra:
        kw["params"].pop("sparsity", None)
    if "sparsity" in extra:
        kw["params"].pop("n", None)
    kw["params"].update(extra)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(**kw)


def _nm_spellings(params: dict, spellings: dict[str, str], where: str) -> dict:
    """mergekit's CABS keys (``default_n_m_ratio: [n, m]``, ``n_val``/``m_val``...) as n and m."""
    for key, meaning in spellings.items():
        if key not in params:
            continue
        value = params.pop(key)
        pairs: Iterable[tuple[str, Any]]
        if meaning == "n:m":
            if not (isinstance(value, list) and len(value) == 2):
                raise ConfigError(f"{where}: {key} must be [n, m], got {_short(value)}")
            pairs = zip(("n", "m"), value)
        else:
            pairs = [(meaning, value)]
        for k, v in pairs:
            if k in params and params[k] != v:
                raise ConfigError(f"{where}: {key} and {k} disagree ({_short(v)} and {_short(params[k])})")
            params[k] = v
    return params


def _check_size(doc: Any, path: str) -> None:
    """Refuse a document that expands (through YAML aliases) into too many values."""
    budget = MAX_YAML_NODES
    stack = [doc]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"config {path} expands to more than {MAX_YAML_NODES} values (YAML aliases?); refused")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{what} must be a list of tensor-name patterns")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '1GiB' -> 1_073_741_824, '512MB', '1000000' (bytes)."""
    if isinstance(text, int):
        return text
    mt = _SIZE.match(str(text))
    if not mt:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 5GB, 1GiB or 500MB")
    unit = (mt.group(2) or "b").lower().rstrip("b")
    power = " kmgt".index(unit[0]) if unit else 0
    base = 1024 if unit.endswith("i") else 1000
    value = float(mt.group(1)) * base ** power
    if not value < 2**62:
        raise ConfigError(f"size {text!r} is too large")
    return int(value)
