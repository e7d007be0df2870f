"""``merge()``: plan, run the chunk map, report, and move the result into place."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__, state, stats, writer
from .config import MergeConfig, load_config, parse_size
from . import baseline_kernels as BK
from .engine import SCHEDULERS, Job, execute, run_map
from .errors import ConfigError
from .plan import Plan, make_plan, tensor_chunk_size
from .progress import MergeProgress
from .selection import top_count, thresholds

DEFAULT_CHUNK = 1 << 22  # elements
RUNTIME_RESERVE = 256 << 20  # bytes for the interpreter, numba, dask and zarr


@dataclass
class MergeResult:
    """Where the merge went and what it did (the contents of cabs_report.json)."""

    out_dir: str
    report: dict[str, Any]


def engine_settings(plan_k: int, chunk_size: int | None, workers: int | None,
                    memory: int | None, fused: bool = True) -> tuple[int, int]:
    """Chunk size (elements) and worker count, derived from a memory budget when given.

    A chunk in flight holds its input pages (<= 4 bytes per element per model, base included),
    its output words (<= 4 bytes) and k mask bits per element.
    """
    # Chunks wait on page faults as much as on the CPU: two per core keep the disk busy.
    workers = workers or 2 * (os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if chunk_size is not None:
        if chunk_size < 1:
            raise ConfigError(f"--chunk-size must be positive, got {chunk_size}")
        return chunk_size, workers
    if memory is None:
        return DEFAULT_CHUNK, workers
    per_element = 4 * (plan_k + 1) + 4 + plan_k / 8 + (0 if fused else 5 * plan_k + 4)
    room = memory - RUNTIME_RESERVE
    if room < 64 * 1024 * per_element:
        raise ConfigError(f"--memory {memory} bytes is too small; allow at least "
                          f"{(RUNTIME_RESERVE + 64 * 1024 * per_element) / 2**20:.0f} MiB")
    # Two chunks per worker may be resident at once (one finishing, one starting).
    chunk = int(room / (2 * workers * per_element))
    return min(chunk, 1 << 24), workers


def _fingerprint(plan: Plan, save_masks: bool) -> str:
    inputs = []
    for ck in (plan.base, *plan.models):
        for f in ck.files:
            st = os.stat(f)
            inputs.append([f, st.st_size, st.st_mtime_ns])
    doc = {"version": __version__, "config": plan.config.describe(), "inputs": inputs,
           "shards": [(s.name, s.size) for s in plan.shards], "chunk": plan.chunk_size, "masks": save_masks}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def summarize(plan: Plan, rows: dict[int, np.ndarray]) -> dict[str, Any]:
    """Per-tensor and overall density, overlap and balance of the kept task-vector entries."""
    k = len(plan.models)
    per_tensor: dict[int, np.ndarray] = {}
    for i, row in rows.items():
        t = plan.chunks[i].tensor
        per_tensor[t] = per_tensor.get(t, 0) + row
    total = np.zeros(stats.width(k), np.int64)
    tensors = {}
    for t, row in sorted(per_tensor.items()):
        tensors[plan.tensors[t].name] = stats.describe(row, k, plan.tensors[t].numel)
        total += row
    overall = stats.describe(total, k, plan.merged_elements)
    for key in ("cv_rows", "cv_groups"):  # rows differ in length between tensors: average per-tensor CVs
        overall[key] = [_weighted([(d[key][i], d["numel"]) for d in tensors.values()]) for i in range(k)]
    return {**overall, "tensors": tensors}


def _weighted(pairs: list[tuple[float | None, int]]) -> float | None:
    """numel-weighted mean of the defined values."""
    pairs = [(v, w) for v, w in pairs if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def find_thresholds(job: Job, workers: int, scheduler: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Exact per-chunk thresholds for the methods that keep the top of |tau| per tensor or model."""
    plan, cfg = job.plan, job.plan.config
    by_tensor: dict[int, list[int]] = {}
    for i, ch in enumerate(plan.chunks):
        by_tensor.setdefault(ch.tensor, []).append(i)
    top = [t for t in by_tensor if job.sel[t].mode in (BK.SEL_TOP, BK.SEL_BAND)]
    if not top:
        return None, None
    if cfg.shared.get("scope") == "global":
        k = len(cfg.models)
        total = sum(plan.tensors[t].numel for t in top)
        groups = [[c for t in top for c in by_tensor[t]]]
        ranks = [[(top_count(cfg.model_param("density", i, "", 1.0), total), -1) for i in range(k)]]
    else:
        groups = [by_tensor[t] for t in top]
        ranks = [job.sel[t].ranks for t in top]
    ca = cfg.order if cfg.spec.selection == "ca" else None
    return thresholds(plan, groups, ranks, lambda fn, args: run_map(fn, args, workers, scheduler), ca_order=ca)


