"""The interface every merge method implements, and the few plain types it speaks in.

A method is one object (usually one module) that declares

* ``params``: its parameters (name, kind, default, per model or global). This one schema
  validates YAML files and keyword arguments, generates the CLI flags and their ``--help``;
* ``needs(values)``: what the plan must provide (whole rows in a chunk, a tensor-level pass
  before the merge, scratch bytes per element in flight), feeding the one memory model;
* ``prepare(values, tensor)``: per-tensor parameters (filter lists resolved), computed once;
* ``prepass(source, tensor, chunks, prep)``: optional tensor-level statistics (exact
  thresholds, dot products) from the decoded chunks of one tensor, before its merge;
* ``merge_chunk(chunk)``: the chunk function: decoded inputs in, merged words, packed masks
  and counts out. It must depend only on the chunk's own elements (and the prepass), so the
  output never depends on chunking, workers or scheduler;
* ``store_layout(values)``: how ``prune`` keeps its pruned task vectors (and, for the dense
  layout, ``merge_stored``: the combination of stored values).

A method sees plain values only: its parameters through ``ParamValues`` (a ``MergeConfig``
is one), a tensor's ``layout.TensorJob``, a ``ChunkData``, and chunks decoded by a
``ChunkSource``; never the run or the whole configuration. Numba kernels live in the
``*_kernels.py`` modules and are imported where a chunk is merged, so reading the schemas
(configuration, ``--help``) does not load Numba. ``registry.py`` maps ``merge_method`` names
to methods; nothing else dispatches on a name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..layout import TensorJob


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    kind: ``float``, ``int``, ``bool``, ``choice`` (one of ``choices``) or ``models`` (a list
    naming every listed model once, e.g. a pruning order). ``per_model`` parameters may be
    given per model (``models[].parameters``) and as a global default (``parameters``).
    Float and int values may be mergekit filter lists (``[{filter: ..., value: ...}]``)
    unless ``filterable`` is false.
    """

    name: str
    kind: str
    default: Any
    help: str
    per_model: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    filterable: bool = True


# Parameters shared by several methods (one definition, reused).
WEIGHT = Param("weight", "float", 1.0, "lambda: scale of this model's task vector", per_model=True)
DENSITY = Param("density", "float", 1.0, "fraction of each task vector kept", per_model=True, lo=0.0, hi=1.0)
NORMALIZE = Param("normalize", "bool", False, "divide the merged task vector by the sum of the weights")
RESCALE = Param("rescale", "bool", True, "DARE/DELLA: divide kept values by their keep probability")
LAMBDA = Param("lambda", "float", 1.0, "global scale of the merged task vector")
SEED = Param("random_seed", "int", 0, "seed of the counter-based random draws (reproducible for any chunking)",
             lo=0, hi=2**63 - 1, filterable=False)
INT8_MASK = Param("int8_mask", "bool", False, "mergekit memory option; accepted and ignored (masks are always "
                  "bit-packed here)", filterable=False)


@dataclass(frozen=True)
class Needs:
    """What a method asks of the plan and the memory model."""

    whole_rows: bool = False  # every chunk holds whole rows (per-row selection)
    prepass: bool = False  # run ``prepass`` per tensor before its chunks
    global_thresholds: bool = False  # thresholds over all tensors together (scope: global)
    scratch_bytes: float = 0.0  # bytes per chunk element a chunk task (and a prepass beside it) holds


class ParamValues(Protocol):
    """What a method reads of the configuration: its parameters' values for a tensor and model."""

    @property
    def k(self) -> int:
        """The number of fine-tuned models."""

    @property
    def model_paths(self) -> tuple[str, ...]:
        """The models as given (for messages and the manifest)."""

    @property
    def order(self) -> tuple[int, ...]:
        """The pruning order (model indices)."""

    @property
    def ns(self) -> tuple[int, ...]:
        """n per model (n:m methods)."""

    @property
    def m(self) -> int:
        """The group size m (n:m methods)."""

    def value(self, name: str, tensor: str = "", model: int | None = None, default: Any = None) -> Any:
        """A parameter for one tensor: the model's own, else the global one, else the default."""


class ChunkSource(Protocol):
    """Decoded chunks of the run's inputs, for the tensor-level passes (``prepass``, thresholds)."""

    def start(self, index: int) -> int:
        """The first element of chunk ``index`` in its tensor."""

    def taus(self, index: int) -> np.ndarray:
        """The task vectors (k, count) of chunk ``index`` as float32."""

    def keys(self, index: int) -> np.ndarray:
        """|tau| bits (k, count) uint32 of chunk ``index``: the keys of the threshold passes."""


class TaskVectorSink(Protocol):
    """Where ``prune`` writes a chunk's pruned task vectors (``io.store.TaskVectorStore``)."""

    def write_nm(self, tensor: TensorJob, start: int, fts: tuple[np.ndarray, ...], masks: np.ndarray) -> int: ...

    def write_dense(self, tensor: TensorJob, start: int, vals: np.ndarray, keep: np.ndarray,
                    masks: np.ndarray) -> int: ...


Scratch = Callable[[str, tuple[int, ...], Any], np.ndarray]


