"""mergekit's own example recipes (tests/data/mergekit_examples/, copied unchanged from mergekit), run as written.

Every Hugging Face model name of a recipe is replaced by a tiny local checkpoint of the same
family (same architecture and tensor names; Llama-2-13B keeps its 40 layers, which the recipes'
``layer_range``s need); every other key stays exactly as written. Then:

- a recipe cabs-stream runs goes through the ``cabs-stream-yaml`` console script: the output
  must load and hold every tensor of the base, in the recipe's dtype; with MERGEKIT_YAML set,
  mergekit merges the same mapped recipe and the two outputs are compared as
  ``test_mergekit_compat.py`` does (bit-exact for task_arithmetic/ties/breadcrumbs apart from
  magnitude ties at the selection boundary, close for linear/sce/model_stock);
- a recipe cabs-stream cannot run must be refused before anything is written: exit status 2,
  a message naming the unsupported feature, no output and no work folder. With MERGEKIT_YAML
  set, mergekit must run the same mapped recipe (so the refusal is cabs-stream's limit, not a
  broken mapping).

mergekit computes in the recipe's ``dtype`` (float16 in these recipes), cabs-stream in float32.
So that the comparison can be bit-exact, the checkpoints are float16 with values on a dyadic
grid (base weights: multiples of 2^-12 below 0.25; task vectors: multiples of 2^-11 below 0.05;
norms: 1 + multiples of 2^-9): every intermediate of ties at weight 0.5 without normalize (the
bio-merge recipe) is then exact in float16, so both tools must produce the exact result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cabs_stream.synthetic import LlamaShape
from conftest import load_model, no_work_folder, write_model
from test_mergekit_compat import MERGEKIT, RTOL, RTOL_REDUCE, _excluded, f32, run_mergekit

EXAMPLES_DIR = Path(__file__).parent / "data" / "mergekit_examples"


@dataclass(frozen=True)
class Family:
    """A tiny stand-in for a real model family: a base and fine-tunes of one architecture."""

    shape: LlamaShape
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    fine_tunes: int = 1


FAMILIES = {
    "llama": Family(LlamaShape(hidden=16, layers=2, intermediate=40, vocab=64, heads=4, kv_heads=4)),
    # 40 layers, no grouped-query attention, as Llama-2-13B
    "llama2-13b": Family(LlamaShape(hidden=16, layers=40, intermediate=40, vocab=64, heads=4, kv_heads=4),
                         fine_tunes=4),
    # grouped-query attention (2 key/value heads for 4), as Mistral-7B (8 for 32)
    "mistral-7b": Family(LlamaShape(hidden=16, layers=4, intermediate=56, vocab=64, heads=4, kv_heads=2),
                         "MistralForCausalLM", "mistral", fine_tunes=2),
}


@dataclass(frozen=True)
class Example:
    """How one recipe is run: its model names -> local checkpoints ("family/base", "family/ftN"),
    and what cabs-stream must do with it (run it; refuse it with a message matching ``refused``;
    or, for a feature in progress, fail for now: ``xfail``)."""

    models: dict[str, str]
    refused: str | None = None
    xfail: str | None = None
    rounding: bool = False  # weights off the dyadic grid: mergekit's float16 rounding shows


EXAMPLES = {
    "arcee_fusion.yml": Example({"model_a": "llama/base", "model_b": "llama/ft1"},
                                refused=r"merge_method arcee_fusion is not supported"),
    "bio-merge.yml": Example({"mistralai/Mistral-7B-v0.1": "mistral-7b/base",
                              "mistralai/Mistral-7B-Instruct-v0.2": "mistral-7b/ft1",
                              "BioMistral/BioMistral-7B": "mistral-7b/ft2"}),
    "gradient-slerp.yml": Example({"psmathur/orca_mini_v3_13b": "llama2-13b/ft1",
                                   "garage-bAInd/Platypus2-13B": "llama2-13b/ft2"},
                                  refused=r"layer slicing \(frankenmerges\) is not supported"),
    "linear.yml": Example({"psmathur/orca_mini_v3_13b": "llama2-13b/ft1",
                           "WizardLM/WizardLM-13B-V1.2": "llama2-13b/ft3",
                           "garage-bAInd/Platypus2-13B": "llama2-13b/ft2"}),
    "orcamini-platy-44layer.yml": Example({"psmathur/orca_mini_v3_13b": "llama2-13b/ft1",
                                           "garage-bAInd/Platypus2-13B": "llama2-13b/ft2"},
                                          refused=r"layer slicing \(frankenmerges\) is not supported"),
    "ties.yml": Example({"psmathur/orca_mini_v3_13b": "llama2-13b/ft1",
                         "garage-bAInd/Platypus2-13B": "llama2-13b/ft2",
                         "WizardLM/WizardMath-13B-V1.0": "llama2-13b/ft4",
                         "TheBloke/Llama-2-13B-fp16": "llama2-13b/base"}, rounding=True),
}
#: How outputs are compared with mergekit's, by merge method (see the module docstring).
EXACT = {"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"}
CLOSE = {"linear", "sce", "model_stock"}
#: mergekit computes in the recipe's dtype: "close" allows 4 of its epsilons, relative to the operands.
COMPUTE_EPS = {"float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7}


# ------------------------------------------------------------------ checkpoints and recipes
def write_family(root: Path, name: str, family: Family, seed: int) -> dict[str, str]:
    """Write ``root/name/base`` and ``root/name/ft1..`` (float16, values on the dyadic grid)."""
    rng = np.random.default_rng(seed)
    config = {**family.shape.config("F16"), "architectures": [family.architecture],
              "model_type": family.model_type}
    base = {}
    for tensor, shape in family.shape.tensors():
        base[tensor] = (np.ones(shape) if len(shape) == 1
                        else rng.integers(-1000, 1001, shape) * 2.0 ** -12)
    folders = {f"{name}/base": write_model(str(root / name / "base"), {n: (v, "F16") for n, v in base.items()},
                                           config=config)}
    for i in range(1, family.fine_tunes + 1):
        ft = {}
        for tensor, v in base.items():
            tau = (rng.integers(-30, 31, v.shape) * 2.0 ** -9 if v.ndim == 1
                   else rng.integers(-100, 101, v.shape) * 2.0 ** -11)
            tau[rng.random(v.shape) < 0.3] = 0
            ft[tensor] = (v + tau, "F16")
        folders[f"{name}/ft{i}"] = write_model(str(root / name / f"ft{i}"), ft, config=config)
    return folders


def map_models(doc: Any, names: dict[str, str], seen: set[str]) -> Any:
    """``doc`` with the value of every ``model`` and ``base_model`` key replaced by its local folder."""
    if isinstance(doc, list):
        return [map_models(v, names, seen) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {}
    for key, value in doc.items():
        if key in ("model", "base_model") and isinstance(value, str):
            if value not in names:
                raise KeyError(f"{value} has no local checkpoint: add it to its entry in EXAMPLES")
            seen.add(value)
            out[key] = names[value]
        else:
            out[key] = map_models(value, names, seen)
    return out


@dataclass
class Mapped:
    recipe: str  # the mapped recipe's path
    doc: dict[str, Any]  # its contents
    theirs: str  # mergekit's output folder
    error: str | None = None  # mergekit's error (None: it ran, or was not run)


@pytest.fixture(scope="module")
def mapped(tmp_path_factory) -> dict[str, Mapped]:
    """Write the checkpoints and every mapped recipe; with MERGEKIT_YAML, run mergekit on all of them once."""
    root = tmp_path_factory.mktemp("examples")
    folders: dict[str, str] = {}
    for seed, (name, family) in enumerate(FAMILIES.items()):
        folders.update(write_family(root / "models", name, family, seed))
    out = {}
    for name, ex in EXAMPLES.items():
        doc = yaml.safe_load((EXAMPLES_DIR / name).read_text())
        seen: set[str] = set()
        doc = map_models(doc, {k: folders[v] for k, v in ex.models.items()}, seen)
        assert seen == set(ex.models), f"{name}: EXAMPLES maps {sorted(set(ex.models) - seen)}, not in the recipe"
        path = root / "recipes" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out[name] = Mapped(str(path), doc, str(root / "theirs" / name))
    if MERGEKIT:
        status = run_mergekit([(m.recipe, m.theirs) for m in out.values()], str(root))
        for m in out.values():
            m.error = status.get(m.theirs, "mergekit did not report this merge")
    return out


def cabs_stream_yaml(*args: str) -> subprocess.CompletedProcess:
    """Run the ``cabs-stream-yaml`` console script (the one installed beside this interpreter)."""
    script = os.path.join(os.path.dirname(sys.executable), "cabs-stream-yaml")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "cabs_stream_cli.mergekit_yaml"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)


def _params(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """Shared parameters, fine-tuned model paths (not the base) and their parameters."""
    base = doc.get("base_model")
    entries = [e for e in doc.get("models", []) if e["model"] != base]
    return doc.get("parameters") or {}, [e["model"] for e in entries], [e.get("parameters") or {} for e in entries]


# ------------------------------------------------------------------ the tests
def test_every_example_has_an_entry():
    files = sorted(p.name for p in EXAMPLES_DIR.glob("*.y*ml"))
    assert files == sorted(EXAMPLES), "each copied example needs an entry in EXAMPLES (and each entry a file)"


RUNNABLE = [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=ex.xfail)) if ex.xfail else n
            for n, ex in EXAMPLES.items() if not ex.refused]
REFUSED = [n for n, ex in EXAMPLES.items() if ex.refused]


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_runs(mapped, tmp_path, name, capsys):
    case = mapped[name]
    out = tmp_path / "out"
    r = cabs_stream_yaml(case.recipe, str(out))
    assert r.returncode == 0, f"cabs-stream-yaml failed:\n{r.stderr[-3000:]}"
    shared, models, mparams = _params(case.doc)
    ref_input = load_model(case.doc.get("base_model") or models[0])
    ours = load_model(str(out))
    assert sorted(ours) == sorted(ref_input), "the output lacks tensors of the base (or has others)"
    want = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[case.doc["dtype"]]
    for tensor, t in ours.items():
        assert t.shape == ref_input[tensor].shape and t.dtype == want, tensor
        assert torch.isfinite(t).all(), tensor
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(ours)
    assert json.load(open(out / "config.json"))["architectures"] == \
        json.load(open(Path(models[0]) / "config.json"))["architectures"]
    if not MERGEKIT:
        return
    assert case.error is None, f"mergekit failed on the mapped recipe:\n{case.error}"
    theirs = load_model(case.theirs)
    assert sorted(theirs) == sorted(ours)
    line = compare(case.doc["merge_method"], case.doc.get("dtype"), ours, theirs,
                   load_model(case.doc["base_model"]) if case.doc.get("base_model") else None,
                   [load_model(m) for m in models], shared, mparams,
                   json.load(open(os.path.join(case.doc.get("base_model") or models[0], "config.json")))
                   ["num_hidden_layers"], EXAMPLES[name].rounding)
    with capsys.disabled():
        print(f"\n[mergekit example {name}] {line}")


def mk_value(v: Any, tensor: str, layers: int) -> Any:
    """A parameter's value for one tensor by mergekit's rules (its ``evaluate_setting``), written
    here independently of cabs-stream: filter lists, then gradients over the layers (layer i of L
    at i / (L - 1), other tensors at 0)."""
    if isinstance(v, list) and v and all(isinstance(c, dict) for c in v):
        for c in v:
            if c.get("filter") in (None, "*") or c["filter"] in tensor:
                return mk_value(c["value"], tensor, layers)
        return None
    if isinstance(v, list):
        m = re.search(r"layers\.(\d+)\.", tensor)
        t = 0.0 if m is None else (int(m.group(1)) / (layers - 1) if layers > 1 else 1.0)
        s = t * (len(v) - 1)
        i0 = int(s)
        i1 = min(len(v) - 1, i0 + 1)
        return (1 - (s - i0)) * v[i0] + (s - i0) * v[i1]
    return v


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a float tensor."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().ravel()


def compare(method: str, dtype: str | None, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
            base: dict[str, torch.Tensor] | None, models: list[dict[str, torch.Tensor]], shared: dict[str, Any],
            mparams: list[dict[str, Any]], layers: int, rounding: bool = False) -> str:
    """Check ours against mergekit's output (asserts); returns a one-line summary."""
    if method in EXACT:
        differ = excluded = total = rounded = flips = 0
        worst = 0.0
        for tensor in ours:
            a, b = bits(ours[tensor]), bits(theirs[tensor])
            here = [{k: mk_value(v, tensor, layers) for k, v in p.items()} for p in mparams]
            skip = _excluded(method, {k: mk_value(v, tensor, layers) for k, v in shared.items()}, here,
                             [f32(m[tensor]) - f32(base[tensor]) for m in models])
            d = (a != b) & ~skip
            if rounding and d.any():  # only by mergekit's rounding in the compute dtype
                x, y = f32(ours[tensor]).ravel()[d].astype(np.float64), f32(theirs[tensor]).ravel()[d]
                operands = [np.abs(y), *[np.abs(f32(m[tensor]).ravel()[d]) for m in models],
                            np.abs(f32(base[tensor]).ravel()[d])]
                err = np.abs(x - y) / np.maximum.reduce(operands)
                # ties elects each element's sign from sum_i w_i tau_i: where that sum is within
                # float16 rounding of 0, mergekit's float16 sum may elect the other sign
                taus = []
                for m, p in zip(models, mparams):  # each task vector after ties' trim (top density)
                    tau = (f32(m[tensor]) - f32(base[tensor])).ravel()
                    k = int(mk_value(p.get("density", 1.0), tensor, layers) * tau.size)
                    kth = np.sort(np.abs(tau))[::-1][max(k, 1) - 1]
                    taus.append(np.where(np.abs(tau) >= kth, tau, 0)[d] if k < tau.size else tau[d])
                ws = [float(mk_value(p.get("weight", 1.0), tensor, layers)) for p in mparams]
                mass = sum(w * t for w, t in zip(ws, taus))
                flip = np.abs(mass) <= 4 * COMPUTE_EPS[dtype] * sum(abs(w) * np.abs(t) for w, t in zip(ws, taus))
                flips += int((flip & (err > 4 * COMPUTE_EPS[dtype])).sum())
                err = np.where(flip, 0, err)
                worst = max(worst, float(err.max()))
                assert (err <= 4 * COMPUTE_EPS[dtype]).all(), f"{tensor}: beyond {dtype} rounding ({err.max():.3g})"
                rounded += int(d.sum())
                d[:] = False
            differ += int(d.sum())
            excluded += int(skip.sum())
            total += a.size
        assert differ == 0, f"{differ} of {total} elements differ from mergekit's"
        return (f"bit-identical, {excluded} of {total} elements excluded (magnitude ties at a selection boundary)"
                + (f", {rounded} within {dtype} rounding of mergekit's (max {worst:.3g} relative; {flips} of them a "
                   "sign elected from a sum within rounding of 0)" if rounded else ""))
    if method in CLOSE:
        rtol = 4 * COMPUTE_EPS[dtype] if dtype in COMPUTE_EPS else (RTOL_REDUCE if method != "linear" else RTOL)
        worst, bad = 0.0, []
        for tensor in ours:
            a, b = f32(ours[tensor]), f32(theirs[tensor])
            operands = [np.abs(b), *[np.abs(f32(m[tensor])) for m in models]]
            if base is not None:
                operands.append(np.abs(f32(base[tensor])))
            scale = np.maximum(np.maximum.reduce(operands), np.finfo(np.float32).tiny)
            err = np.abs(a.astype(np.float64) - b) / scale
            worst = max(worst, float(err.max()))
            if (err > rtol).any():
                bad.append(f"{tensor}: {int((err > rtol).sum())} elements, max {err.max():.3g}")
        assert not bad, "; ".join(bad[:5])
        return f"max rel diff {worst:.3g} (tol {rtol:.3g})"
    raise AssertionError(f"no comparison with mergekit for {method} yet: add one (see test_mergekit_compat.py)")


@pytest.mark.parametrize("name", REFUSED)
def test_example_is_refused_up_front(mapped, tmp_path, name):
    case = mapped[name]
    out = tmp_path / "out"
    r = cabs_stream_yaml(case.recipe, str(out))
    assert r.returncode == 2, f"exit status {r.returncode}:\n{r.stderr[-3000:]}"
    assert r.stderr.startswith("error: ") and re.search(EXAMPLES[name].refused, r.stderr), r.stderr
    assert not out.exists() and os.listdir(tmp_path) == [] and no_work_folder(tmp_path)
    if MERGEKIT:
        assert case.error is None, f"mergekit cannot run the mapped recipe either (a broken mapping?):\n{case.error}"
        assert os.path.exists(os.path.join(case.theirs, "config.json"))