def run(cfg: MergeConfig, work: str, *, chunk_size: int | None = None, workers: int | None = None,
        memory: int | str | None = None, scheduler: str = "threads", shard_size: int | str = "5GB",
        save_masks: bool = False, allow_nonfinite: bool = False, quiet: bool = True,
        dry: bool = False) -> tuple[Plan, dict[str, Any]]:
    """Plan and run the chunk map in ``work`` (``work/model`` holds the output shards, or
    nothing when ``dry``: only the statistics and, with ``save_masks``, the masks are kept).
    Returns the plan and the report."""
    t0 = time.monotonic()
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    chunk, workers = engine_settings(len(cfg.models), chunk_size, workers,
                                     parse_size(memory) if memory is not None else None,
                                     fused=cfg.method in ("cabs", "task_arithmetic"))
    plan = make_plan(cfg, chunk, parse_size(shard_size), convert_dir=os.path.join(work, "converted"),
                     whole_rows=cfg.shared.get("scope") == "row")

    model_dir, state_path = os.path.join(work, "model"), os.path.join(work, "state.zarr")
    fp = _fingerprint(plan, save_masks)
    os.makedirs(work, exist_ok=True)
    masks = ({t.name: (t.numel, tensor_chunk_size(plan.chunk_size, cfg.m, t.shape)) for t in plan.tensors if t.merged}
             if save_masks else None)
    g = state.create(state_path, fp + ("-dry" if dry else ""), len(plan.chunks), len(cfg.models), masks)
    state.forget(state_path)
    previous = g["stats"][:] if plan.chunks else np.zeros((0, 1), np.int64)
    resumed = int((previous[:, 0] >= 0).sum()) if len(plan.chunks) else 0
    shard_paths = [] if dry else writer.preallocate(plan, model_dir, resume=resumed > 0)
    t_plan = time.monotonic()

    todo = [i for i in range(len(plan.chunks)) if previous[i, 0] < 0]
    job = Job.create(plan, shard_paths, state_path, save_masks, allow_nonfinite)
    job.dry = dry
    if todo:
        job.thr, job.bud = find_thresholds(job, workers, scheduler)
    t_thresholds = time.monotonic()
    sizes = {}
    for i in todo:
        c = plan.chunks[i]
        t = plan.tensors[c.tensor]
        sizes[("chunk", i)] = (c.count, c.count * sum(x.nbytes // max(t.numel, 1) for x in (t.base, *t.fts)))
    total_bytes = sum(b for _, b in sizes.values())
    bar = MergeProgress(sizes, total_bytes, quiet=quiet)
    rows = execute(job, os.path.join(work, "job.pkl"), todo, workers, scheduler, callbacks=(bar,))
    state.forget(state_path)
    for i in range(len(plan.chunks)):
        if i not in rows:
            rows[i] = previous[i]
    if not dry:
        writer.flush(model_dir)  # the output is on disk before the report's timings are taken
    t_merge = time.monotonic()

    report = summarize(plan, rows)
    report = {
        "tool": "cabs-stream", "version": __version__, "config": cfg.describe(),
        "models": [s.path for s in cfg.models], **report,
        "ignored_tensors": plan.ignored,
        "bytes_read": plan.input_bytes(), "bytes_written": 0 if dry else sum(s.size for s in plan.shards),
        "chunk_size": plan.chunk_size, "workers": workers, "scheduler": scheduler,
        "resumed_chunks": resumed,
        "seconds": {"plan": t_plan - t0, "thresholds": t_thresholds - t_plan, "merge": t_merge - t_thresholds,
                    "total": t_merge - t0},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return plan, report


def merge(config: MergeConfig | str, out_dir: str, *, chunk_size: int | None = None,
          workers: int | None = None, memory: int | str | None = None, scheduler: str = "threads",
          shard_size: int | str = "5GB", overwrite: bool = False, save_masks: bool = False,
          allow_nonfinite: bool = False, quiet: bool = True) -> MergeResult:
    """Merge a base and fine-tuned models into a Hugging Face folder at ``out_dir``.

    ``config`` is a ``MergeConfig`` (see ``build_config``) or the path of a YAML file. Every
    input is validated before anything is written; the result appears under ``out_dir`` only
    when complete. A rerun after an interruption resumes from the completed chunks.
    """
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    inputs = [cfg.base, *(s.path for s in cfg.models)] + ([cfg.tokenizer_source] if cfg.tokenizer_source else [])
    writer.check_output(out_dir, inputs, overwrite)
    work = writer.work_dir(out_dir)
    plan, report = run(cfg, work, chunk_size=chunk_size, workers=workers, memory=memory, scheduler=scheduler,
                       shard_size=shard_size, save_masks=save_masks, allow_nonfinite=allow_nonfinite, quiet=quiet)
    model_dir = os.path.join(work, "model")
    manifest = {"tool": "cabs-stream", "version": __version__, **cfg.describe(),
                "output_dtypes": sorted({t.out_dtype for t in plan.tensors}),
                "shards": [s.name for s in plan.shards]}
    writer.finish(plan, model_dir, out_dir, {"cabs_manifest.json": manifest, "cabs_report.json": report},
                  overwrite)
    return MergeResult(os.path.abspath(out_dir), report)