@dataclass
class ChunkData:
    """What a chunk function sees: raw input words, and the buffers it fills.

    ``base`` and ``fts[i]`` are raw uint16 words of elements [start, start + count) of the
    tensor (``codes`` give each one's dtype). The function writes the merged raw words into
    ``out``, the kept positions into ``masks[i]`` (zeroed, bit j of byte j // 8,
    little-endian) and adds to ``stats``: kept_i, nonzero_i, nonfinite_i (k each), then
    kept-by-both for i < l in a k x k block.
    """

    ordinal: int  # position among its tensor's chunks
    tensor: TensorJob
    start: int
    count: int
    base: np.ndarray
    base_code: int
    fts: tuple[np.ndarray, ...]
    codes: np.ndarray
    out: np.ndarray
    out_code: int
    masks: np.ndarray
    stats: np.ndarray
    prep: Any  # the method's per-tensor parameters (``prepare``)
    pre: Any  # the result of the tensor's ``prepass`` (None without one)
    scratch: Scratch = field(repr=False)
    store: TaskVectorSink | None = None  # the task-vector store while pruning, else None
    stored: int = 0  # CRC of what this chunk put in the store

    def store_nm(self) -> None:
        """Keep the kept task-vector entries, n per group (the compact layout of n:m methods)."""
        if self.store is not None:
            self.stored = self.store.write_nm(self.tensor, self.start, self.fts, self.masks)

    def store_dense(self, vals: np.ndarray, keep: np.ndarray) -> None:
        """Keep ``vals`` where ``keep`` (the dense layout)."""
        if self.store is not None:
            self.stored = self.store.write_dense(self.tensor, self.start, vals, keep, self.masks)

    @property
    def k(self) -> int:
        return len(self.fts)

    def decode(self, values: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The chunk as float32 in scratch: the base (count,) and the task vectors (k, count),
        or with ``values`` the models' weights themselves."""
        from ..codec import decode_chunk

        b = self.scratch("b", (self.count,), np.float32)
        vals = self.scratch("vals", (self.k, self.count), np.float32)
        decode_chunk(self.base, self.base_code, self.fts, self.codes, self.count, b, vals, values)
        return b, vals


class Method:
    """Base class: a method overrides ``params``, ``merge_chunk`` and what it needs of the rest."""

    name: str = ""
    summary: str = ""  # one line for --help and the README
    paper: str = ""  # link shown in the model card
    params: tuple[Param, ...] = ()
    #: The method can run without a base model (the first model then lays out the output).
    base_optional: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        """Cross-parameter validation and derived values (raise ConfigError) for ``k`` models;
        single values were already checked against their ``Param``."""
        return params

    def resolve_model(self, own: dict[str, Any], shared: dict[str, Any], where: str) -> dict[str, Any]:
        """Cross-parameter validation of one model's own parameters (``where`` names it), after
        ``resolve`` of the shared ones."""
        return own

    def needs(self, values: ParamValues) -> Needs:
        return Needs()

    def prepare(self, values: ParamValues, tensor: TensorJob) -> Any:
        """Per-tensor parameters (default: the weights as float32)."""
        return weights(values, tensor)

    def prepass(self, source: ChunkSource, tensor: TensorJob, chunks: list[int], prep: Any) -> Any:
        """Tensor-level statistics before the merge (only when ``needs().prepass``), from the
        decoded chunks ``chunks`` (indices for ``source``) of ``tensor``."""
        return None

    def merge_chunk(self, c: ChunkData) -> None:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------ scope: global thresholds
    def threshold_keys(self, source: ChunkSource, index: int) -> np.ndarray:
        """Keys (rows, count) of the global threshold passes for one chunk (only when
        ``needs().global_thresholds``): by default |tau| of every model."""
        return source.keys(index)

    def global_ranks(self, values: ParamValues, numels: list[int]) -> list[tuple[int, int]]:
        """Rank targets (K_lo, K_hi) per key row over tensors of ``numels`` elements together
        (only when ``needs().global_thresholds``)."""
        raise NotImplementedError(f"{self.name} declares no global thresholds")

    # ------------------------------------------------------------ task-vector stores
    def store_layout(self, values: ParamValues) -> str | None:
        """How ``prune`` keeps the pruned task vectors: "nm" (compact, n per group of m, summed
        with the weights by ``merge --from``), "dense" (``merge_stored`` combines them), or
        None (no lambda-independent pruned task vectors: the method cannot be stored)."""
        return None

    def merge_stored(self, c: ChunkData, b: np.ndarray, vals: np.ndarray, keep: np.ndarray) -> None:
        """The chunk function of a merge from a dense store: ``b`` the base (count,), ``vals``
        the stored task vectors (k, count) and ``keep`` the stored selection (k, count) uint8."""
        raise NotImplementedError(f"{self.name} has no dense store layout")

    def known_counts(self, n_chunks: int) -> np.ndarray | None:
        """Counts per chunk known before the merge (a store's, recorded when it was pruned)."""
        return None

    def describe(self, values: ParamValues) -> dict[str, Any]:
        """Extra entries for the manifest (the derived values a user wants to see)."""
        return {}


def weights(values: ParamValues, tensor: TensorJob) -> np.ndarray:
    """The weight (lambda) of every model for one tensor, float32."""
    return np.array([values.value("weight", tensor.name, i, 1.0) for i in range(values.k)], np.float32)


def top_count(density: float, n: int) -> int:
    """mergekit's magnitude count: everything at density >= 1, nothing at <= 0, else
    max(1, int(density * n))."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def row_length(shape: tuple[int, ...]) -> int:
    """Elements per row: the last dimension (a 1-D tensor is one row)."""
    return shape[-1] if len(shape) >= 2 else max(math.prod(shape), 1)
