"""Choosing lambda: prune once into a task-vector store, then merge and score many weight points.

Every point is ``merge_from_store`` (the base and the store only, no selection) followed by the
evaluator: a Python callable ``evaluate(model_dir) -> float``, or a command line whose
``{model}`` is replaced by the merged folder and whose score is the last number it prints.
Points come from a grid (one shared lambda, or a grid per model), the paper's coarse-then-fine
search (``refine``: a 0.1 grid, then 0.01 around the best), or Optuna (``search="optuna"``:
per-model lambdas, seeded). Results go to ``sweep.json`` (every point, and ``best``),
``sweep.csv`` and ``sweep.png``; an interrupted sweep resumes at the first missing point.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Any, Callable

import numpy as np

from .config import MergeConfig, load_config
from .errors import ConfigError, OutputError
from .io import output
from .io.store import open_store
from .pipeline import merge_from_store, prune

Evaluator = Callable[[str], float]
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf(?:inity)?|nan", re.IGNORECASE)
MAX_POINTS = 2000


def grid(spec: str) -> list[float]:
    """'0.8:2.0:0.1' -> [0.8, 0.9, ..., 2.0] (rounded to the step's decimals); '1.2' -> [1.2]."""
    parts = spec.split(":")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"cannot read the grid {spec!r}; write LO:HI:STEP, e.g. 0.8:2.0:0.1") from None
    if len(nums) == 1:
        return nums
    if len(nums) != 3 or not all(math.isfinite(x) for x in nums) or nums[2] <= 0 or nums[1] < nums[0]:
        raise ConfigError(f"grid {spec!r} must be LO:HI:STEP with LO <= HI and STEP > 0")
    lo, hi, step = nums
    count = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if count > MAX_POINTS:
        raise ConfigError(f"grid {spec!r} has {count} points; at most {MAX_POINTS}")
    digits = max(0, -math.floor(math.log10(step)) + 2)
    return [round(lo + i * step, digits) for i in range(count)]


