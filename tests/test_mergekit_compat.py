"""Side by side with mergekit 0.1.5 (skipped unless its CLI is found).

mergekit lives in its own environment (it pins its own torch): point the tests at it with
MERGEKIT_YAML=/path/to/venv/bin/mergekit-yaml, or have mergekit-yaml on PATH
(``.ci/mergekit-venv.sh`` builds one). Every mergekit merge of this file runs once, in one
process (``run_yaml.main``, the CLI's own entry point, run by the interpreter named in mergekit-yaml's
``#!`` line; if that fails, the CLI is run once per merge, which takes ~5 s more per merge).

Inputs: one small float32 Llama family (``generate_family``) and, for correlated models, the
same family written again with half the task-vector scale: models A1, B1 (= base + about
A1's task vector / 2) and A2. Correlation makes model_stock's interpolation factor and sce's
variance ranking non-trivial.

Deterministic methods (task_arithmetic, linear, ties, breadcrumbs, breadcrumbs_ties, sce,
model_stock) must agree element by element. The error of an element is
``|ours - theirs| / max(|theirs|, |base|, max_i |model_i|)``: relative to the largest operand
or result at that element (float32 rounding is relative to the operands, and a result can
cancel to ~0). Tolerances: ``RTOL`` = 4 float32 eps (4.8e-7) for the elementwise methods (same
float32 operations in the same model order; measured: ties and breadcrumbs* bit-identical, linear
1.9e-7 - torch's addcmul vs a product then a sum), and ``RTOL_REDUCE`` = 2e-6 for sce and
model_stock, whose weights / cosines are reductions over a whole tensor (or row) summed in each
implementation's own order (an independent numpy version with float64 reductions is within
3.4e-7 of mergekit; a plain float32 running sum over 40k elements may lose ~1e-5 of a weight,
which moves the outputs by well under 1e-6).
Excluded elements (said per method in the printed line): where the element kept by mergekit is
not defined because two magnitudes tie exactly at a selection boundary (ties: the
``max(1, int(density * n))``-th largest |tau|; breadcrumbs: both ends of the kept band) -
mergekit's ``torch.argsort`` is not stable, cabs-stream keeps the lower index - and, for sce,
elements whose variance over the models lies within 1e-6 (relative) of the top-k boundary when
the k-th and (k+1)-th variances are that close (float32 variance rounding may order them
either way).

Methods with randomness (dare_linear, dare_ties, della, della_linear) draw different random
numbers in the two tools, so they are compared in distribution, on single-model merges
(weight 0.8, so a wrong normalize default shows as a 0.8 factor): per tensor, the fraction of
the non-zero task-vector entries that is kept (output != base) and the rescale of the kept
entries (L1 ratio of output - base to the kept task vector); the same kept fractions summed over
all tensors and per quartile of |tau| (della keeps larger entries more often); and, since
mergekit 0.1.5 rescales a tensor by one factor (``rescale_norm=l1``, not 1/p per element), that
every kept entry of a tensor is scaled by that tensor's one factor, in both tools. Statistical
bounds are 5 standard deviations of the difference of two independent draws.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from cabs_stream import load_config, merge
from cabs_stream.synthetic import LlamaShape, generate_family
from conftest import load_model

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MERGEKIT_YAML)")
SHAPE = LlamaShape(hidden=64, layers=2, intermediate=160, vocab=256, heads=4, kv_heads=2)
MK_FLAGS = ["--random-seed", "0", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
EPS32 = float(np.finfo(np.float32).eps)
RTOL = 4 * EPS32
RTOL_REDUCE = 2e-6
SIGMAS = 5.0

# id -> (merge_method, shared parameters, parameters of models A1, B1, A2)
DETERMINISTIC = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8},
                        [{"weight": 1.2}, {"weight": 0.7}, {"weight": 1.0}]),
    "linear": ("linear", {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    "ties": ("ties", {}, [{"weight": 1.2, "density": 0.3}, {"weight": 0.7, "density": 0.5},
                          {"weight": 1.0, "density": 0.7}]),
    "breadcrumbs": ("breadcrumbs", {}, [{"weight": 1.0, "density": 0.6, "gamma": 0.05},
                                        {"weight": 0.8, "density": 0.5, "gamma": 0.02},
                                        {"weight": 0.6, "density": 0.9, "gamma": 0.2}]),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"normalize": True},
                         [{"weight": 1.0, "density": 0.6, "gamma": 0.05},
                          {"weight": 0.8, "density": 0.5, "gamma": 0.02},
                          {"weight": 0.6, "density": 0.9, "gamma": 0.2}]),
    "sce": ("sce", {"select_topk": 0.5}, [{}, {}, {}]),
    "sce-no-topk": ("sce", {}, [{}, {}, {}]),
    "model_stock": ("model_stock", {}, [{}, {}, {}]),
    "model_stock-filter_wise": ("model_stock", {"filter_wise": True}, [{}, {}, {}]),
}
# id -> (merge_method, shared parameters, parameters of the single model A1)
RANDOM = {
    "dare_linear": ("dare_linear", {}, {"weight": 0.8, "density": 0.4}),
    "dare_ties": ("dare_ties", {}, {"weight": 0.8, "density": 0.6}),
    "della": ("della", {}, {"weight": 0.8, "density": 0.5, "epsilon": 0.2}),
    "della_linear": ("della_linear", {}, {"weight": 0.8, "density": 0.4, "epsilon": 0.1}),
}
# id -> (merge_method, shared parameters, parameters of the bf16 models ft1, ft2)
BF16 = {
    "task_arithmetic": ("task_arithmetic", {}, [{"weight": 1.2}, {"weight": 1.0}]),
    "ties": ("ties", {"normalize": True}, [{"weight": 1.2, "density": 0.3}, {"weight": 1.0, "density": 0.5}]),
}


@dataclass
class Case:
    cfg: str  # cabs-stream's config
    theirs: str  # mergekit's output folder
    error: str | None  # mergekit's error, if it failed
    base: str
    models: list[str]


def _config(path, method, base, models, params, model_params, dtype, with_base=True) -> str:
    doc = {"merge_method": method,
           "models": [{"model": m, "parameters": p} for m, p in zip(models, model_params)],
           "parameters": params, "dtype": dtype}
    if with_base:
        doc["base_model"] = base
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


_DRIVER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main
status = {}
for cfg, out, flags in json.load(open(sys.argv[1])):
    try:
        main([cfg, out, *flags], standalone_mode=False)
        status[out] = None
    except BaseException as e:
        status[out] = "".join(traceback.format_exception(e))[-3000:]
json.dump(status, open(sys.argv[2], "w"))
"""


