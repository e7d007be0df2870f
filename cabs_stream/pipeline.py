"""``merge()``: plan, build and run the graph in a run context, report, move the result into place."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import MergeConfig, ModelSpec, build_config, load_config, parse_size
from .methods import registry
from .errors import ConfigError, OutputError
from .io import output, platform
from .io.inputs import LeaseGuard
from .plan import Plan, engine_settings, make_plan, shard_bytes
from .report import model_card as card
from .report.progress import MergeProgress
from .report.summary import summarize
from .run import graph, schedule, tasks
from .run.context import RunContext
from .methods.from_store import FromStore
from .run.workstate import EXTRA, MASKS_NAME, MaskStore, WorkState
from .io.store import FORMAT as STORE_FORMAT
from .io.store import TaskVectorStore, open_store

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


def run(cfg: MergeConfig, work: str, *, chunk_size: int | None = None, workers: int | None = None,
        memory: int | str | None = None, scheduler: str = "threads", shard_size: int | str = "5GB",
        save_masks: bool = False, allow_nonfinite: bool = False, quiet: bool = True,
        dry: bool = False, durable: bool = False, store: str | None = None,
        from_store: FromStore | None = None) -> tuple[Plan, dict[str, Any]]:
    """Plan and run the chunk map in ``work``: ``work/model`` receives the output shards (and,
    with ``save_masks``, ``cabs_masks.zarr``); a ``dry`` run writes no shards and keeps the
    masks (if asked) in ``work/cabs_masks.zarr``. ``store``: also write the pruned task vectors
    to a task-vector store there; ``from_store``: take them from a store instead of the
    fine-tuned models. Returns the plan and the report."""
    t0 = time.monotonic()
    if scheduler not in schedule.SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedule.SCHEDULERS)}")
    chunk, workers = engine_settings(cfg, chunk_size, workers, parse_size(memory) if memory is not None else None)
    plan = make_plan(cfg, chunk, shard_bytes(shard_size), convert_dir=os.path.join(work, "converted"),
                     whole_rows=from_store.whole_rows if from_store else None, stored=from_store is not None)
    cfg = plan.config  # with the base's layer count (gradients)
    if store is not None and plan.vocab is not None:
        raise ConfigError(f"tokenizer_source {cfg.tokenizer_source} aligns vocabulary rows across the models, which a "
                          "task-vector store does not keep; merge directly (or use the base's vocabulary)")
    method = from_store or cfg.spec
    needs = method.needs(cfg)
    prep = [method.prepare(cfg, t) if t.merged else None for t in plan.tensors]
    k = len(cfg.models)

    model_dir = os.path.join(work, "model")
    fp = _fingerprint(plan, masks=save_masks, dry=dry, store=store is not None,
                      source=from_store.store_fingerprint if from_store else None)
    os.makedirs(work, exist_ok=True)
    state, previous, reopened = WorkState.open(os.path.join(work, "state.zarr"), fp, len(plan.chunks), k)
    shards = None if dry else output.ShardFiles(
        output.preallocate(plan, model_dir, resume=reopened, keep=(MASKS_NAME,) if save_masks else ()))
    masks = None
    if save_masks:
        masks = MaskStore.create(os.path.join(work if dry else model_dir, MASKS_NAME), k,
                                 {t.name: (t.numel, t.chunk) for t in plan.tensors if t.merged},
                                 {"fingerprint": fp, "models": [s.path for s in cfg.models],
                                  "layout": "<tensor>[i, j // 8] bit j % 8 (little-endian) = element j "
                                            "of the flattened tensor kept by model i"}, keep=reopened)
    tvs = None
    if store is not None:
        layout = cfg.spec.store_layout
        tvs = TaskVectorStore.create(store, plan, {
            "format": STORE_FORMAT, "fingerprint": fp, "config": cfg.describe(), "inputs": _inputs(plan),
            "nm": [list(cfg.ns), cfg.m] if layout == "nm" else None, "chunk_size": plan.chunk_size,
            "whole_rows": needs.whole_rows, "layout": STORE_LAYOUT[layout],
            "dtypes": {t.name: [f.dtype for f in t.fts] for t in plan.tensors if t.merged}},
            nm=(cfg.ns, cfg.m) if layout == "nm" else None, keep=reopened)

    ctx = RunContext(plan, method, prep, shards, state, masks, allow_nonfinite, durable, tvs, uuid.uuid4().hex)
    with LeaseGuard([f for ck in (plan.base, *plan.models) for f in ck.files]), ctx:
        recorded = [i for i in range(len(plan.chunks)) if previous[i, 0] >= 0]
        reused = {i for i in recorded if tasks.verify(ctx, i, previous[i])}
        if len(reused) < len(recorded):
            warnings.warn(f"{len(recorded) - len(reused)} chunks recorded by the interrupted run could not be "
                          "verified (output bytes or record changed); merging them again", stacklevel=2)
        todo = [i for i in range(len(plan.chunks)) if i not in reused]
        resumed = len(reused)
        t_plan = time.monotonic()
        dsk = graph.build(schedule.reference(ctx, scheduler), plan, needs, todo, dry)
        keys = [key for key in dsk if key[0] in ("chunk", "copy")]
        sizes = {}
        for i in todo:
            c = plan.chunks[i]
            t = plan.tensors[c.tensor]
            sizes[("chunk", i)] = (c.count, c.count * sum(x.nbytes // max(t.numel, 1) for x in (t.base, *t.fts)))
        bar = MergeProgress(sizes, sum(b for _, b in sizes.values()), quiet=quiet)
        results = schedule.execute(ctx, dsk, keys, scheduler, workers, callbacks=(bar,))
    rows = {key[1]: r for key, r in zip(keys, results) if key[0] == "chunk"}
    for i in range(len(plan.chunks)):
        if i not in rows:
            rows[i] = previous[i, :-EXTRA]
    if tvs is not None and plan.chunks:
        tvs.finish([rows[i] for i in range(len(plan.chunks))])
    if not dry:
        output.flush(model_dir)  # the output is on disk before the report's timings are taken
    t_merge = time.monotonic()

    report = {
        "tool": "cabs-stream", "version": __version__, "config": cfg.describe(),
        "models": [s.path for s in cfg.models], **summarize(plan, rows),
        "ignored_tensors": plan.ignored,
        "bytes_read": plan.input_bytes(), "bytes_written": 0 if dry else sum(s.size for s in plan.shards),
        "chunk_size": plan.chunk_size, "workers": workers, "scheduler": scheduler,
        "resumed_chunks": resumed,
        "seconds": {"plan": t_plan - t0, "merge": t_merge - t_plan, "total": t_merge - t0},
        "peak_rss_bytes": platform.peak_rss_bytes(),
    }
    return plan, report


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
    shard_bytes(shard_size)
    extra = [keep_task_vectors] if keep_task_vectors else []
    if keep_task_vectors:
        _check_storable(cfg)
        output.check_output(keep_task_vectors, _inputs_of(cfg), overwrite)
    return _guarded(cfg, out_dir, overwrite, extra, engine=dict(
        chunk_size=chunk_size, workers=workers, memory=memory, scheduler=scheduler, shard_size=shard_size,
        save_masks=save_masks, allow_nonfinite=allow_nonfinite, quiet=quiet, durable=durable),
        store_to=os.path.abspath(keep_task_vectors) if keep_task_vectors else None,
        finish=dict(copy_tokenizer=copy_tokenizer, model_card=model_card))


def prune(config: MergeConfig | str, store: str, *, chunk_size: int | None = None, workers: int | None = None,
          memory: int | str | None = None, scheduler: str = "threads", overwrite: bool = False,
          allow_nonfinite: bool = False, quiet: bool = True) -> MergeResult:
    """Write the pruned task vectors of ``config`` to a Zarr task-vector store at ``store``
    (no merged model), with the merge's streaming engine, budget, resume and atomic completion.
    ``merge_from_store`` then merges any lambdas reading only the base and the store."""
    cfg = _config(config)
    _check_storable(cfg)
    return _guarded(cfg, store, overwrite, [], engine=dict(
        chunk_size=chunk_size, workers=workers, memory=memory, scheduler=scheduler, allow_nonfinite=allow_nonfinite,
        quiet=quiet, dry=True), prune_only=True)


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
    source = FromStore(cfg.spec, tvs, attrs["dtypes"], bool(attrs["whole_rows"]))
    source.store_fingerprint = attrs["fingerprint"]
    return _guarded(cfg, out_dir, overwrite, [store], engine=dict(
        chunk_size=attrs["chunk_size"], workers=workers, scheduler=scheduler, shard_size=shard_size, quiet=quiet,
        durable=durable, from_store=source), models_are_inputs=False)


def config_from_description(d: dict, weights: list[float] | None = None) -> MergeConfig:
    """The ``MergeConfig`` a manifest or store describes (``MergeConfig.describe``)."""
    models = [ModelSpec(m["model"], {k: v for k, v in m.items() if k != "model"}) for m in d["models"]]
    if not registry.get(d["merge_method"]).param("weight"):
        models = [ModelSpec(s.path, {k: v for k, v in s.params if k != "weight"}) for s in models]
    return build_config(method=d["merge_method"], base=d["base_model"], models=models, weights=weights,
                        params=dict(d["parameters"]), dtype=d["dtype"], tokenizer_source=d["tokenizer_source"],
                        allow_missing=d["allow_missing"], exclude=d["exclude"])


def _config(config: MergeConfig | str) -> MergeConfig:
    return load_config(config) if isinstance(config, (str, os.PathLike)) else config


def _inputs_of(cfg: MergeConfig) -> list[str]:
    tok = cfg.tokenizer_source
    return [cfg.base, *(s.path for s in cfg.models)] + ([tok] if tok and tok != "union" else [])


def _check_storable(cfg: MergeConfig) -> None:
    if cfg.spec.store_layout is None or cfg.value("variant", default="paper") == "published-2024":
        raise ConfigError(f"merge_method {cfg.method} has no lambda-independent pruned task vectors to store; "
                          "merge it directly")


def _guarded(cfg: MergeConfig, out_dir: str, overwrite: bool, extra_inputs: list[str], engine: dict,
             store_to: str | None = None, prune_only: bool = False, models_are_inputs: bool = True,
             finish: dict | None = None) -> MergeResult:
    """Checks, the work folder and its lock, and errors the checks could not foresee."""
    inputs = (_inputs_of(cfg) if models_are_inputs else [cfg.base]) + extra_inputs
    output.check_output(out_dir, inputs, overwrite)
    out_dir = os.path.abspath(out_dir)  # one spelling from here on (".." resolved as check_output did)
    if cfg.tokenizer_source and cfg.tokenizer_source != "union":
        output.check_tokenizer_source(cfg.tokenizer_source)
    work = output.work_dir(out_dir)
    try:
        lock = output.WorkLock(work, out_dir)
        try:
            return _run_and_finish(cfg, out_dir, work, overwrite, engine, store_to, prune_only, **(finish or {}))
        finally:
            lock.release()
            output.remove_if_empty(work)
    except OSError as e:  # what the checks could not foresee: a disk filling up, a file vanishing
        where = f" {e.filename}" if e.filename else ""
        raise OutputError(f"I/O error{where}: {e.strerror or e}; the work folder is kept, rerun to resume") from None
    except MemoryError:
        raise ConfigError("out of memory: lower `memory`, `chunk_size` or `workers`") from None


def _run_and_finish(cfg: MergeConfig, out_dir: str, work: str, overwrite: bool, engine: dict,
                    store_to: str | None, prune_only: bool, copy_tokenizer: bool = True,
                    model_card: bool = True) -> MergeResult:
    model_dir = os.path.join(work, "model")
    store_dir = model_dir if prune_only else (os.path.join(work, "store.zarr") if store_to else None)
    plan, report = run(cfg, work, store=store_dir, **engine)
    forget = lambda: WorkState(os.path.join(work, "state.zarr")).invalidate()  # noqa: E731
    if prune_only:
        output.move_into_place(model_dir, out_dir, overwrite, before_rename=forget)
        return MergeResult(out_dir, report)
    source = engine.get("from_store")
    manifest = {"tool": "cabs-stream", "version": __version__, **cfg.describe(),
                "output_dtypes": sorted({t.out_dtype for t in plan.tensors}),
                "shards": [s.name for s in plan.shards], **({"masks": MASKS_NAME} if engine.get("save_masks") else {}),
                **({"from_store": source.store.path} if source else {})}
    if store_to:
        output.flush(store_dir)
        output.move_into_place(store_dir, store_to, overwrite, remove_work=False)
    if model_card:
        with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card.model_card(cfg, report, os.path.basename(out_dir)))
    output.finish(plan, model_dir, out_dir, {"cabs_manifest.json": manifest, "cabs_report.json": report},
                  overwrite, before_rename=forget, copy_tokenizer=copy_tokenizer)
    return MergeResult(out_dir, report)