def score_of(text: str) -> float | None:
    """The last number printed (negative numbers and exponents included), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def command_evaluator(command: str, timeout: float | None = None) -> Evaluator:
    """An evaluator running ``command`` (``{model}`` = the merged folder; no shell)."""
    args = shlex.split(command)
    if not any("{model}" in a for a in args):
        raise ConfigError("the `evaluate` command must contain {model} (the merged folder's place)")

    def evaluate(model: str) -> float:
        r = subprocess.run([a.replace("{model}", model) for a in args], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            tail = " ".join((r.stderr or r.stdout).split())[-300:]
            raise EvalError(f"exit code {r.returncode}: {tail}")
        value = score_of(r.stdout)
        if value is None:
            raise EvalError(f"printed no number: {' '.join(r.stdout.split())[-200:]!r}")
        return value
    return evaluate


class EvalError(Exception):
    """The evaluator failed on one point (the sweep records it and goes on)."""


class Sweep:
    """One sweep folder: the store, the points evaluated so far, the kept merged folders."""

    def __init__(self, cfg: MergeConfig, out_dir: str, evaluate: Evaluator | None, minimize: bool, keep: str,
                 quiet: bool, engine: dict) -> None:
        if keep not in ("best", "all"):
            raise ConfigError(f"keep must be 'best' or 'all', got {keep!r}")
        self.cfg, self.out_dir, self.evaluate = cfg, os.path.abspath(out_dir), evaluate
        self.minimize, self.keep, self.quiet, self.engine = minimize, keep, quiet, engine
        self.store = os.path.join(self.out_dir, "store.zarr")
        self.points: list[dict] = []
        self.k = len(cfg.models)

    # -------------------------------------------------------------- state
    def open(self) -> None:
        inputs = [self.cfg.base, *(s.path for s in self.cfg.models)]
        if os.path.lexists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise OutputError(f"sweep folder {self.out_dir} exists and is not a folder")
        output.check_output(self.out_dir, inputs, overwrite=True)
        os.makedirs(os.path.join(self.out_dir, "points"), exist_ok=True)
        for folder, what in ((self.out_dir, "sweep folder"), (os.path.join(self.out_dir, "points"), "sweep folder")):
            output.check_own_folder(folder, what)  # nothing planted in it is read, reused or deleted
        path = os.path.join(self.out_dir, "sweep.json")
        if os.path.lexists(path):
            doc = self._load(path)
            if doc.get("config") != self.cfg.describe():
                raise ConfigError(f"{self.out_dir} holds a sweep of another configuration; choose another folder")
            self.points = doc["points"]
        if os.path.lexists(self.store):
            output.check_own_folder(self.store, "task-vector store")
            _, attrs = open_store(self.store)
            if attrs["config"] != self.cfg.describe():
                raise ConfigError(f"{self.store} was pruned with another configuration; choose another folder")
        else:
            prune(self.cfg, self.store, quiet=self.quiet, **self.engine)

    def _load(self, path: str) -> dict:
        """``sweep.json`` as written by ``save``, checked point by point (a damaged or edited
        file is refused, never trusted: its folders are the ones this sweep may delete)."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} cannot be read ({type(e).__name__}); remove it to start the sweep again") \
                from None
        points = doc.get("points") if isinstance(doc, dict) else None
        if not isinstance(points, list) or not all(self._valid(p) for p in points):
            raise ConfigError(f"{path} is not a sweep record of this tool (a point is damaged or was edited); remove "
                              "it to start the sweep again")
        return doc

    def _valid(self, p: object) -> bool:
        num = (int, float)
        return (isinstance(p, dict) and set(p) == {"weights", "score", "error", "folder", "seconds"}
                and isinstance(p["weights"], list) and len(p["weights"]) == self.k
                and all(isinstance(w, num) and not isinstance(w, bool) for w in p["weights"])
                and (p["score"] is None or isinstance(p["score"], num)) and isinstance(p["seconds"], num)
                and (p["error"] is None or isinstance(p["error"], str))
                and p["folder"] in (None, self._folder(p["weights"])))

    def _folder(self, weights: list[float]) -> str:
        """The only folder a point may have: named for its weights, under ``points/``."""
        return os.path.join(self.out_dir, "points", "w_" + "_".join(f"{w:g}" for w in weights))

    def save(self) -> None:
        best = self.best()
        doc = {"config": self.cfg.describe(), "store": self.store, "minimize": self.minimize,
               "models": [s.path for s in self.cfg.models], "points": self.points,
               "best": {k: best[k] for k in ("weights", "score", "folder")} if best else None}
        output.write_json(os.path.join(self.out_dir, "sweep.json"), doc)
        table = io.StringIO()
        w = csv.writer(table)
        w.writerow([f"weight_{i + 1}" for i in range(self.k)] + ["score", "error", "seconds"])
        for p in self.points:
            w.writerow([*p["weights"], "" if p["score"] is None else p["score"], p["error"] or "", p["seconds"]])
        output.write_atomic(os.path.join(self.out_dir, "sweep.csv"), table.getvalue())

    def best(self) -> dict | None:
        scored = [p for p in self.points if p["score"] is not None and not math.isnan(p["score"])]
        if not scored:
            return None
        return (min if self.minimize else max)(scored, key=lambda p: p["score"])

    def better(self, a: float, b: float) -> bool:
        return a < b if self.minimize else a > b

    # -------------------------------------------------------------- one point
    def point(self, weights: list[float]) -> dict:
        """Merge and score ``weights`` (or return the recorded result)."""
        weights = [round(float(w), 6) for w in weights]
        for p in self.points:
            if p["weights"] == weights:
                return p
        folder = self._folder(weights)
        name = os.path.basename(folder)
        t0 = time.monotonic()
        if not self.quiet:  # then the merge's own progress (a bar on a terminal, else log lines)
            print(f"cabs-stream sweep: merging {name} (point {len(self.points) + 1})", flush=True)
        merge_from_store(self.store, folder, weights, overwrite=True, quiet=self.quiet,
                         **{k: v for k, v in self.engine.items() if k in ("workers", "scheduler")})
        score, error = None, None
        if self.evaluate is not None:
            try:
                score = float(self.evaluate(folder))
            except EvalError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - a user's evaluator failing on one point
                error = f"{type(e).__name__}: {e}"
        p = {"weights": weights, "score": score, "error": error, "folder": folder,
             "seconds": round(time.monotonic() - t0, 3)}
        self.points.append(p)
        if error and not self.quiet:
            print(f"cabs-stream sweep: {name}: evaluation failed: {error}", flush=True)
        elif not self.quiet:
            print(f"cabs-stream sweep: {name}: score {score}", flush=True)
        if self.keep == "best" and self.evaluate is not None:
            best = self.best()
            for q in self.points:  # keep only the best point's folder (a folder this sweep named and made)
                if q is not best and q["folder"] == self._folder(q["weights"]):
                    if os.path.isdir(q["folder"]) and not os.path.islink(q["folder"]):
                        shutil.rmtree(q["folder"], ignore_errors=True)
                    q["folder"] = None
        self.save()
        return p