def _mergekit_python() -> list[str] | None:
    """The interpreter command of the mergekit-yaml script (its ``#!`` line), if it names python."""
    try:
        with open(MERGEKIT, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return None
    return first[2:].split() if first.startswith("#!") and "python" in first else None


def run_mergekit(jobs: list[tuple[str, str]], work: str) -> dict[str, str | None]:
    """Run mergekit on every (config, output) pair; returns output -> error text or None."""
    python = _mergekit_python()
    if python:
        spec, status = os.path.join(work, "jobs.json"), os.path.join(work, "status.json")
        with open(spec, "w") as f:
            json.dump([[c, o, MK_FLAGS] for c, o in jobs], f)
        driver = os.path.join(work, "driver.py")
        with open(driver, "w") as f:
            f.write(_DRIVER)
        r = subprocess.run([*python, driver, spec, status], capture_output=True, text=True, timeout=900)
        if r.returncode == 0:
            with open(status) as f:
                return json.load(f)
        sys.stderr.write(f"mergekit batch driver failed, running the CLI per merge:\n{r.stderr[-2000:]}\n")
    out = {}
    for c, o in jobs:
        r = subprocess.run([MERGEKIT, c, o, *MK_FLAGS], capture_output=True, text=True, timeout=600)
        out[o] = None if r.returncode == 0 else r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Write the families and the configs, run every mergekit merge once."""
    root = tmp_path_factory.mktemp("mergekit")
    base, (a1, a2) = generate_family(str(root / "a"), SHAPE, k=2, dtype="F32", zero_fraction=0.2)
    _, (b1,) = generate_family(str(root / "b"), SHAPE, k=1, dtype="F32", zero_fraction=0.2, delta_scale=0.05)
    bf_base, bf_fts = generate_family(str(root / "bf"), SHAPE, k=2, dtype="BF16", zero_fraction=0.2)
    out: dict[str, Case] = {}
    jobs = []

    def add(key, method, params, b, models, mparams, dtype):
        d = root / key.replace("/", "_")
        d.mkdir()
        cfg = _config(str(d / "cabs.yml"), method, b, models, params, mparams, dtype)
        # mergekit's linear takes the base as one more weighted input when base_model is set
        # (and then needs a weight for it); cabs-stream's linear averages the listed models only.
        mk_cfg = cfg if method != "linear" else _config(str(d / "mergekit.yml"), method, b, models, params,
                                                          mparams, dtype, with_base=False)
        out[key] = Case(cfg, str(d / "theirs"), None, b, models)
        jobs.append((mk_cfg, str(d / "theirs")))

    for key, (method, params, mp) in DETERMINISTIC.items():
        add(f"det/{key}", method, params, base, [a1, b1, a2], mp, "float32")
    for key, (method, params, mp) in RANDOM.items():
        add(f"rnd/{key}", method, params, base, [a1], [mp], "float32")
    for key, (method, params, mp) in BF16.items():
        add(f"bf16/{key}", method, params, bf_base, bf_fts, mp, "bfloat16")
    status = run_mergekit(jobs, str(root))
    for c in out.values():
        c.error = status.get(c.theirs, "mergekit did not report this merge")
    return out


def run_ours(case: Case, tmp_path) -> dict[str, torch.Tensor]:
    merge(load_config(case.cfg), str(tmp_path / "ours"))
    return load_model(str(tmp_path / "ours"))


def theirs(case: Case) -> dict[str, torch.Tensor]:
    assert case.error is None, f"mergekit failed:\n{case.error}"
    return load_model(case.theirs)


def f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy().ravel()


# ------------------------------------------------------------------ deterministic methods
def _boundary_ties(absd: np.ndarray, positions: list[int]) -> np.ndarray:
    """Elements whose |tau| ties (exactly, non-zero) across a boundary after ``p`` elements of
    the descending order, for each p in ``positions``."""
    n = absd.size
    desc = np.sort(absd)[::-1]
    out = np.zeros(n, bool)
    for p in positions:
        if 0 < p < n and desc[p - 1] == desc[p] and desc[p] != 0:
            out |= absd == desc[p]
    return out


def _excluded(method: str, params: dict, mparams: list[dict], taus: list[np.ndarray]) -> np.ndarray:
    n = taus[0].size
    out = np.zeros(n, bool)
    if method == "ties":
        for tau, p in zip(taus, mparams):
            d = p.get("density", 1.0)
            if d < 1:
                out |= _boundary_ties(np.abs(tau), [max(1, int(d * n))])
    elif method.startswith("breadcrumbs"):
        for tau, p in zip(taus, mparams):
            d, g = p.get("density", 1.0), p.get("gamma", 0.01)
            if d < 1:
                target, n_top = int(d * n), int(g * n)
                n_bot = max(0, n - target - n_top)
                out |= _boundary_ties(np.abs(tau), [n - n_bot - target, n - n_bot])
    elif method == "sce" and params.get("select_topk", 1.0) < 1:
        var = np.var(np.stack(taus).astype(np.float64), axis=0)
        k = int(np.count_nonzero(var) * params["select_topk"])
        desc = np.sort(var)[::-1]
        if 0 < k < n:
            hi, lo = desc[k - 1], desc[k]
            if hi - lo <= 1e-6 * hi:
                out |= np.abs(var - (hi + lo) / 2) <= 1e-6 * hi
    return out


@pytest.mark.parametrize("key", list(DETERMINISTIC))
def test_float32_matches_mergekit(cases, tmp_path, key, capsys):
    method, params, mparams = DETERMINISTIC[key]
    case = cases[f"det/{key}"]
    ref = theirs(case)
    ours = run_ours(case, tmp_path)
    base = load_model(case.base)
    models = [load_model(m) for m in case.models]
    rtol = RTOL_REDUCE if method in ("sce", "model_stock") else RTOL
    assert set(ours) == set(ref)
    worst, worst_name, excluded, total, bad = 0.0, "", 0, 0, []
    for name in ours:
        a, b, w0 = f32(ours[name]), f32(ref[name]), f32(base[name])
        ws = [f32(m[name]) for m in models]
        scale = np.maximum.reduce([np.abs(b), np.abs(w0), *[np.abs(w) for w in ws]])
        scale = np.maximum(scale, np.finfo(np.float32).tiny)
        err = np.abs(a.astype(np.float64) - b) / scale
        skip = _excluded(method, params, mparams, [w - w0 for w in ws])
        err[skip] = 0
        excluded += int(skip.sum())
        total += err.size
        if err.max() > worst:
            worst, worst_name = float(err.max()), name
        if not (err <= rtol).all():
            bad.append(f"{name}: {int((err > rtol).sum())} elements, max {err.max():.3g}")
    with capsys.disabled():
        print(f"\n[mergekit f32 {key}] max rel diff {worst:.3g} (tol {rtol:.3g}; {worst_name or '-'}), "
              f"{excluded} of {total} elements excluded (magnitude/variance ties at a boundary)")
    assert not bad, "; ".join(bad[:5])


# ------------------------------------------------------------------ randomized methods
@dataclass
class Selection:
    n: np.ndarray  # per tensor: non-zero task-vector entries
    kept: np.ndarray  # per tensor: of those, kept (output != base)
    scale: np.ndarray  # per tensor: sum |out - base| / sum |tau| over kept entries
    noise: np.ndarray  # per tensor: bound on the relative sd of one tool's scale
    q_n: np.ndarray  # per |tau| quartile (within each tensor), summed over tensors
    q_kept: np.ndarray
    spread: float  # max over kept entries of |out - base - scale * tau| / |scale * tau| (beyond rounding)
    l1: float  # sum over kept entries of |out - base| / sum over all of |tau|: L1 mass kept (about 1 with rescale)


def selection(out: dict, base: dict, ft: dict) -> Selection:
    n, kept, scale, noise, spread = [], [], [], [], 0.0
    q_n, q_kept = np.zeros(4), np.zeros(4)
    l1_kept = l1_all = 0.0
    for name in sorted(out):
        o, w0, w1 = f32(out[name]), f32(base[name]), f32(ft[name])
        tau = w1 - w0
        nz = tau != 0
        k = nz & (o != w0)
        delta = o.astype(np.float64) - w0
        n.append(nz.sum())
        kept.append(k.sum())
        s = np.abs(delta[k]).sum() / np.abs(tau[k].astype(np.float64)).sum() if k.any() else 0.0
        l1_kept += float(np.abs(delta[k]).sum())
        l1_all += float(np.abs(tau.astype(np.float64)).sum())
        scale.append(s)
        at = np.abs(tau[nz].astype(np.float64))
        frac = max(k.sum() / max(nz.sum(), 1), 1e-3)
        noise.append(0.5 * np.sqrt((at ** 2).sum()) / (frac * at.sum()) if at.size else 1.0)
        if k.any():
            pred = s * tau[k]
            # allow one rounding of the output (1 ulp) and of the products (1e-6 relative)
            res = np.maximum(np.abs(delta[k] - pred) - np.spacing(np.abs(o[k])) - 1e-6 * np.abs(pred), 0)
            spread = max(spread, float((res / np.abs(pred)).max()))
        edges = np.quantile(at, [0.25, 0.5, 0.75]) if at.size else np.zeros(3)
        q = np.searchsorted(edges, np.abs(tau[nz]), side="right")
        q_n += np.bincount(q, minlength=4)
        q_kept += np.bincount(q, weights=k[nz].astype(float), minlength=4)
    return Selection(np.array(n), np.array(kept), np.array(scale), np.array(noise), q_n, q_kept, spread,
                     l1_kept / max(l1_all, 1e-30))


def _frac_bound(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.02, 0.98)
    return SIGMAS * np.sqrt(2 * p * (1 - p) / np.maximum(n, 1))


def compare_selections(a: Selection, b: Selection, per_element: bool = False) -> tuple[str, list[str]]:
    """One line of figures and the list of failed checks (ours ``a``, mergekit's ``b``).

    ``per_element``: ours rescales each kept entry by its own 1/p (DELLA, as its paper does)
    where mergekit 0.1.5 applies one L1-ratio factor per tensor, so the rescale is compared by
    the L1 mass each keeps (both about 1), not factor by factor."""
    fa, fb = a.kept / np.maximum(a.n, 1), b.kept / np.maximum(b.n, 1)
    ta, tb = a.kept.sum() / a.n.sum(), b.kept.sum() / b.n.sum()
    qa, qb = a.q_kept / a.q_n, b.q_kept / b.q_n
    line = (f"kept fraction ours {ta:.4f} theirs {tb:.4f}; per |tau| quartile ours {np.round(qa, 3).tolist()} "
            f"theirs {np.round(qb, 3).tolist()}; rescale (median over tensors) ours {np.median(a.scale):.4f} "
            f"theirs {np.median(b.scale):.4f}, max per-tensor rel diff "
            f"{np.max(np.abs(a.scale - b.scale) / b.scale):.3g}; spread within a tensor ours {a.spread:.2g} "
            f"theirs {b.spread:.2g}; L1 mass kept ours {a.l1:.4f} theirs {b.l1:.4f}")
    fails = []
    if not (a.n == b.n).all():
        fails.append("different non-zero counts (different inputs?)")
        return line, fails
    if abs(ta - tb) > _frac_bound(np.array(tb), a.n.sum()):
        fails.append(f"kept fraction over all tensors: ours {ta:.4f}, theirs {tb:.4f}")
    if not (np.abs(qa - qb) <= _frac_bound(qb, a.q_n)).all():
        fails.append(f"kept fraction per |tau| quartile: ours {qa}, theirs {qb}")
    bad = np.abs(fa - fb) > _frac_bound(fb, a.n)
    if bad.any():
        fails.append(f"kept fraction differs in {int(bad.sum())} tensors")
    if b.spread > 1e-4:
        fails.append(f"mergekit's kept entries are not scaled by one factor per tensor (spread {b.spread:.3g})")
    if per_element:
        if abs(a.l1 - b.l1) > 0.05 * b.l1:
            fails.append(f"L1 mass kept after rescale: ours {a.l1:.4f}, theirs {b.l1:.4f}")
        return line, fails
    bad = np.abs(a.scale - b.scale) > SIGMAS * np.sqrt(2) * b.noise * b.scale + 1e-5 * b.scale
    if bad.any():
        fails.append(f"rescale differs in {int(bad.sum())} tensors: ours {a.scale[bad][:4]}, theirs {b.scale[bad][:4]}")
    if a.spread > 1e-4:
        fails.append(f"kept entries of a tensor are not scaled by one factor (spread {a.spread:.3g}); "
                     "mergekit 0.1.5 rescales by the tensor's L1 norm ratio, not 1/p per element")
    return line, fails


@pytest.mark.parametrize("key", list(RANDOM))
def test_randomized_matches_mergekit_in_distribution(cases, tmp_path, key, capsys):
    case = cases[f"rnd/{key}"]
    ref = theirs(case)
    ours = run_ours(case, tmp_path)
    base, ft = load_model(case.base), load_model(case.models[0])
    line, fails = compare_selections(selection(ours, base, ft), selection(ref, base, ft),
                                     per_element=key.startswith("della"))
    with capsys.disabled():
        print(f"\n[mergekit {key}] {line}")
    assert not fails, "; ".join(fails)


# ------------------------------------------------------------------ bfloat16 (reported only)
@pytest.mark.parametrize("key", list(BF16))
def test_bfloat16_difference_is_reported(cases, tmp_path, key, capsys):
    """mergekit does the arithmetic in bfloat16 (the checkpoints' dtype); cabs-stream in float32."""
    case = cases[f"bf16/{key}"]
    ref = theirs(case)
    ours = run_ours(case, tmp_path)
    total = diff = 0
    for name, t in ours.items():
        a, b = t.view(torch.int16).numpy(), ref[name].view(torch.int16).numpy()
        total += a.size
        diff += int((a != b).sum())
    with capsys.disabled():
        print(f"\n[mergekit bf16 {key}] {diff} of {total} elements differ ({100 * diff / total:.3f}%)")
    assert diff < total  # same method: most elements agree
