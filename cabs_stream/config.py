"""Merge configuration: a mergekit-style YAML file or keyword arguments, validated up front."""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from .dtypes import parse_dtype
from .errors import ConfigError

from .methods import METHODS as _METHOD_TABLE

METHODS = tuple(_METHOD_TABLE)
OVERLAP_POLICIES = ("fill", "strict")
SCOPES = ("tensor", "row", "global")
DEFAULT_M = 256

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "exclude"}
#: Per-model parameters (also accepted under the top-level ``parameters`` as defaults).
_MODEL_PARAM_KEYS = {"weight", "density", "gamma"}
#: Shared parameters.
_SHARED_KEYS = {"n", "m", "sparsity", "overlap", "pruning_order", "normalize", "lambda", "rescale",
                "random_seed", "scope", "int8_mask", "variant", "selection"}
_PARAM_KEYS = _MODEL_PARAM_KEYS | _SHARED_KEYS
_MODEL_KEYS = {"model", "parameters"}
#: Accepted for compatibility with mergekit files; they change nothing here.
IGNORED_NOTES = {"int8_mask": "int8_mask is accepted and ignored: masks are always bit-packed here"}


#: A parameter value: a scalar, or mergekit's list of {filter, value} conditions (the first
#: whose filter is absent, "*" or a substring of the tensor name applies).
Value = Any


def resolve(value: Value, tensor: str) -> Any:
    """The value of a (possibly filtered) parameter for one tensor; None if no condition matches."""
    if isinstance(value, tuple):
        for flt, v in value:
            if flt is None or flt == "*" or flt in tensor:
                return v
        return None
    return value