def sweep(config: MergeConfig | str, out_dir: str, *, weights: str | None = None,
          weights_per_model: list[str] | None = None, evaluate: Evaluator | str | None = None,
          minimize: bool = False, keep: str = "best", refine: bool = False, search: str | None = None,
          trials: int = 30, search_range: tuple[float, float] = (0.0, 2.0), sampler: str = "gp",
          seed: int = 0, max_points: int = 400, quiet: bool = True, **engine: Any) -> dict:
    """Build the store once, then merge and score points; returns the contents of sweep.json.

    ``weights``: one shared lambda grid 'LO:HI:STEP'; ``weights_per_model``: one grid per model
    (or one for all), their product capped at ``max_points``; ``refine``: the 0.1 grid over
    ``weights`` (default 0.1:3.0), then 0.01 around the best; ``search='optuna'``: ``trials``
    per-model points in ``search_range`` with a seeded ``sampler`` (gp, tpe or cmaes).
    ``evaluate``: a callable on the merged folder, or a command with ``{model}``.
    """
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    if not cfg.spec.param("weight"):
        raise ConfigError(f"merge_method {cfg.method} has no per-model weight to sweep")
    ev = command_evaluator(evaluate) if isinstance(evaluate, str) else evaluate
    if (refine or search) and ev is None:
        raise ConfigError("refine and search need an evaluator (`evaluate`)")
    modes = sum(x is not None and x is not False for x in (weights_per_model, search)) + bool(refine)
    if modes > 1:
        raise ConfigError("give one of `weights_per_model`, `refine=True` or `search`")
    sw = Sweep(cfg, out_dir, ev, minimize, keep, quiet, engine)
    sw.open()
    k = sw.k
    if search == "optuna":
        _optuna(sw, trials, search_range, sampler, seed)
    elif search is not None:
        raise ConfigError(f"unknown search {search!r}; use optuna")
    elif refine:  # the range of --weights (any step given is replaced by the 0.1 then 0.01 steps)
        span = grid(":".join((weights or "0.1:3.0").split(":")[:2]) + ":0.1")
        lo, hi = span[0], span[-1]
        coarse = span
        for w in coarse:
            sw.point([w] * k)
        best = sw.best()
        if best is not None:
            c = best["weights"][0]
            for w in grid(f"{max(lo, round(c - 0.1, 2))}:{min(hi, round(c + 0.1, 2))}:0.01"):
                sw.point([w] * k)
    else:
        if weights_per_model:
            if len(weights_per_model) not in (1, k):
                raise ConfigError(f"give one `weights_per_model` grid, or one per model ({k})")
            axes = [grid(g) for g in (weights_per_model * k if len(weights_per_model) == 1 else weights_per_model)]
            count = math.prod(len(a) for a in axes)
            if count > max_points:
                raise ConfigError(f"the per-model grid has {count} points; at most {max_points} (`max_points`)")
            points = [list(p) for p in itertools.product(*axes)]
        else:
            points = [[w] * k for w in grid(weights or "1.0")]
        for p in points:
            sw.point(p)
    _plot(sw)
    with open(os.path.join(sw.out_dir, "sweep.json"), encoding="utf-8") as f:
        return json.load(f)


