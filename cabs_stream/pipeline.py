"""``merge()``, ``prune()``, ``merge_from_store()``: the checks, the work folder, then one run
(plan -> run context -> graph -> schedule -> report) and the finish (``finish.py``).

A run's steps are the functions below ``execute``, each named for what it does; the engine's
options (``options.EngineOptions``) never change the merged bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ._version import __version__
from .config import MergeConfig, ModelSpec, build_config, load_config, parse_size
from .errors import ConfigError, OutputError
from .finish import finish_model, finish_store, manifest
from .io import output, platform
from .io.inputs import LeaseGuard
from .io.store import FORMAT as STORE_FORMAT
from .io.store import TaskVectorStore, open_store
from .io.workstate import EXTRA, MASKS_NAME, SavedMasks, WorkState
from .methods import registry
from .methods.base import Method, Needs
from .methods.from_store import FromStore
from .options import EngineOptions, FinishOptions
from .plan import Plan, engine_settings, make_plan, shard_bytes
from .report.progress import MergeProgress
from .report.summary import summarize
from .run import graph, schedule, tasks
from .run.context import RunContext

STORE_LAYOUT = {
    "nm": "<tensor>/mask: uint8 (k, ceil(numel/8)), bit j of byte j//8 (little-endian) = element j kept by model i; "
          "<tensor>/values_<i>: uint16 raw words of model i's weights at its kept positions, n_i per group of m "
          "in position order, zero-padded (attrs nm = [[n_i per model], m])",
    "dense": "<tensor>/mask as for n:m; <tensor>/values: float32 (k, numel), kept task-vector entries (after "
             "DELLA's 1/p), 0 elsewhere",
}


@dataclass
class MergeResult:
    """Where the merge went and what it did (the contents of cabs_report.json)."""

    out_dir: str
    report: dict[str, Any]


# ---------------------------------------------------------------------- the public entry points
def merge(config: MergeConfig | str, out_dir: str, *, chunk_size: int | None = None,
          workers: int | None = None, memory: int | str | None = None, scheduler: str = "threads",
          shard_size: int | str = "5GB", overwrite: bool = False, save_masks: bool = False,
          allow_nonfinite: bool = False, quiet: bool = True, durable: bool = False,
          keep_task_vectors: str | None = None, copy_tokenizer: bool = True, model_card: bool = True) -> MergeResult:
    """Merge a base and fine-tuned models into a Hugging Face folder at ``out_dir``.

    ``config`` is a ``MergeConfig`` (see ``build_config``) or the path of a YAML file. Every
    input is validated before anything is written; the result appears under ``out_dir`` only
    when complete. A rerun after an interruption resumes from the completed chunks, each
    verified before reuse. With ``save_masks`` the bit-packed masks are kept in
    ``out_dir/cabs_masks.zarr``; with ``durable`` every chunk is on disk before it is recorded
    done, so a resume after a power loss reuses them too; ``keep_task_vectors`` also writes a
    task-vector store there (see ``prune``). ``copy_tokenizer`` and ``model_card`` (README.md)
    are on by default, as in mergekit.
    """
    cfg = _config(config)
    engine = EngineOptions(chunk_size, workers, memory, scheduler, shard_size, save_masks, allow_nonfinite, quiet,
                           durable)
    shard_bytes(shard_size)
    store_to = os.path.abspath(keep_task_vectors) if keep_task_vectors else None
    if keep_task_vectors:
        _check_storable(cfg)
        output.check_output(keep_task_vectors, _inputs_of(cfg), overwrite)
    finish = FinishOptions(copy_tokenizer, model_card)
    with _work_folder(out_dir, _inputs_of(cfg) + ([keep_task_vectors] if keep_task_vectors else []), overwrite,
                      cfg.tokenizer_source) as (out_dir, work):
        store_dir = os.path.join(work, "store.zarr") if store_to else None
        plan, report = execute(cfg, work, engine, store=store_dir)
        if store_to and store_dir:
            finish_store(store_dir, store_to, overwrite, remove_work=False)
        finish_model(plan, _model_dir(work), out_dir, report, manifest(plan, save_masks=save_masks, from_store=None),
                     finish, overwrite, _forget(work))
    return MergeResult(out_dir, report)


def prune(config: MergeConfig | str, store: str, *, chunk_size: int | None = None, workers: int | None = None,
          memory: int | str | None = None, scheduler: str = "threads", overwrite: bool = False,
          allow_nonfinite: bool = False, quiet: bool = True) -> MergeResult:
    """Write the pruned task vectors of ``config`` to a Zarr task-vector store at ``store``
    (no merged model), with the merge's streaming engine, budget, resume and atomic completion.
    ``merge_from_store`` then merges any lambdas reading only the base and the store."""
    cfg = _config(config)
    _check_storable(cfg)
    engine = EngineOptions(chunk_size, workers, memory, scheduler, allow_nonfinite=allow_nonfinite, quiet=quiet)
    with _work_folder(store, _inputs_of(cfg), overwrite, cfg.tokenizer_source) as (store, work):
        _, report = execute(cfg, work, engine, dry=True, store=_model_dir(work))
        finish_store(_model_dir(work), store, overwrite, before_rename=_forget(work))
    return MergeResult(store, report)


def merge_from_store(store: str, out_dir: str, weights: list[float] | None = None, *,
                     workers: int | None = None, scheduler: str = "threads", shard_size: int | str = "5GB",
                     overwrite: bool = False, quiet: bool = True, durable: bool = False) -> MergeResult:
    """Merge from a task-vector store with new ``weights`` (one per model; default: the
    store's), reading only the base and the store. Bit-identical to a fresh ``merge`` of the
    store's configuration with those weights. A store whose base or inputs changed since it
    was written is refused."""
    shard_bytes(shard_size)
    tvs, attrs = open_store(store)
    cfg = config_from_description(attrs["config"], weights)
    for entry in attrs["inputs"]:
        path = entry[0]
        if os.path.exists(path) and identity(path) != entry:
            raise ConfigError(f"{path} changed since the task-vector store {store} was written; prune again")
        if not os.path.exists(path) and os.path.abspath(path).startswith(os.path.abspath(cfg.base)):
            raise ConfigError(f"the base file {path} of the task-vector store {store} is gone")
    source = FromStore(cfg.spec, tvs, attrs["dtypes"], bool(attrs["whole_rows"]), attrs["fingerprint"])
    engine = EngineOptions(attrs["chunk_size"], workers, None, scheduler, shard_size, quiet=quiet, durable=durable)
    with _work_folder(out_dir, [cfg.base, store], overwrite, cfg.tokenizer_source) as (out_dir, work):
        plan, report = execute(cfg, work, engine, source=source)
        finish_model(plan, _model_dir(work), out_dir, report, manifest(plan, save_masks=False, from_store=tvs.path),
                     FinishOptions(), overwrite, _forget(work))
    return MergeResult(out_dir, report)


def config_from_description(d: dict, weights: list[float] | None = None) -> MergeConfig:
    """The ``MergeConfig`` a manifest or store describes (``MergeConfig.describe``)."""
    models = [ModelSpec(m["model"], {k: v for k, v in m.items() if k != "model"}) for m in d["models"]]
    if not registry.get(d["merge_method"]).param("weight"):
        models = [ModelSpec(s.path, {k: v for k, v in s.params if k != "weight"}) for s in models]
    return build_config(method=d["merge_method"], base=d["base_model"], models=models, weights=weights,
                        params=dict(d["parameters"]), dtype=d["dtype"], tokenizer_source=d["tokenizer_source"],
                        allow_missing=d["allow_missing"], exclude=d["exclude"])


# ---------------------------------------------------------------------- one run
def execute(cfg: MergeConfig, work: str, engine: EngineOptions, *, dry: bool = False, store: str | None = None,
            source: FromStore | None = None) -> tuple[Plan, dict[str, Any]]:
    """Plan and run the chunk map in ``work``: ``work/model`` receives the output shards (and,
    with ``save_masks``, ``cabs_masks.zarr``); a ``dry`` run writes no shards and keeps the
    masks (if asked) in ``work/cabs_masks.zarr``. ``store``: also write the pruned task vectors
    to a task-vector store there; ``source``: take them from a store instead of the
    fine-tuned models. Returns the plan and the report."""
    t0 = time.monotonic()
    chunk, workers = engine_settings(cfg, engine.chunk_size, engine.workers,
                                     parse_size(engine.memory) if engine.memory is not None else None)
    plan = make_plan(cfg, chunk, shard_bytes(engine.shard_size), convert_dir=os.path.join(work, "converted"),
                     whole_rows=source.whole_rows if source else None, stored=source is not None)
    cfg = plan.config  # with the base's layer count (gradients)
    if store is not None and plan.vocab is not None:
        raise ConfigError(f"tokenizer_source {cfg.tokenizer_source} aligns vocabulary rows across the models, which a "
                          "task-vector store does not keep; merge directly (or use the base's vocabulary)")
    method: Method = source or cfg.spec
    needs = method.needs(cfg)
    prep = [method.prepare(cfg, t) if t.merged else None for t in plan.tensors]  # may refuse a parameter
    fp = _fingerprint(plan, masks=engine.save_masks, dry=dry, store=store is not None,
                      source=source.store_fingerprint if source else None)
    os.makedirs(work, exist_ok=True)
    state, previous, reopened = WorkState.open(os.path.join(work, "state.zarr"), fp, len(plan.chunks), cfg.k)
    ctx = _open_run(plan, method, prep, work, engine, state, fp, reopened, dry, store, needs)
    with LeaseGuard([f for ck in (plan.base, *plan.models) for f in ck.files]), ctx:
        todo, resumed = _chunks_to_merge(ctx, previous)
        t_plan = time.monotonic()
        rows = _run_graph(ctx, needs, todo, engine, workers, dry)
    for i in range(len(plan.chunks)):
        if i not in rows:
            rows[i] = previous[i, :-EXTRA]
    if ctx.store is not None and plan.chunks:
        ctx.store.finish([rows[i] for i in range(len(plan.chunks))])
    if not dry:
        output.flush(_model_dir(work))  # the output is on disk before the report's timings are taken
    t_merge = time.monotonic()
    return plan, _report(plan, rows, engine, workers, resumed, dry,
                         {"plan": t_plan - t0, "merge": t_merge - t_plan, "total": t_merge - t0})


def _open_run(plan: Plan, method: Method, prep: list[Any], work: str, engine: EngineOptions, state: WorkState,
              fp: str, reopened: bool, dry: bool, store: str | None, needs: Needs) -> RunContext:
    """The run context: the output shards, the saved masks and the task-vector store (each
    reopened when resuming the same configuration)."""
    cfg = plan.config
    k = cfg.k
    model_dir = _model_dir(work)
    shards = None if dry else output.ShardFiles(
        output.preallocate(plan.shards, model_dir, resume=reopened, keep=(MASKS_NAME,) if engine.save_masks else ()))
    masks = None
    if engine.save_masks:
        masks = SavedMasks.create(os.path.join(work if dry else model_dir, MASKS_NAME), k,
                                  {t.name: (t.numel, t.chunk) for t in plan.tensors if t.merged},
                                  {"fingerprint": fp, "models": [s.path for s in cfg.models],
                                   "layout": "<tensor>[i, j // 8] bit j % 8 (little-endian) = element j "
                                             "of the flattened tensor kept by model i"}, keep=reopened)
    tvs = None
    if store is not None:
        layout = cfg.spec.store_layout(cfg)
        assert layout is not None  # checked by _check_storable
        nm = (cfg.ns, cfg.m) if layout == "nm" else None
        tvs = TaskVectorStore.create(store, [t for t in plan.tensors if t.merged], len(plan.chunks), k, {
            "format": STORE_FORMAT, "fingerprint": fp, "config": cfg.describe(), "inputs": _inputs(plan),
            "nm": [list(cfg.ns), cfg.m] if nm else None, "chunk_size": plan.chunk_size,
            "whole_rows": needs.whole_rows, "layout": STORE_LAYOUT[layout],
            "dtypes": {t.name: [f.dtype for f in t.fts] for t in plan.tensors if t.merged}},
            nm=nm, keep=reopened)
    return RunContext(plan, method, prep, shards, state, masks, engine.allow_nonfinite, engine.durable, tvs,
                      uuid.uuid4().hex)


def _chunks_to_merge(ctx: RunContext, previous: np.ndarray) -> tuple[list[int], int]:
    """The chunks still to merge (those an interrupted run recorded are verified first) and
    how many are reused."""
    n = len(ctx.plan.chunks)
    recorded = [i for i in range(n) if previous[i, 0] >= 0]
    reused = {i for i in recorded if tasks.verify(ctx, i, previous[i])}
    if len(reused) < len(recorded):
        warnings.warn(f"{len(recorded) - len(reused)} chunks recorded by the interrupted run could not be "
                      "verified (output bytes or record changed); merging them again", stacklevel=3)
    return [i for i in range(n) if i not in reused], len(reused)


def _run_graph(ctx: RunContext, needs: Needs, todo: list[int], engine: EngineOptions, workers: int,
               dry: bool) -> dict[int, np.ndarray]:
    """Build the graph of the chunks ``todo`` and run it with a progress bar; the stats row
    of every merged chunk."""
    plan = ctx.plan
    dsk = graph.build(schedule.reference(ctx, engine.scheduler), plan, needs, todo, dry)
    keys = [key for key in dsk if key[0] in ("chunk", "copy")]
    sizes: dict[object, tuple[int, int]] = {}  # task key -> (elements, input bytes), as MergeProgress takes
    for i in todo:
        c = plan.chunks[i]
        t = plan.tensors[c.tensor]
        sizes[("chunk", i)] = (c.count, c.count * sum(x.nbytes // max(t.numel, 1) for x in (t.base, *t.fts)))
    bar = MergeProgress(sizes, sum(b for _, b in sizes.values()), quiet=engine.quiet)
    results = schedule.execute(ctx, dsk, keys, engine.scheduler, workers, callbacks=(bar,))
    return {key[1]: r for key, r in zip(keys, results) if key[0] == "chunk"}


def _report(plan: Plan, rows: dict[int, np.ndarray], engine: EngineOptions, workers: int, resumed: int, dry: bool,
            seconds: dict[str, float]) -> dict[str, Any]:
    cfg = plan.config
    return {
        "tool": "cabs-stream", "version": __version__, "config": cfg.describe(),
        "models": [s.path for s in cfg.models], **summarize(plan, rows),
        "ignored_tensors": plan.ignored,
        "bytes_read": plan.input_bytes(), "bytes_written": 0 if dry else sum(s.size for s in plan.shards),
        "chunk_size": plan.chunk_size, "workers": workers, "scheduler": engine.scheduler,
        "resumed_chunks": resumed, "seconds": seconds, "peak_rss_bytes": platform.peak_rss_bytes(),
    }


# ---------------------------------------------------------------------- around a run
def identity(path: str) -> list:
    """What identifies an input file: path, size, mtime, ctime, inode and device. ctime cannot
    be set by a user (``cp -p``/``rsync -t`` restore mtime, not ctime), so a rewritten input
    never passes for the old one; hashing the contents would cost a full read of every input
    before each run."""
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _inputs(plan: Plan) -> list[list]:
    return [identity(f) for ck in (plan.base, *plan.models) for f in dict.fromkeys(ck.files)]


def _fingerprint(plan: Plan, **extra: Any) -> str:
    """The configuration, the output layout and the identity of every input file."""
    doc = {"version": __version__, "config": plan.config.describe(), "inputs": _inputs(plan),
           "shards": [(s.name, s.size) for s in plan.shards], "chunk": plan.chunk_size, **extra}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _config(config: MergeConfig | str) -> MergeConfig:
    return load_config(config) if isinstance(config, (str, os.PathLike)) else config


def _inputs_of(cfg: MergeConfig) -> list[str]:
    tok = cfg.tokenizer_source
    return [cfg.base, *(s.path for s in cfg.models)] + ([tok] if tok and tok != "union" else [])


def _check_storable(cfg: MergeConfig) -> None:
    if cfg.spec.store_layout(cfg) is None:
        raise ConfigError(f"merge_method {cfg.method} has no lambda-independent pruned task vectors to store; "
                          "merge it directly")


def _model_dir(work: str) -> str:
    return os.path.join(work, "model")


def _forget(work: str) -> Any:
    """Drops the work state (run just before the output is renamed into place)."""
    return lambda: WorkState(os.path.join(work, "state.zarr")).invalidate()


@contextlib.contextmanager
def _work_folder(out_dir: str, inputs: list[str], overwrite: bool, tokenizer_source: str | None) \
        -> Iterator[tuple[str, str]]:
    """The output checks, then the private work folder beside ``out_dir`` under its lock;
    yields (the output's absolute path, the work folder). Errors the checks could not foresee
    (a disk filling up, a file vanishing) become one clear error; the work folder is kept to
    resume from, or removed when it holds nothing."""
    output.check_output(out_dir, inputs, overwrite)
    out_dir = os.path.abspath(out_dir)  # one spelling from here on (".." resolved as check_output did)
    if tokenizer_source and tokenizer_source != "union":
        output.check_tokenizer_source(tokenizer_source)
    work = output.work_dir(out_dir)
    try:
        lock = output.WorkLock(work, out_dir)
        try:
            yield out_dir, work
        finally:
            lock.release()
            output.remove_if_empty(work)
    except OSError as e:  # what the checks could not foresee: a disk filling up, a file vanishing
        where = f" {e.filename}" if e.filename else ""
        raise OutputError(f"I/O error{where}: {e.strerror or e}; the work folder is kept, rerun to resume") from None
    except MemoryError:
        raise ConfigError("out of memory: lower `memory`, `chunk_size` or `workers`") from None