def _conditions(value: Any, what: str) -> Value:
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        out = []
        for c in value:
            _unknown(c, {"filter", "value"}, what)
            if "value" not in c:
                raise ConfigError(f"{what}: each condition needs a 'value'")
            out.append((c.get("filter"), c["value"]))
        return tuple(out)
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A fine-tuned model, the weight (lambda) of its task vector and its other parameters."""

    path: str
    weight: Value = 1.0
    density: Value = None
    gamma: Value = None


@dataclass(frozen=True)
class MergeConfig:
    """Everything that determines the merged tensors (engine options do not)."""

    method: str
    base: str
    models: tuple[ModelSpec, ...]
    n: int = 64
    m: int = DEFAULT_M
    overlap: str = "fill"
    pruning_order: tuple[int, ...] = ()  # indices into models; empty = listed order
    dtype: str | None = None  # output float dtype (safetensors name); None = base's
    tokenizer_source: str | None = None
    allow_missing: bool = False
    shared: dict[str, Any] = field(default_factory=dict)  # normalize, lambda, rescale, seed, scope, density...
    exclude: tuple[str, ...] = ()  # tensor-name substrings copied from the base

    @property
    def order(self) -> tuple[int, ...]:
        return self.pruning_order or tuple(range(len(self.models)))

    @property
    def spec(self):
        return _METHOD_TABLE[self.method]

    def model_param(self, name: str, i: int, tensor: str, default: Any = None) -> Any:
        """A per-model parameter for one tensor: the model's own, else the shared default."""
        v = resolve(getattr(self.models[i], name), tensor)
        if v is None:
            v = resolve(self.shared.get(name), tensor)
        return default if v is None else v

    def shared_param(self, name: str, tensor: str = "", default: Any = None) -> Any:
        v = resolve(self.shared.get(name), tensor)
        return default if v is None else v

    def excluded(self, tensor: str) -> bool:
        return any(p in tensor for p in self.exclude)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for the manifest and the fingerprint)."""
        def plain(v: Value) -> Any:
            return [{"filter": f, "value": x} for f, x in v] if isinstance(v, tuple) else v

        d: dict[str, Any] = {
            "merge_method": self.method,
            "base_model": self.base,
            "models": [{"model": s.path, "weight": plain(s.weight),
                        **({"density": plain(s.density)} if s.density is not None else {}),
                        **({"gamma": plain(s.gamma)} if s.gamma is not None else {})} for s in self.models],
            "parameters": {k: plain(v) for k, v in sorted(self.shared.items())},
            "exclude": list(self.exclude),
            "dtype": self.dtype,
            "tokenizer_source": self.tokenizer_source,
            "allow_missing": self.allow_missing,
        }
        if self.spec.selection in ("nm_ca", "nm", "ca"):
            d.update(n=self.n, m=self.m, density=self.n / self.m, overlap=self.overlap,
                     pruning_order=[self.models[i].path for i in self.order])
        return d


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    return value


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise ConfigError(f"unknown key {extra[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")


def build_config(*, method: str = "cabs", base: str, models: list[str] | list[ModelSpec],
                 weights: list[float] | None = None, n: int | None = None, m: int | None = None,
                 sparsity: float | None = None, overlap: str = "fill",
                 pruning_order: list[str] | None = None, dtype: str | None = None,
                 tokenizer_source: str | None = None, allow_missing: bool = False,
                 density: float | None = None, params: dict[str, Any] | None = None,
                 exclude: list[str] | None = None) -> MergeConfig:
    """Validate arguments and build a ``MergeConfig`` (the API and the CLI flags use this).

    ``params`` holds the shared parameters of the other methods (normalize, lambda, rescale,
    random_seed, scope, gamma, density; values may be mergekit filter lists)."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge_method {method!r}; choose one of {', '.join(METHODS)}")
    if not base:
        raise ConfigError("base_model is required")
    specs = [s if isinstance(s, ModelSpec) else ModelSpec(str(s)) for s in models]
    if not specs:
        raise ConfigError("at least one fine-tuned model is required")
    if weights:
        if len(weights) != len(specs):
            raise ConfigError(f"{len(weights)} weights given for {len(specs)} models; give one per model")
        specs = [replace(s, weight=_number(w, f"weight of {s.path}")) for s, w in zip(specs, weights)]
    for s in specs:
        _check_values(s.weight, f"weight of {s.path}")
        _check_values(s.density, f"density of {s.path}", lo=0.0, hi=1.0)
        _check_values(s.gamma, f"gamma of {s.path}", lo=0.0, hi=1.0)
    shared = {k: v for k, v in (params or {}).items() if v is not None}
    if density is not None:
        shared["density"] = density
    _unknown(shared, (_PARAM_KEYS - {"n", "m", "sparsity", "overlap", "pruning_order"}), "parameters")
    for key, note in IGNORED_NOTES.items():
        if key in shared:
            warnings.warn(note, stacklevel=2)
            shared.pop(key)
    _check_values(shared.get("density"), "density", lo=0.0, hi=1.0)
    _check_values(shared.get("gamma"), "gamma", lo=0.0, hi=1.0)
    _check_values(shared.get("weight"), "weight")
    _check_values(shared.get("lambda"), "lambda")
    if "scope" in shared and shared["scope"] not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {shared['scope']!r}")
    if "variant" in shared:
        if method != "cabs" or shared["variant"] not in ("paper", "published-2024"):
            raise ConfigError(f"variant must be 'paper' or 'published-2024' (cabs only), got {shared['variant']!r}")
        if shared["variant"] == "published-2024" and len(specs) != 2:
            raise ConfigError("variant published-2024 merges exactly two models, as the published scripts did")
    if shared.get("selection", "magnitude") not in ("magnitude", "random"):
        raise ConfigError(f"selection must be 'magnitude' or 'random', got {shared['selection']!r}")
    if "random_seed" in shared:
        _int(shared["random_seed"], "random_seed")
    for key in ("normalize", "rescale"):
        if key in shared and not isinstance(shared[key], bool):
            raise ConfigError(f"{key} must be true or false, got {shared[key]!r}")

    real = lambda p: os.path.realpath(p)  # noqa: E731
    seen: dict[str, str] = {real(base): base}
    for s in specs:
        r = real(s.path)
        if r in seen:
            what = "the base model" if seen[r] == base and r == real(base) else f"model {seen[r]}"
            raise ConfigError(f"model {s.path} is listed twice (same as {what})")
        seen[r] = s.path

    m = DEFAULT_M if m is None else _int(m, "m")
    if m < 1:
        raise ConfigError(f"m must be at least 1, got {m}")
    if sparsity is not None:
        sparsity = _number(sparsity, "sparsity")
        if n is not None:
            raise ConfigError("give either n or sparsity, not both")
        if not 0 <= sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
        n = round(m * (1 - sparsity))
        if n < 1:
            raise ConfigError(f"sparsity {sparsity} keeps no weight in a group of m={m}; lower it or raise m")
    n = 64 if n is None else _int(n, "n")
    if not 1 <= n <= m:
        raise ConfigError(f"n must be between 1 and m={m}, got {n}")
    if overlap not in OVERLAP_POLICIES:
        raise ConfigError(f"overlap must be 'fill' or 'strict', got {overlap!r}")

    order: tuple[int, ...] = ()
    if pruning_order:
        index = {real(s.path): i for i, s in enumerate(specs)}
        try:
            order = tuple(index[real(str(p))] for p in pruning_order)
        except KeyError as e:
            raise ConfigError(f"pruning_order names {e.args[0]!r}, which is not a listed model") from None
        if sorted(order) != list(range(len(specs))):
            raise ConfigError("pruning_order must list every model exactly once")
    try:
        out_dtype = parse_dtype(dtype) if dtype else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return MergeConfig(method, str(base), tuple(specs), n, m, overlap, order, out_dtype,
                       tokenizer_source, allow_missing, shared, tuple(exclude or ()))