def _optuna(sw: Sweep, trials: int, search_range: tuple[float, float], sampler: str, seed: int) -> None:
    try:
        import optuna
    except ImportError:
        raise ConfigError("`search` optuna needs optuna: pip install 'cabs-stream[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lo, hi = search_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"`search_range` must be LO:HI with LO < HI, got {lo}:{hi}")
    make = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
            "gp": lambda: optuna.samplers.GPSampler(seed=seed)}
    if sampler not in make:
        raise ConfigError(f"sampler must be gp, tpe or cmaes, got {sampler!r}")
    study = optuna.create_study(direction="minimize" if sw.minimize else "maximize", sampler=make[sampler]())
    for p in sw.points:  # a resumed search starts from what it already knows
        if p["score"] is not None and not math.isnan(p["score"]):
            study.add_trial(optuna.trial.create_trial(
                params={f"w{i}": min(max(w, lo), hi) for i, w in enumerate(p["weights"])},
                distributions={f"w{i}": optuna.distributions.FloatDistribution(lo, hi) for i in range(sw.k)},
                value=p["score"]))
    for _ in range(max(0, trials - len(study.trials))):
        trial = study.ask()
        p = sw.point([round(trial.suggest_float(f"w{i}", lo, hi), 4) for i in range(sw.k)])
        if p["score"] is None or math.isnan(p["score"]):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, p["score"])


def _plot(sw: Sweep) -> None:
    """sweep.png: score against lambda (shared lambda or one model), a heatmap for a two-model
    grid, else score by evaluation order. Skipped without matplotlib or scores."""
    pts = [p for p in sw.points if p["score"] is not None and not math.isnan(p["score"])]
    if not pts:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    shared = all(len(set(p["weights"])) == 1 for p in pts)
    if shared:
        xs = sorted(pts, key=lambda p: p["weights"][0])
        ax.plot([p["weights"][0] for p in xs], [p["score"] for p in xs], marker="o", markersize=3)
        ax.set_xlabel("lambda (every model)")
    elif sw.k == 2:
        a = sorted({p["weights"][0] for p in pts})
        b = sorted({p["weights"][1] for p in pts})
        if len(a) * len(b) == len(pts):
            z = np.full((len(b), len(a)), np.nan)
            for p in pts:
                z[b.index(p["weights"][1]), a.index(p["weights"][0])] = p["score"]
            im = ax.imshow(z, origin="lower", aspect="auto", extent=(a[0], a[-1], b[0], b[-1]))
            fig.colorbar(im, ax=ax, label="score")
        else:
            sc = ax.scatter([p["weights"][0] for p in pts], [p["weights"][1] for p in pts],
                            c=[p["score"] for p in pts])
            fig.colorbar(sc, ax=ax, label="score")
        ax.set_xlabel(f"lambda of {os.path.basename(sw.cfg.models[0].path)}")
        ax.set_ylabel(f"lambda of {os.path.basename(sw.cfg.models[1].path)}")
    else:
        ax.plot(range(1, len(pts) + 1), [p["score"] for p in pts], marker="o", markersize=3)
        ax.set_xlabel("evaluation")
    if shared or sw.k != 2:
        ax.set_ylabel("score" + (" (lower is better)" if sw.minimize else ""))
    best = sw.best()
    assert best is not None  # pts holds scored points
    ax.set_title(f"best {best['score']:.4g} at lambda {best['weights']}")
    fig.tight_layout()
    fig.savefig(os.path.join(sw.out_dir, "sweep.png"))
    plt.close(fig)
