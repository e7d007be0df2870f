"""``merge()``: plan, build and run the graph in a run context, report, move the result into place."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import MergeConfig, load_config, parse_size
from .errors import ConfigError, OutputError
from .io import output
from .io.inputs import LeaseGuard
from .plan import Plan, engine_settings, make_plan
from .report.progress import MergeProgress
from .report.summary import summarize
from .run import graph, schedule, tasks
from .run.context import RunContext
from .run.workstate import EXTRA, MASKS_NAME, MaskStore, WorkState


@dataclass
class MergeResult:
    """Where the merge went and what it did (the contents of cabs_report.json)."""

    out_dir: str
    report: dict[str, Any]


def _fingerprint(plan: Plan, save_masks: bool, dry: bool) -> str:
    """The configuration, the layout and the identity of every input file: path, size, mtime,
    ctime, inode and device. ctime cannot be set by a user (``cp -p``/``rsync -t`` restore
    mtime, not ctime), so a rewritten input never passes for the old one; hashing the contents
    would cost a full read of every input before each run."""
    inputs = []
    for ck in (plan.base, *plan.models):
        for f in ck.files:
            st = os.stat(f)
            inputs.append([f, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    doc = {"version": __version__, "config": plan.config.describe(), "inputs": inputs,
           "shards": [(s.name, s.size) for s in plan.shards], "chunk": plan.chunk_size, "masks": save_masks,
           "dry": dry}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def run(cfg: MergeConfig, work: str, *, chunk_size: int | None = None, workers: int | None = None,
        memory: int | str | None = None, scheduler: str = "threads", shard_size: int | str = "5GB",
        save_masks: bool = False, allow_nonfinite: bool = False, quiet: bool = True,
        dry: bool = False, durable: bool = False) -> tuple[Plan, dict[str, Any]]:
    """Plan and run the chunk map in ``work``: ``work/model`` receives the output shards (and,
    with ``save_masks``, ``cabs_masks.zarr``); a ``dry`` run writes no shards and keeps the
    masks (if asked) in ``work/cabs_masks.zarr``. Returns the plan and the report."""
    t0 = time.monotonic()
    if scheduler not in schedule.SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedule.SCHEDULERS)}")
    chunk, workers = engine_settings(cfg, chunk_size, workers, parse_size(memory) if memory is not None else None)
    plan = make_plan(cfg, chunk, parse_size(shard_size), convert_dir=os.path.join(work, "converted"))
    method, needs = cfg.spec, cfg.spec.needs(cfg)
    prep = [method.prepare(cfg, t) if t.merged else None for t in plan.tensors]
    k = len(cfg.models)

    model_dir = os.path.join(work, "model")
    fp = _fingerprint(plan, save_masks, dry)
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

    ctx = RunContext(plan, method, prep, shards, state, masks, allow_nonfinite, durable, uuid.uuid4().hex)
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
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return plan, report


def merge(config: MergeConfig | str, out_dir: str, *, chunk_size: int | None = None,
          workers: int | None = None, memory: int | str | None = None, scheduler: str = "threads",
          shard_size: int | str = "5GB", overwrite: bool = False, save_masks: bool = False,
          allow_nonfinite: bool = False, quiet: bool = True, durable: bool = False) -> MergeResult:
    """Merge a base and fine-tuned models into a Hugging Face folder at ``out_dir``.

    ``config`` is a ``MergeConfig`` (see ``build_config``) or the path of a YAML file. Every
    input is validated before anything is written; the result appears under ``out_dir`` only
    when complete. A rerun after an interruption resumes from the completed chunks, each
    verified before reuse. With ``save_masks`` the bit-packed masks are kept in
    ``out_dir/cabs_masks.zarr``; with ``durable`` every chunk is on disk before it is recorded
    done, so a resume after a power loss reuses them too.
    """
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    inputs = [cfg.base, *(s.path for s in cfg.models)] + ([cfg.tokenizer_source] if cfg.tokenizer_source else [])
    output.check_output(out_dir, inputs, overwrite)
    out_dir = os.path.abspath(out_dir)  # one spelling from here on (".." resolved as check_output did)
    if cfg.tokenizer_source:
        output.check_tokenizer_source(cfg.tokenizer_source)
    work = output.work_dir(out_dir)
    try:
        return _merge(cfg, out_dir, work, chunk_size=chunk_size, workers=workers, memory=memory,
                      scheduler=scheduler, shard_size=shard_size, overwrite=overwrite, save_masks=save_masks,
                      allow_nonfinite=allow_nonfinite, quiet=quiet, durable=durable)
    except OSError as e:  # what the checks could not foresee: a disk filling up, a file vanishing
        where = f" {e.filename}" if e.filename else ""
        raise OutputError(f"I/O error{where}: {e.strerror or e}; the work folder is kept, rerun to resume") from None
    except MemoryError:
        raise ConfigError("out of memory: lower --memory, --chunk-size or --workers") from None


def _merge(cfg: MergeConfig, out_dir: str, work: str, *, overwrite: bool, save_masks: bool, durable: bool,
           **engine: Any) -> MergeResult:
    lock = output.WorkLock(work, out_dir)
    try:
        plan, report = run(cfg, work, save_masks=save_masks, durable=durable, **engine)
        model_dir = os.path.join(work, "model")
        manifest = {"tool": "cabs-stream", "version": __version__, **cfg.describe(),
                    "output_dtypes": sorted({t.out_dtype for t in plan.tensors}),
                    "shards": [s.name for s in plan.shards], **({"masks": MASKS_NAME} if save_masks else {})}
        output.finish(plan, model_dir, out_dir, {"cabs_manifest.json": manifest, "cabs_report.json": report},
                      overwrite, before_rename=lambda: WorkState(os.path.join(work, "state.zarr")).invalidate())
    finally:
        lock.release()
        output.remove_if_empty(work)
    return MergeResult(os.path.abspath(out_dir), report)
