#!/usr/bin/env python
"""Searched-lambda protocol of the merge-quality benchmark (issue 24), run through `cabs-stream sweep`.

For every (method, seed): `cabs_stream.sweep` (the Python API of `cabs-stream sweep`) prunes the four
fine-tunes once into a task-vector store; every point after that is a merge from the store, scored by
a Python callable on the validation split. Two phases in the same sweep folder:

1. shared lambda (the grid protocol of run.py): one point per lambda of the coarse grid, then the
   midpoint toward the better neighbour of the best; the best point is scored on test ("grid").
2. per-model lambdas: `search="optuna"` with the same sampler (gp), seed (the run seed), range and
   number of new trials for every method; the search starts from what the folder already knows (the
   grid points, as `cabs-stream sweep` resumes), and the best validation point of the folder is then
   scored on test ("searched").

ties normalizes by the sum of the weights, so its four weights only set their ratios; its global
lambda is searched too, as the mean of the four weights (the evaluator applies it: W0 + lambda *
(merged - W0), the same model as `--lambda mean(w)` up to float32 rounding, checked by --check).

    python benchmarks/quality/search.py --data-dir /work/q24-data          # full run (resumes)
    python benchmarks/quality/search.py --data-dir /work/q24-data --report-only
    python benchmarks/quality/search.py --tiny --data-dir /tmp/qs --results-dir /tmp/qs/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import qlib  # noqa: E402

METHODS = ["cabs", "magnitude", "ties", "ca_only", "bs_only", "dare_ties", "task_arithmetic"]  # run order
# (the equal-kept CABS variant runs right after cabs and magnitude)
GRID = [0.2, 0.5, 1.0, 2.0]
NM_M = 160


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def variant_method(v):
    """'cabs' -> ('cabs', None); 'cabs@n25' -> ('cabs', 25): CABS at another n (equal kept entries)."""
    if "@n" in v:
        m, n = v.split("@n")
        return m, int(n)
    return v, None


def make_config(variant, seed, data_dir, tasks, sparsity):
    import cabs_stream
    method, n_override = variant_method(variant)
    models = [str(qlib.encoder_dir(data_dir, t, seed)) for t in tasks]
    kw = {}
    params = {}
    if method in ("cabs", "bs_only"):
        kw["n"] = n_override or int(round(NM_M * (1 - sparsity)))
        kw["m"] = NM_M
    elif method != "task_arithmetic":
        kw["density"] = round(1 - sparsity, 6)
    if method in ("dare_ties", "dare_linear", "random"):
        params["random_seed"] = seed
    return cabs_stream.build_config(method=method, base=str(qlib.base_model_dir()), models=models,
                                    weights=[1.0] * len(models), params=params or None, **kw)


class PointEvaluator:
    """The sweep's evaluator: loads a merged folder into one BertModel and scores a split.

    Returns 100 * mean validation accuracy - 0.001 * mean NLL (the NLL only breaks ties: it moves
    the score by less than one example's worth of accuracy)."""

    def __init__(self, args, data_dir, tasks):
        self.a, self.dd, self.tasks = args, data_dir, tasks
        self.ev = qlib.Evaluator(data_dir, tasks, args.n_val, args.n_test)
        self.base_sd = None
        self.ctx = None          # (variant, seed, points-log path)

    def _base(self):
        if self.base_sd is None:
            from safetensors.torch import load_file
            self.base_sd = load_file(str(qlib.base_model_dir() / "model.safetensors"))
        return self.base_sd

    def load(self, folder):
        """Load the merged model; ties (normalize): W0 + mean(w) * (merged - W0)."""
        man = json.loads((Path(folder) / "cabs_manifest.json").read_text())
        ws = [float(m["weight"]) for m in man["models"]]
        g = 1.0
        from cabs_stream.pipeline import config_from_description
        if config_from_description(man).value("normalize", default=False):  # defaults are not in the manifest
            import torch
            g = float(np.mean(ws))
            self.ev.use(Path(folder))
            base = self._base()
            with torch.no_grad():
                for k, v in self.ev.model.state_dict().items():
                    if v.is_floating_point() and k in base:
                        b = base[k].to(v.dtype)
                        v.copy_(b + g * (v - b))
        else:
            self.ev.use(Path(folder))
        return ws, g

    def score(self, split, seed):
        acc, nll, correct = {}, {}, {}
        for t in self.tasks:
            c, n = self.ev.score(t, split, seed)
            acc[t], nll[t], correct[t] = float(c.mean()), n, "".join(map(str, c.tolist()))
        return acc, float(np.mean(list(nll.values()))), correct

    def __call__(self, folder):
        variant, seed, path = self.ctx
        t0 = time.time()
        ws, g = self.load(folder)
        acc, nll, _ = self.score("val", seed)
        avg = float(np.mean(list(acc.values())))
        rep = qlib.read_report(Path(folder))
        row = {"variant": variant, "seed": seed, "weights": ws, "lambda_global": g, "val_acc": acc,
               "val_avg": avg, "val_nll": nll, "eval_s": round(time.time() - t0, 2),
               "overlap": qlib.mean_pair_overlap(rep), "kept": rep.get("density"), "t": time.time()}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return 100.0 * avg - 0.001 * nll


class Search:
    def __init__(self, args):
        self.a = args
        self.dd = Path(args.data_dir)
        self.sw_root = self.dd / "sweeps"
        self.res = Path(args.results_dir)
        self.res.mkdir(parents=True, exist_ok=True)
        self.cells = qlib.Cache(self.res / f"{args.name}_cells.jsonl")  # one line per finished phase
        self.points_log = self.res / f"{args.name}_points.jsonl"      # one line per evaluated point
        self.pe = None
        if args.grid_from:  # continue another run's sweeps: its grid picks are this run's grid picks
            other = qlib.Cache(self.res / f"{args.grid_from}_cells.jsonl")
            for k, r in other.rows.items():
                if k.startswith("grid|") and not self.cells.get(k):
                    self.cells.put(k, **{x: y for x, y in r.items() if x != "key"})

    def evaluator(self):
        if self.pe is None:
            self.pe = PointEvaluator(self.a, self.dd, self.a.tasks)
        return self.pe

    def tag(self):
        return f"v{self.a.n_val}t{self.a.n_test}"

    def folder(self, variant, seed):
        return self.sw_root / f"{variant.replace('@', '_')}_seed{seed}_{self.tag()}"

    def sweep_doc(self, variant, seed):
        f = self.folder(variant, seed) / "sweep.json"
        return json.loads(f.read_text()) if f.exists() else None

    def test_best(self, variant, seed, doc, phase, extra):
        pe = self.evaluator()
        best = doc["best"]
        if not best or not best.get("folder") or not Path(best["folder"]).is_dir():
            raise RuntimeError(f"{variant} seed {seed}: the best point's folder is gone: {best}")
        t0 = time.time()
        same = self.cells.get(f"grid|{variant}|seed{seed}|{self.tag()}") if phase == "searched" else None
        if same and same["weights"] == best["weights"]:  # the search found nothing better: same merge
            g, acc, nll, correct = same["lambda_global"], same["test_acc"], same["test_nll"], same["correct"]
        else:
            ws, g = pe.load(best["folder"])
            acc, nll, correct = pe.score("test", seed)
        rep = qlib.read_report(Path(best["folder"]))
        return self.cells.put(f"{phase}|{variant}|seed{seed}|{self.tag()}", variant=variant, seed=seed,
                              phase=phase, weights=best["weights"], lambda_global=g, val_score=best["score"],
                              test_acc=acc, test_avg=float(np.mean(list(acc.values()))), test_nll=nll,
                              correct=correct, overlap=qlib.mean_pair_overlap(rep), kept=rep.get("density"),
                              test_eval_s=round(time.time() - t0, 2), **extra)

    def run_cell(self, variant, seed):
        import cabs_stream
        key_g = f"grid|{variant}|seed{seed}|{self.tag()}"
        key_s = f"searched|{variant}|seed{seed}|{self.tag()}"
        if self.cells.get(key_s):
            return
        cfg = make_config(variant, seed, self.dd, self.a.tasks, self.a.sparsity)
        out = str(self.folder(variant, seed))
        pe = self.evaluator()
        pe.ctx = (variant, seed, self.points_log)
        lo, hi = self.a.range
        engine = dict(workers=1, quiet=True)
        t_cell = time.time()
        if not self.cells.get(key_g):
            t0 = time.time()
            pruned_before = (Path(out) / "store.zarr").exists()
            score = {}
            prune_s = None
            for lam in self.a.grid:
                d = cabs_stream.sweep(cfg, out, weights=repr(lam), evaluate=pe, **engine)
                score[lam] = next(p["score"] for p in d["points"] if p["weights"] == [round(lam, 6)] * len(cfg.models))
                if not pruned_before and prune_s is None:  # the first call pruned, then merged one point
                    prune_s = time.time() - t0 - d["points"][-1]["seconds"]
            grid = sorted(score)
            best = max(grid, key=lambda w: score[w])
            i = grid.index(best)
            nb = [j for j in (i - 1, i + 1) if 0 <= j < len(grid)]
            if nb:  # the midpoint toward the better neighbour (run.py's fine point)
                j = max(nb, key=lambda j: score[grid[j]])
                mid = round((grid[j] + best) / 2, 4)
                d = cabs_stream.sweep(cfg, out, weights=repr(mid), evaluate=pe, **engine)
            doc = self.sweep_doc(variant, seed)
            shared = [p for p in doc["points"] if len(set(p["weights"])) == 1]
            edge = doc["best"]["weights"][0] in (min(self.a.grid), max(self.a.grid))
            self.test_best(variant, seed, doc, "grid", {
                "n_points": len(shared), "edge": edge,
                "prune_s": None if prune_s is None else round(prune_s, 2),
                "grid_wall_s": round(time.time() - t0, 2),
                "curve": {f"{p['weights'][0]:g}": p["score"] for p in shared}})
            r = self.cells.get(key_g)
            log(f"{variant:14s} seed {seed} grid: lambda {r['weights'][0]:g} val {r['val_score']:.2f} "
                f"test {100 * r['test_avg']:.2f} ({time.time() - t0:.0f}s)")
        t0 = time.time()
        n_before = len(self.sweep_doc(variant, seed)["points"])
        n_grid = self.cells.get(key_g)["n_points"]
        d = cabs_stream.sweep(cfg, out, search="optuna", trials=n_grid + self.a.trials, search_range=(lo, hi),
                              sampler=self.a.sampler, seed=seed, evaluate=pe, **engine)
        doc = self.sweep_doc(variant, seed)
        new = doc["points"][n_grid:]
        self.test_best(variant, seed, doc, "searched", {
            "n_points": len(doc["points"]), "n_trials_new": len(new),
            "search_wall_s": round(time.time() - t0, 2), "resumed_from": n_before,
            "point_seconds": [p["seconds"] for p in doc["points"]]})
        r = self.cells.get(key_s)
        g = self.cells.get(key_g)
        log(f"{variant:14s} seed {seed} searched: w {r['weights']} val {r['val_score']:.2f} "
            f"(grid {g['val_score']:.2f}) test {100 * r['test_avg']:.2f} (grid {100 * g['test_avg']:.2f}) "
            f"({time.time() - t0:.0f}s; cell {time.time() - t_cell:.0f}s)")
        # the store is only needed while the cell runs; the best folder stays for inspection
        if not self.a.keep_stores:
            shutil.rmtree(Path(out) / "store.zarr", ignore_errors=True)

    def equal_kept_n(self):
        """CABS's n at which it keeps as many entries as magnitude at the nominal density (seed of
        the first run seed): n * kept(magnitude) / kept(cabs), rounded."""
        f = self.res / f"{self.a.name}_eqk.json"
        if f.exists():
            return json.loads(f.read_text())
        for s in self.a.seeds:
            c = self.cells.get(f"grid|cabs|seed{s}|{self.tag()}")
            m = self.cells.get(f"grid|magnitude|seed{s}|{self.tag()}")
            if c and m:
                break
        else:
            return None
        n0 = int(round(NM_M * (1 - self.a.sparsity)))
        kc, km = float(np.mean(c["kept"])), float(np.mean(m["kept"]))
        n = int(round(n0 * km / kc))
        info = {"seed": s, "n0": n0, "kept_cabs": kc, "kept_magnitude": km, "n": n}
        try:  # the first process (seed) to get here decides n for every seed
            with open(f, "x") as h:
                h.write(json.dumps(info, indent=1))
        except FileExistsError:
            return json.loads(f.read_text())
        return info


# --------------------------------------------------------------------------------------------
# Cost: a point from the store against a merge from the fine-tuned models
# --------------------------------------------------------------------------------------------

def cost_check(args, s: Search):
    """For each method (first seed): one direct merge (Python API, in process; and the CLI) at the
    searched best weights, timed against the sweep's points, and compared byte for byte with the
    sweep's kept best folder. ties: also the evaluator's rescaling against a direct --lambda merge."""
    import cabs_stream
    from safetensors.numpy import load_file
    out = s.res / f"{args.name}_cost.json"
    done = json.loads(out.read_text()) if out.exists() else {}
    seed = args.cost_seed
    scratch = s.dd / f"cost_scratch_{os.getpid()}"
    for variant in args.methods + (args.extra or []):
        if variant in done:
            continue
        r = s.cells.get(f"searched|{variant}|seed{seed}|{s.tag()}")
        if not r:
            continue
        doc = s.sweep_doc(variant, seed)
        best = doc["best"]
        cfg = make_config(variant, seed, s.dd, args.tasks, args.sparsity)
        from cabs_stream.config import build_config  # noqa: F401
        cfg_w = cabs_stream.build_config(**_rebuild_kwargs(variant, seed, s, best["weights"]))
        shutil.rmtree(scratch, ignore_errors=True)
        t0 = time.time()
        cabs_stream.merge(cfg_w, str(scratch), overwrite=True, quiet=True, workers=1)
        api_s = time.time() - t0
        a = _tensors(scratch, load_file)
        b = _tensors(Path(best["folder"]), load_file)
        identical = all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in a) and set(a) == set(b)
        cmd = qlib.merge_cmd(variant_method(variant)[0], [qlib.encoder_dir(s.dd, t, seed) for t in args.tasks],
                             scratch, 1.0, args.sparsity, seed, workers=1)
        # merge_cmd puts one lambda for every model: replace them by the searched weights
        cmd = _with_weights(cmd, best["weights"], variant, s, args)
        t0 = time.time()
        qlib.run_merge(cmd)
        cli_s = time.time() - t0
        entry = {"seed": seed, "weights": best["weights"], "direct_merge_api_s": round(api_s, 2),
                 "direct_merge_cli_s": round(cli_s, 2), "store_point_identical_to_direct_merge": identical,
                 "cli_cmd": " ".join(cmd[1:]).replace(str(s.dd), "$DATA")}
        if cfg.value("normalize", default=False):
            # ties: the evaluator's W0 + g (merged - W0) against a direct merge with --lambda g
            g = float(np.mean(best["weights"]))
            c = cli_lambda(cmd, g)
            qlib.run_merge(c)
            pe = s.evaluator()
            pe.load(best["folder"])
            import torch
            sd = {k: v.clone() for k, v in pe.ev.model.state_dict().items() if v.is_floating_point()}
            pe.ev.use(scratch)
            diff = max(float((sd[k] - v).abs().max()) for k, v in pe.ev.model.state_dict().items() if k in sd)
            acc_direct, _, _ = pe.score("test", seed)
            entry["ties_rescale_check"] = {
                "lambda": g, "max_abs_weight_diff": diff,
                "test_avg_direct_lambda_merge": float(np.mean(list(acc_direct.values()))),
                "test_avg_evaluator_rescale": r["test_avg"], "cmd": " ".join(c[1:]).replace(str(s.dd), "$DATA")}
            del torch
        pts = doc["points"]
        ev = [json.loads(x) for x in s.points_log.read_text().splitlines() if x.strip()]
        ev = [e for e in ev if e["variant"] == variant and e["seed"] == seed]
        eval_s = float(np.median([e["eval_s"] for e in ev])) if ev else None
        point_s = float(np.median([p["seconds"] for p in pts]))
        entry.update({"points": len(pts), "median_point_s": round(point_s, 2),
                      "median_eval_s": round(eval_s, 2) if eval_s else None,
                      "median_store_merge_s": round(point_s - eval_s, 2) if eval_s else None})
        done[variant] = entry
        out.write_text(json.dumps(done, indent=1))
        log(f"cost {variant}: store point {entry['median_store_merge_s']}s vs direct merge {api_s:.2f}s (API) "
            f"{cli_s:.2f}s (CLI); identical {identical}")
    shutil.rmtree(scratch, ignore_errors=True)
    return done


