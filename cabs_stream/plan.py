"""The merge plan: tensors matched and validated across models, the chunk grid, the output
shard layout and the memory model, all computed before a single byte is written.

The chunk grid is the one place that decides chunk boundaries (the merge, the threshold
passes and the mask store all use ``Plan.chunks``): every boundary is a multiple of
lcm(m, 8), and falls on whole rows when a row fits (or always, when the method needs it)."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

from .dtypes import COPY_ONLY, FLOAT_CODES, ITEMSIZE, is_mergeable
from .config import MergeConfig, layer_index, parse_size
from .errors import CheckpointError, ConfigError
from .io import vocab
from .io import adapter, hub
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.model_files import config_value
from .io.inputs import Computed
from .layout import ChunkSpec, OutShard, TensorJob
from .io.safetensors_format import TensorInfo, build_header

DEFAULT_CHUNK = 1 << 22  # elements
MAX_CHUNK = 1 << 27  # elements (a chunk's buffers stay well inside 32-bit element counts)
MAX_WORKERS = 1024
RUNTIME_RESERVE = 256 << 20  # bytes for the interpreter, numba, dask and zarr
MIN_SHARD_BYTES = 1_000_000  # a smaller shard size is a mistake (mergekit's "1B" read as bytes)


def shard_bytes(size: int | str) -> int:
    """The output shard size in bytes, at least 1 MB."""
    n = parse_size(size)
    if n < MIN_SHARD_BYTES:
        raise ConfigError(f"`shard_size` {size!r} is {n} bytes, under the 1 MB floor; write e.g. 5GB (a size in "
                          "bytes; mergekit's --out-shard-size 1B means a billion parameters: cabs-stream-yaml "
                          "takes it with that meaning)")
    return n


@dataclass
class Plan:
    config: MergeConfig
    base: Checkpoint
    models: list[Checkpoint]
    tensors: list[TensorJob]
    shards: list[OutShard]
    chunks: list[ChunkSpec]
    chunk_size: int
    ignored: list[str]  # fine-tuned tensors the base lacks
    group: int  # chunk boundaries are multiples of this (m); the report's balance groups
    vocab: vocab.Alignment | None = None  # rows aligned to a new vocabulary (tokenizer_source union / a model)

    def tensor_chunks(self) -> dict[int, list[int]]:
        """Chunk indices of every merged tensor, in order."""
        out: dict[int, list[int]] = {}
        for i, ch in enumerate(self.chunks):
            out.setdefault(ch.tensor, []).append(i)
        return out

    @property
    def merged_elements(self) -> int:
        return sum(t.numel for t in self.tensors if t.merged)

    def input_bytes(self) -> int:
        return sum(t.base.nbytes + sum(f.nbytes for f in t.fts) for t in self.tensors)


def align_chunk_size(requested: int, m: int) -> int:
    """Round up to a multiple of lcm(m, 8), so chunks hold whole groups and whole mask bytes."""
    step = math.lcm(m, 8)
    return max(step, -(-requested // step) * step)


def tensor_chunk_size(chunk_size: int, m: int, shape: tuple[int, ...], whole_rows: bool = False) -> int:
    """The chunk size of one tensor: whole rows too when a row fits (for the row statistics),
    or always (``whole_rows``, for per-row selection; a 1-D tensor is one row); and, for as
    many chunks as ``chunk_size`` needs, chunks of even size, so the last is not mostly empty
    (a task-vector store writes every chunk whole)."""
    numel = math.prod(shape)
    cols = shape[-1] if len(shape) >= 2 else (numel if whole_rows else 0)
    step, size = math.lcm(m, 8), chunk_size
    if cols:
        row_step = math.lcm(m, 8, cols)
        if row_step <= chunk_size:
            step, size = row_step, chunk_size // row_step * row_step
        elif whole_rows:
            return row_step
    n = max(1, -(-numel // size))
    return min(size, -(-(-(-numel // n)) // step) * step)


_VOCAB_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "tok_embeddings", "embed_in")


def is_vocab_tensor(name: str, b: TensorInfo | Computed, rows: int | None) -> bool:
    """Whether a base tensor is indexed by token: its first dimension is the vocabulary (the
    config's vocab_size; without one, an embedding or lm_head by name)."""
    if len(b.shape) < 2:
        return False
    return b.shape[0] == rows if rows else any(part in name for part in _VOCAB_NAMES)


def match_tensors(config: MergeConfig, base: Checkpoint, models: list[Checkpoint],
                  align: vocab.Alignment | None = None) \
        -> tuple[list[tuple[str, TensorInfo | Computed, tuple[TensorInfo | Computed, ...]]], list[str]]:
    """Pair every base tensor with the fine-tuned ones (a LoRA model's target tensors and
    recast stored tensors are ``inputs.Computed``); raise on any mismatch. Vocabulary
    tensors of fine-tunes with more rows than the base are cut to the base's rows (noted), or,
    with ``align``, every model's rows are aligned to the output vocabulary (vocab.py)."""
    out: list[tuple[str, TensorInfo | Computed, tuple[TensorInfo | Computed, ...]]] = []
    rows = vocab.config_vocab_size(base.root) if base.root else None
    dropped: dict[str, tuple[int, set[str]]] = {}
    for name, b in base.tensors.items():
        if b.dtype in COPY_ONLY:
            for mdl in models:
                f = mdl.tensors.get(name)
                if f is not None and (f.dtype != b.dtype or f.shape != b.shape):
                    warnings.warn(f"{name}: differs in {mdl.label}; copied from the base", stacklevel=2)
            out.append((name, b, ()))
            continue
        if not is_mergeable(b.dtype):
            raise CheckpointError(f"unsupported dtype {b.dtype} (cabs-stream merges BF16, F16 and F32)",
                                  model=base.label, file=b.file, tensor=name)
        if config.excluded(name):  # kept from the base: zero task vectors (still cast to the output dtype)
            out.append((name, b, tuple(b for _ in models)))
            continue
        by_token = is_vocab_tensor(name, b, rows)
        fts: list[TensorInfo | Computed] = []
        for mdl in models:
            f = mdl.tensors.get(name)
            if f is None:
                if config.allow_missing:
                    fts.append(b)  # task vector zero here
                    continue
                raise CheckpointError(f"tensor is missing (the base has it with shape {list(b.shape)}); "
                                      "pass `allow_missing=True` to treat its task vector as zero",
                                      model=mdl.label, file=mdl.files[0] if len(mdl.files) == 1 else mdl.root,
                                      tensor=name)
            if f.dtype not in FLOAT_CODES:
                raise CheckpointError(f"dtype {f.dtype} does not match the base's {b.dtype} "
                                      "(expected a float dtype: BF16, F16 or F32)",
                                      model=mdl.label, file=f.file, tensor=name)
            rows_only = by_token and f.shape[1:] == b.shape[1:]  # only the vocabulary may differ
            grown = rows_only and f.shape[0] > b.shape[0]
            if f.shape != b.shape and not (grown or (align is not None and rows_only)):
                raise CheckpointError(f"shape {list(f.shape)} does not match the base's {list(b.shape)}",
                                      model=mdl.label, file=f.file, tensor=name)
            if grown and align is None:  # tokenizer_source base: the base's rows, the extra ones dropped
                extra = f.shape[0] - b.shape[0]
                seen = dropped.setdefault(mdl.label, (extra, set()))
                dropped[mdl.label] = (max(seen[0], extra), seen[1] | {name})
                if not isinstance(f, TensorInfo):  # cut by its byte range: only a tensor read from a file
                    raise CheckpointError(f"has {extra} more vocabulary rows than the base and is computed (a LoRA "
                                          "target or a recast tensor), so its extra rows cannot be cut; use "
                                          "tokenizer_source: union or this model", model=mdl.label, tensor=name)
                f = TensorInfo(f.name, f.dtype, b.shape, f.file, f.start, b.numel * ITEMSIZE[f.dtype])
            fts.append(f)
        if align is not None and by_token:
            parts = (b, *fts)
            for p, info in enumerate(parts):
                if int(align.perm[p].max(initial=-1)) >= info.shape[0]:
                    who = base if p == 0 else models[p - 1]
                    raise CheckpointError(f"the tokenizer gives ids up to {int(align.perm[p].max())} but the tensor "
                                          f"has {info.shape[0]} rows", model=who.label, file=info.file, tensor=name)
            dtype = vocab.promoted([x.dtype for x in parts])
            b, fts = (vocab.RowsTensor(name, parts, 0, align, dtype),
                      [vocab.RowsTensor(name, parts, p, align, dtype) for p in range(1, len(parts))])
        out.append((name, b, tuple(fts)))
    for label, (extra, names) in dropped.items():
        warnings.warn(f"{label} has {extra} more vocabulary rows than the base ({', '.join(sorted(names))}): "
                      "they are dropped (tokenizer_source: base); tokenizer_source: union or this model keeps "
                      "them", stacklevel=2)
    ignored = sorted({n for mdl in models for n in mdl.tensors if n not in base.tensors})
    return out, ignored


def group_size(config: MergeConfig) -> int:
    """Chunk boundaries are multiples of this many elements: m for the n:m methods, else
    256 (the groups the report's balance figures count over, for every method)."""
    return int(config.value("m", default=256))


def engine_settings(config: MergeConfig, chunk_size: int | None, workers: int | None,
                    memory: int | None) -> tuple[int, int]:
    """Chunk size (elements) and worker count, derived from a memory budget when given.

    A chunk in flight holds its input pages (<= 4 bytes per element per model, base
    included), its output words (<= 4 bytes), k mask bits per element, the method's
    scratch (``Needs.scratch_bytes``) and, for LoRA models, their merged words and factor
    rows per element and a factor per chunk (``adapter.memory_needs``); two chunks per worker
    may be resident at once.
    """
    # Chunks wait on page faults as much as on the CPU: two per core keep the disk busy.
    workers = workers or 2 * (os.cpu_count() or 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"`workers` must be between 1 and {MAX_WORKERS}, got {workers}")
    if chunk_size is not None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ConfigError(f"`chunk_size` must be between 1 and {MAX_CHUNK} elements, got {chunk_size}")
        return chunk_size, workers
    if memory is None:
        return DEFAULT_CHUNK, workers
    k = len(config.models)
    lora_element, lora_chunk = adapter.memory_needs(s.path for s in config.models)
    per_element = 4 * (k + 1) + 4 + k / 8 + config.spec.needs(config).scratch_bytes + lora_element
    room = memory - RUNTIME_RESERVE - 2 * workers * lora_chunk
    if room < 64 * 1024 * per_element:
        raise ConfigError(f"`memory` {memory} bytes is too small; allow at least "
                          f"{(memory - room + 64 * 1024 * per_element) / 2**20:.0f} MiB")
    chunk = int(room / (2 * workers * per_element))
    return min(chunk, 1 << 24), workers


def make_plan(config: MergeConfig, chunk_size: int, shard_size: int, convert_dir: str | None = None,
              whole_rows: bool | None = None, stored: bool = False) -> Plan:
    """Open and validate every input, then lay out the chunk grid and the output shards.
    PyTorch .bin inputs are converted to safetensors in ``convert_dir``. ``stored``: the task
    vectors come from a store, so only the base is opened (it stands in for every model)."""
    if adapter.split_spec(config.base) is not None:
        raise ConfigError(f"base_model {config.base} is a LoRA adapter: give the checkpoint it applies to as the "
                          "base, and the adapter (or checkpoint+adapter) as a model")
    base = open_checkpoint(config.base, convert_dir)
    config = dataclasses.replace(config, layers=count_layers(base))  # where gradients are interpolated
    models = [base] * len(config.models) if stored else [
        adapter.open_model(s.path, config.base, base, lambda p: open_checkpoint(p, convert_dir)) for s in config.models]
    align = alignment(config, base, models) if not stored else None
    matched, ignored = match_tensors(config, base, models, align)
    m = group_size(config)
    whole_rows = config.spec.needs(config).whole_rows if whole_rows is None else whole_rows
    chunk_size = align_chunk_size(chunk_size, m)

    # Output shards: tensors in base order, a new shard when the next one would overflow.
    groups: list[list[tuple[str, str, tuple[int, ...], TensorInfo | Computed,
                            tuple[TensorInfo | Computed, ...]]]] = [[]]
    used = 0
    for name, b, fts in matched:
        own = b.parts[0].dtype if isinstance(b, vocab.RowsTensor) else b.dtype  # the base's, not the aligned rows'
        dtype = (config.dtype or own) if fts else b.dtype
        nbytes = b.numel * ITEMSIZE[dtype]
        if groups[-1] and used + nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, b.shape, b, fts))
        used += nbytes

    tensors: list[TensorJob] = []
    shards: list[OutShard] = []
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offsets = build_header([(n, d, shp) for n, d, shp, _, _ in group], {"format": "pt"})
        size = len(header)
        for (name, dtype, shape, b, fts), off in zip(group, offsets):
            tensors.append(TensorJob(name, shape, dtype, b, fts, s, len(header) + off,
                                     tensor_chunk_size(chunk_size, m, shape, whole_rows)))
            size += math.prod(shape) * ITEMSIZE[dtype]
        shards.append(OutShard(fname, header, size))

    chunks = [ChunkSpec(t, start, min(job.chunk, job.numel - start), start // job.chunk)
              for t, job in enumerate(tensors) if job.merged
              for start in range(0, job.numel, max(job.chunk, 1))]  # a zero-element tensor has no chunk
    return Plan(config, base, models, tensors, shards, chunks, chunk_size, ignored, m, align)


def count_layers(base: Checkpoint) -> int:
    """The base's layer count (config.json ``num_hidden_layers``, else the highest layer index
    in its tensor names + 1; 0 without layers): gradients spread over these."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = config_value(base.root, key)
        if isinstance(v, int) and v > 0:
            return v
    found = [layer_index(n) for n in base.tensors]
    return max((i for i in found if i is not None), default=-1) + 1


def alignment(config: MergeConfig, base: Checkpoint, models: list[Checkpoint]) -> vocab.Alignment | None:
    """The vocabulary alignment ``tokenizer_source`` asks for (None: the base's vocabulary)."""
    src = config.tokenizer_source
    if src is None:
        return None
    if not base.root or not all(m.root for m in models):
        raise ConfigError(f"tokenizer_source {src} needs every model as a folder with its tokenizer")
    align = vocab.align(base.root, [m.root for m in models], [base.label, *(m.label for m in models)], src,
                        None if src == "union" else hub.local_path(src))
    return None if align.identity and align.size == vocab.config_vocab_size(base.root) else align