def _check_values(value: Value, what: str, lo: float | None = None, hi: float | None = None) -> None:
    for v in ([x for _, x in value] if isinstance(value, tuple) else [value]):
        if v is None:
            continue
        x = _number(v, what)
        if lo is not None and not lo <= x <= hi:
            raise ConfigError(f"{what} must be between {lo} and {hi}, got {x}")


def load_config(path: str, **overrides: Any) -> MergeConfig:
    """Read a mergekit-style YAML file. ``overrides`` (non-None) replace its values."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping with merge_method, base_model and models")
    _unknown(doc, _TOP_KEYS, f"config {path}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("'parameters' must be a mapping")
    _unknown(params, _PARAM_KEYS, "parameters")
    default_w = _conditions(params.get("weight", 1.0), "parameters.weight")
    entries = doc.get("models") or []
    if not isinstance(entries, list):
        raise ConfigError("'models' must be a list")
    specs = []
    for e in entries:
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict) or "model" not in e:
            raise ConfigError(f"each models entry needs a 'model' path, got {e!r}")
        _unknown(e, _MODEL_KEYS, f"models entry {e.get('model')}")
        p = e.get("parameters") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"parameters of {e['model']} must be a mapping")
        _unknown(p, _MODEL_PARAM_KEYS, f"parameters of {e['model']}")
        where = f"parameters of {e['model']}"
        specs.append(ModelSpec(str(e["model"]), _conditions(p.get("weight", default_w), where),
                               _conditions(p.get("density"), where), _conditions(p.get("gamma"), where)))
    kw: dict[str, Any] = dict(
        method=doc.get("merge_method", "cabs"), base=doc.get("base_model"), models=specs,
        n=params.get("n"), m=params.get("m"), sparsity=params.get("sparsity"),
        overlap=params.get("overlap", "fill"), pruning_order=params.get("pruning_order"),
        dtype=doc.get("dtype"), tokenizer_source=doc.get("tokenizer_source"),
        params={k: _conditions(v, f"parameters.{k}") for k, v in params.items()
                if k not in ("n", "m", "sparsity", "overlap", "pruning_order", "weight")},
        exclude=_strings(doc.get("exclude"), "exclude"))
    if kw["base"] is None:
        raise ConfigError(f"config {path} has no base_model")
    extra = overrides.pop("params", None) or {}
    kw["params"] = {**kw["params"], **extra}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("n") is not None or overrides.get("sparsity") is not None:
        kw["n" if overrides.get("sparsity") is not None else "sparsity"] = None
    return build_config(**kw)


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
    return int(float(mt.group(1)) * base ** power)