def _tensors(folder, load_file):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _rebuild_kwargs(variant, seed, s, weights):
    method, n_override = variant_method(variant)
    kw = dict(method=method, base=str(qlib.base_model_dir()),
              models=[str(qlib.encoder_dir(s.dd, t, seed)) for t in s.a.tasks], weights=list(weights))
    if method in ("cabs", "bs_only"):
        kw.update(n=n_override or int(round(NM_M * (1 - s.a.sparsity))), m=NM_M)
    elif method != "task_arithmetic":
        kw["density"] = round(1 - s.a.sparsity, 6)
    if method in ("dare_ties", "dare_linear", "random"):
        kw["params"] = {"random_seed": seed}
    return kw


def _with_weights(cmd, weights, variant, s, args):
    out, i = [], 0
    it = iter(range(len(cmd)))
    skip = False
    for j, c in enumerate(cmd):
        if skip:
            skip = False
            continue
        if c == "--weight":
            out += ["--weight", repr(float(weights[i]))]
            i += 1
            skip = True
        elif c == "--lambda":
            out += ["--lambda", "1.0"]
            skip = True
        elif c == "--n" and variant_method(variant)[1]:
            out += ["--n", str(variant_method(variant)[1])]
            skip = True
        else:
            out.append(c)
    del it, s, args
    return out


def cli_lambda(cmd, g):
    c = list(cmd)
    c[c.index("--lambda") + 1] = repr(g)
    return c


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _bits(s):
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(float) - 48


def ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)


def f2(m, s):
    return "-" if m is None else f"{m:.2f} ± {s:.2f}"


def boot(a_rows, b_rows, tasks):
    """Paired bootstrap of a minus b over the seeds both have (seeds pooled, as run.py)."""
    seeds = sorted(set(a_rows) & set(b_rows))
    if not seeds:
        return None
    diffs = [np.stack([_bits(a_rows[s]["correct"][t]) - _bits(b_rows[s]["correct"][t]) for s in seeds], axis=1)
             for t in tasks]
    b = qlib.bootstrap_paired(diffs)
    b["per_seed"] = [100 * float(np.mean([d[:, i].mean() for d in diffs])) for i in range(len(seeds))]
    b["seeds"] = seeds
    return b



def ties_line(what: str, t: dict) -> str:
    """The TIES rescale check as one report line (the evaluator's rescale against a direct --lambda merge)."""
    return (f"\n{what}: the evaluator's W0 + {t['lambda']:.4f} x (merged - W0) against `cabs-stream merge --lambda "
            f"{t['lambda']:.4f}`: max |weight difference| {t['max_abs_weight_diff']:.2e}; test avg "
            f"{100 * t['test_avg_evaluator_rescale']:.2f} (evaluator) vs {100 * t['test_avg_direct_lambda_merge']:.2f} "
            "(direct merge).\n")


def boot_cells(row: dict) -> str:
    """The grid and searched cells of a bootstrap row: diff | 95% CI | p | per seed, each."""
    cols = []
    for ph in ("grid", "searched"):
        b = row.get(ph)
        cols.append("- | - | - | -" if not b else
                    f"{b['diff']:+.2f} | [{b['ci95'][0]:+.2f}, {b['ci95'][1]:+.2f}] | {b['p_two_sided']:.3f} | "
                    + ", ".join(f"{x:+.2f}" for x in b["per_seed"]))
    return " | ".join(cols)

def build_report(args, s: Search):
    tag = s.tag()
    tasks = args.tasks
    variants = args.methods + (args.extra or [])
    cells = {}
    for v in variants:
        for ph in ("grid", "searched"):
            for seed in args.seeds:
                r = s.cells.get(f"{ph}|{v}|seed{seed}|{tag}")
                if r:
                    cells.setdefault(v, {}).setdefault(ph, {})[seed] = r
    js = {"settings": {k: v for k, v in vars(args).items()}, "variants": {}}
    md = [f"# Searched lambdas: all-MiniLM-L6-v2, {len(tasks)} tasks, {round(100 * args.sparsity)}% sparsity, "
          f"merged through `cabs-stream sweep`\n",
          f"Seeds {args.seeds}; {args.n_val} validation and {args.n_test} test examples per task; accuracy in "
          f"%, mean ± sample sd over seeds. **grid**: one lambda for every model, coarse grid {args.grid} "
          f"then the midpoint toward the better neighbour, picked on validation. **searched**: the same sweep "
          f"folder continued with `search='optuna'` ({args.trials} new trials, sampler {args.sampler}, "
          f"seed = run seed, range {args.range[0]:g}:{args.range[1]:g} per model; the grid points are the "
          f"search's first trials), the best validation point of the folder. Both are scored on test.\n"]
    md.append("| method | grid: test avg | searched: test avg | test gain | val gain | val gain - test gain "
              "| overlap | kept % | lambda (grid, per seed) | weights (searched, seed 0) |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        c = cells.get(v, {})
        g, sr = c.get("grid", {}), c.get("searched", {})
        if not g:
            continue
        gt = [100 * g[x]["test_avg"] for x in sorted(g)]
        st = [100 * sr[x]["test_avg"] for x in sorted(sr)]
        both = sorted(set(g) & set(sr))
        tg = [100 * (sr[x]["test_avg"] - g[x]["test_avg"]) for x in both]
        vg = [sr[x]["val_score"] - g[x]["val_score"] for x in both]
        gap = [a - b for a, b in zip(vg, tg)]
        ov = ms([g[x]["overlap"] for x in g])
        kept = ms([100 * float(np.mean(g[x]["kept"])) for x in g if g[x].get("kept")])
        per_task = {ph: {t: ms([100 * c[ph][x]["test_acc"][t] for x in c[ph]]) for t in tasks}
                    for ph in ("grid", "searched") if c.get(ph)}
        js["variants"][v] = {
            "grid_test": ms(gt), "searched_test": ms(st), "grid_test_per_seed": gt, "searched_test_per_seed": st,
            "test_gain": ms(tg), "val_gain": ms(vg), "val_minus_test_gain": ms(gap), "overlap": ov,
            "kept_pct": kept, "per_task": per_task,
            "grid_lambda": {x: g[x]["weights"][0] for x in g}, "grid_edge": {x: g[x].get("edge") for x in g},
            "searched_weights": {x: sr[x]["weights"] for x in sr},
            "searched_lambda_global": {x: sr[x]["lambda_global"] for x in sr},
            "grid_val": {x: g[x]["val_score"] for x in g}, "searched_val": {x: sr[x]["val_score"] for x in sr},
            "grid_curve": {x: g[x].get("curve") for x in g}}
        w0 = sr.get(args.seeds[0], {}).get("weights")
        lams = ", ".join(f"{g[x]['weights'][0]:g}" + ("!" if g[x].get("edge") else "") for x in sorted(g))
        label = v if v != "cabs" else "**cabs**"
        md.append(f"| {label} | {f2(*ms(gt))} | {f2(*ms(st))} | {f2(*ms(tg))} | {f2(*ms(vg))} | {f2(*ms(gap))} "
                  f"| {'-' if ov[0] is None else f'{ov[0]:.3f}'} | {'-' if kept[0] is None else f'{kept[0]:.2f}'} "
                  f"| {lams} "
                  f"| {'-' if not w0 else ', '.join(f'{w:.2f}' for w in w0)} |")
    # bootstraps
    md.append("\nPaired bootstrap, CABS minus X (points of average test accuracy; 10,000 resamples of the test "
              "examples of each task, seeds pooled; per-seed differences beside):\n")
    md.append("| X | grid: diff | 95% CI | p | per seed | searched: diff | 95% CI | p | per seed |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    js["bootstrap_cabs_minus"] = {}
    cab = cells.get("cabs", {})
    for v in variants:
        if v == "cabs" or v not in cells:
            continue
        row = {}
        for ph in ("grid", "searched"):
            if cab.get(ph) and cells[v].get(ph):
                row[ph] = boot(cab[ph], cells[v][ph], tasks)
        js["bootstrap_cabs_minus"][v] = row
        md.append(f"| {v} | {boot_cells(row)} |")
    # equal kept entries: the CABS variant at the baselines' kept fraction against the methods that keep as much
    eq = [v for v in variants if "@n" in v and v in cells]
    if eq:
        js["bootstrap_equal_kept"] = {}
        for e in eq:
            md.append(f"\nEqual kept entries: {e} minus X (X keeps about as many task-vector entries; paired bootstrap "
                      "as above):\n")
            md.append("| X | kept % of X | grid: diff | 95% CI | p | per seed | searched: diff | 95% CI | p | per seed |")
            md.append("|---|---|---|---|---|---|---|---|---|---|")
            js["bootstrap_equal_kept"][e] = {}
            for v in ("magnitude", "ties", "ca_only"):
                if v not in cells:
                    continue
                row = {ph: boot(cells[e][ph], cells[v][ph], tasks) for ph in ("grid", "searched")
                       if cells[e].get(ph) and cells[v].get(ph)}
                js["bootstrap_equal_kept"][e][v] = row
                kept = js["variants"][v]["kept_pct"][0]
                md.append(f"| {v} | {kept:.2f} | {boot_cells(row)} |")
    # searched minus grid, per method
    md.append("\nSearched minus grid for the same method (paired bootstrap as above): does the per-model "
              "search gain on test?\n")
    md.append("| method | test: searched - grid | 95% CI | p | per seed | val gain per seed |")
    md.append("|---|---|---|---|---|---|")
    js["bootstrap_searched_minus_grid"] = {}
    for v in variants:
        c = cells.get(v, {})
        if c.get("grid") and c.get("searched"):
            b = boot(c["searched"], c["grid"], tasks)
            js["bootstrap_searched_minus_grid"][v] = b
            vg = [c["searched"][x]["val_score"] - c["grid"][x]["val_score"] for x in b["seeds"]]
            md.append(f"| {v} | {b['diff']:+.2f} | [{b['ci95'][0]:+.2f}, {b['ci95'][1]:+.2f}] | "
                      f"{b['p_two_sided']:.3f} | " + ", ".join(f"{x:+.2f}" for x in b["per_seed"]) + " | "
                      + ", ".join(f"{x:+.2f}" for x in vg) + " |")
    # per task
    md.append("\nPer task (test %, mean over seeds), grid / searched:\n")
    md.append("| method | " + " | ".join(tasks) + " |")
    md.append("|---|" + "---|" * len(tasks))
    for v, d in js["variants"].items():
        pt = d["per_task"]
        md.append(f"| {v} | " + " | ".join(
            f"{pt['grid'][t][0]:.1f} / {pt['searched'][t][0]:.1f}" if "searched" in pt else f"{pt['grid'][t][0]:.1f} / -"
            for t in tasks) + " |")
    eqk = s.res / f"{args.name}_eqk.json"
    if eqk.exists():
        e = json.loads(eqk.read_text())
        js["equal_kept"] = e
        md.append(f"\nEqual kept entries: CABS at {e['n0']}:{NM_M} keeps {100 * e['kept_cabs']:.2f}% of the encoder's "
                  f"entries and magnitude at density {round(1 - args.sparsity, 2)} keeps {100 * e['kept_magnitude']:.2f}% "
                  f"(seed {e['seed']}; zeros are never kept); CABS at n = round({e['n0']} x "
                  f"{e['kept_magnitude']:.4f} / {e['kept_cabs']:.4f}) = {e['n']} (row `cabs@n{e['n']}`) keeps about as "
                  f"many as magnitude.\n")
    cost = s.res / f"{args.name}_cost.json"
    pts = [json.loads(x) for x in s.points_log.read_text().splitlines() if x.strip()] if s.points_log.exists() else []
    if cost.exists():
        cj = json.loads(cost.read_text())
        js["cost"] = cj
        md.append("\nCost (seed " + str(args.cost_seed) + ", one thread, on a 2-core machine shared with other work): "
                  "a sweep point = merge from the store + validation scoring; a direct merge = `cabs_stream.merge` "
                  "from the base and the four fine-tunes (in process) and `cabs-stream merge` (its own process):\n")
        md.append("| method | points | prune s | median point s | of which eval s | store merge s "
                  "| direct merge API s | direct merge CLI s | point = direct merge, bytes | sweep wall s (points/min) "
                  "| re-merging every point: API s / CLI s |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|")
        tot = {"sweep": 0.0, "api": 0.0, "cli": 0.0, "points": 0}
        for v, e in cj.items():
            g = s.cells.get(f"grid|{v}|seed{args.cost_seed}|{tag}") or {}
            r = s.cells.get(f"searched|{v}|seed{args.cost_seed}|{tag}") or {}
            wall = (g.get("grid_wall_s") or 0) + (r.get("search_wall_s") or 0)
            if not g or not r or wall <= 0:  # this process does not hold that seed's cells
                continue
            n = e["points"]
            ev = e["median_eval_s"] or 0
            # re-merging: every point merged from the fine-tunes (no prune, no store), same evaluation
            api = wall - (g.get("prune_s") or 0) + n * (e["direct_merge_api_s"] - (e["median_store_merge_s"] or 0))
            cli = wall - (g.get("prune_s") or 0) + n * (e["direct_merge_cli_s"] - (e["median_store_merge_s"] or 0))
            e.update({"sweep_wall_s": round(wall, 1), "remerge_api_s": round(api, 1), "remerge_cli_s": round(cli, 1)})
            tot["sweep"] += wall
            tot["api"] += api
            tot["cli"] += cli
            tot["points"] += n
            md.append(f"| {v} | {n} | {g.get('prune_s', '-')} | {e['median_point_s']} | {ev} "
                      f"| {e['median_store_merge_s']} | {e['direct_merge_api_s']} | {e['direct_merge_cli_s']} "
                      f"| {e['store_point_identical_to_direct_merge']} | {wall:.0f} ({60 * n / wall:.2f}) "
                      f"| {api:.0f} / {cli:.0f} |")
        if tot["points"]:
            js["cost_totals"] = tot
            md.append(f"| all | {tot['points']} | | | | | | | | {tot['sweep']:.0f} ({60 * tot['points'] / tot['sweep']:.2f}) "
                      f"| {tot['api']:.0f} / {tot['cli']:.0f} |")
        md.append("\nSweep wall: the grid phase (prune included, test scoring excluded) plus the search phase (Optuna "
                  "included). Re-merging: the same points, each merged from the fine-tunes instead (the sweep wall "
                  "without the prune, every point's store merge replaced by the direct merge time measured once).\n")
        t = cj.get("ties", {}).get("ties_rescale_check")
        if t:
            md.append(ties_line("ties check", t))
    tc = s.res / f"{args.name}_ties_check.json"
    if tc.exists():
        t = json.loads(tc.read_text())
        js["ties_check"] = t
        md.append(ties_line(f"ties check (`ties_check.py`, seed {t['seed']}, searched weights {t['weights']})", t))
    if pts:
        # whole-run throughput from the cells' timings
        walls = []
        complete = set()
        for v in variants:
            for seed in args.seeds:
                g = s.cells.get(f"grid|{v}|seed{seed}|{tag}")
                r = s.cells.get(f"searched|{v}|seed{seed}|{tag}")
                if g and r:
                    complete.add((v, seed))
                    walls.append((r["n_points"], g["grid_wall_s"] + r["search_wall_s"],
                                  sum(r["point_seconds"]), g.get("prune_s")))
        pts = [p for p in pts if (p["variant"], p["seed"]) in complete]
        if walls:
            npts = sum(w[0] for w in walls)
            wall = sum(w[1] for w in walls)
            js["throughput"] = {"cells": len(walls), "points": npts, "wall_s": wall,
                                "points_per_min": 60 * npts / wall,
                                "eval_s_total": float(sum(p["eval_s"] for p in pts))}
            md.append(f"\nWhole run: {len(walls)} sweeps, {npts} points in {wall / 60:.1f} min of sweep wall time "
                      f"(prune, merges from the store, validation scoring, Optuna; summed over the sweeps, which ran "
                      f"as one process per seed side by side on 2 shared cores): "
                      f"{60 * npts / wall:.2f} points per minute per process; of it validation scoring "
                      f"{sum(p['eval_s'] for p in pts) / 60:.1f} min.\n")
    return "\n".join(md) + "\n", js


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/quality-data",
                   help="splits and fine-tunes of run.py (run.py --finetune-only makes them), sweeps")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="search")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(qlib.TASKS))
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--extra", nargs="*", default=None,
                   help="more variants, e.g. cabs@n25 (default: CABS at the n of equal kept entries)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--max-len", type=int, default=32, help="tokens per text; must be the fine-tunes' (run.py --max-len)")
    p.add_argument("--grid", type=float, nargs="+", default=GRID)
    p.add_argument("--trials", type=int, default=10, help="new Optuna trials after the grid points")
    p.add_argument("--range", default="0:3")
    p.add_argument("--sampler", default="gp")
    p.add_argument("--grid-from", default=None, help="results name (e.g. search) whose grid picks this run "
                   "takes over: continues those sweep folders with more --trials (the grid phase is not redone)")
    p.add_argument("--keep-stores", action="store_true")
    p.add_argument("--no-cost", action="store_true")
    p.add_argument("--cost-seed", type=int, default=0, help="the seed whose sweeps are timed against direct merges "
                   "(only the process running that seed does it)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--tiny", action="store_true", help="minute-scale check (makes its own tiny fine-tunes)")
    a = p.parse_args(argv)
    a.range = tuple(float(x) for x in a.range.split(":"))
    import torch
    torch.set_num_threads(1)
    qlib.MAX_LEN = a.max_len
    if a.tiny:
        a.seeds = a.seeds[:1]
        a.tasks = a.tasks[:2] if a.tasks == list(qlib.TASKS) else a.tasks
        a.n_val, a.n_test = 16, 32
        a.cost_seed = a.seeds[0]
        a.methods = a.methods if a.methods != METHODS else ["cabs", "magnitude", "ties"]
        a.grid = [0.5, 1.5]
        a.trials = 2
        dd = Path(a.data_dir)
        qlib.prepare_data(dd, a.tasks, 32, 16, 64, dd / "npm", log=log)
        for t in a.tasks:
            qlib.finetune(t, a.seeds[0], dd, 4, 8, 1e-4, 1e-3, log=log)
    s = Search(a)
    for seed in a.seeds:  # the evaluation must tokenize as the fine-tunes did
        for t in a.tasks:
            f = qlib.encoder_dir(s.dd, t, seed).parent / "meta.json"
            if f.exists() and json.loads(f.read_text())["config"]["max_len"] != a.max_len:
                raise SystemExit(f"{f} was fine-tuned with max_len {json.loads(f.read_text())['config']['max_len']}, "
                                 f"not --max-len {a.max_len}")
    if not a.report_only:
        t0 = time.time()
        for seed in a.seeds:
            done_extra = False
            for v in a.methods:
                s.run_cell(v, seed)
                if seed == a.cost_seed and not a.no_cost:
                    cost_check(a, s)
                if a.extra is None:
                    info = s.equal_kept_n()
                    if info:
                        a.extra = [f"cabs@n{info['n']}"]
                if a.extra and not done_extra and all(
                        s.cells.get(f"grid|{m}|seed{seed}|{s.tag()}") for m in ("cabs", "magnitude") if m in a.methods):
                    for x in a.extra:
                        s.run_cell(x, seed)
                    done_extra = True
            for x in a.extra or []:
                s.run_cell(x, seed)
            if seed == a.cost_seed and not a.no_cost:
                cost_check(a, s)
            md, js = build_report(a, s)
            (s.res / f"{a.name}.md").write_text(md)
        log(f"all cells done in {time.time() - t0:.0f}s")
    if a.extra is None:
        f = s.res / f"{a.name}_eqk.json"
        a.extra = [f"cabs@n{json.loads(f.read_text())['n']}"] if f.exists() else []
    md, js = build_report(a, s)
    js["cabs_stream_version"] = qlib.cabs_stream_version()
    js["data"] = {t: {k: v for k, v in qlib.load_split(s.dd, t).items() if k in ("labels", "counts", "sha256_16")}
                  for t in a.tasks if (s.dd / "data" / f"{t}.json").exists()}
    js["finetunes"] = {}
    for f in sorted(s.dd.glob("ft/*/seed*/meta.json")):
        m = json.loads(f.read_text())
        js["finetunes"][f"{m['config']['task']}/seed{m['config']['seed']}"] = {
            k: m[k] for k in ("config", "train_seconds", "n_train", "loss_first10", "loss_last10")}
    if not js["finetunes"]:  # --report-only without the data folder: keep what the last full report had
        old = s.res / f"{a.name}.json"
        if old.exists():
            prev = json.loads(old.read_text())
            js["finetunes"], js["data"] = prev.get("finetunes", {}), prev.get("data", {})
    (s.res / f"{a.name}.md").write_text(md)
    (s.res / f"{a.name}.json").write_text(json.dumps(js, indent=1, default=float))
    print(md)


if __name__ == "__main__":
    main()
