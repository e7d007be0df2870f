"""``analyze``: what would each method keep? Overlap, balance and density without a merge.

For every (method, sparsity) the chunk map runs in dry mode (no output shards): the same
kernels produce the counts of the report and, for the tensor shown in the heatmap, the
bit-packed masks in the Zarr state; the heatmap is then read back from that store a block
of rows at a time. Plots need matplotlib (``pip install 'cabs-stream[plots]'``).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from typing import Any, cast

import numpy as np
import zarr

from .config import MergeConfig, ModelSpec, build_config
from .errors import ConfigError, OutputError
from .io import output
from .io.workstate import MASKS_NAME
from .methods import registry
from .options import EngineOptions
from .pipeline import execute

ANALYSIS_METHODS = {"magnitude": "magnitude", "random": "random", "cabs": "cabs", "bs_only": "bs_only",
                    "ca_only": "ca_only", "ties": "ties", "dare_ties": "dare_ties"}
_LAYER = re.compile(r"layers?\.(\d+)\.")


def variant(cfg: MergeConfig, method: str, sparsity: float) -> MergeConfig:
    """The configuration of one (method, sparsity) point: the same models and weights, the
    method's sparsity parameter (n of m, or density), and every other parameter of ``cfg``
    that the method also takes."""
    spec = registry.get(method)
    density = 1.0 - sparsity
    m = int(cfg.value("m", default=256))
    params = {k: v for k, v in cfg.params.items()
              if spec.param(k) and k not in ("n", "m", "sparsity", "density", "variant", "pruning_order")}
    if spec.param("n"):
        params.update(n=max(1, round(m * density)), m=m)
    if spec.param("density"):
        params["density"] = density
    if spec.param("pruning_order") and cfg.spec.param("pruning_order"):
        params["pruning_order"] = [cfg.models[i].path for i in cfg.order]
    models = [ModelSpec(s.path, {"weight": s.get("weight")} if spec.param("weight") else None) for s in cfg.models]
    return build_config(method=method, base=cfg.base, models=models, params=params, dtype=cfg.dtype,
                        allow_missing=cfg.allow_missing, exclude=list(cfg.exclude))


def heatmap(masks_path: str, tensor: str, shape: tuple[int, ...], model: int, bins: int = 64) -> np.ndarray:
    """Kept fraction per cell of a (bins x bins) grid over a 2-D tensor, from its packed mask."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    arr = cast(zarr.Array, zarr.open_group(masks_path, mode="r")[tensor])
    rb, cb = min(bins, rows), min(bins, cols)
    r_edges = np.linspace(0, rows, rb + 1).astype(int)
    c_edges = np.linspace(0, cols, cb + 1).astype(int)
    grid = np.zeros((rb, cb))
    block = max(1, (arr.chunks[1] * 8) // max(cols, 1))  # rows per read
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        a, b = r0 * cols, r1 * cols
        raw = np.asarray(arr[model, a // 8: -(-b // 8)])  # already an ndarray (uint8): no copy
        bits = np.unpackbits(raw, bitorder="little")[a - a // 8 * 8: a - a // 8 * 8 + (b - a)].reshape(r1 - r0, cols)
        per_col_cell = np.add.reduceat(bits, c_edges[:-1], axis=1)
        cell_rows = np.searchsorted(r_edges, np.arange(r0, r1), side="right") - 1
        np.add.at(grid, cell_rows, per_col_cell)
    area = np.outer(np.diff(r_edges), np.diff(c_edges))
    return grid / area


def per_layer(report: dict[str, Any], model: int) -> dict[int, float]:
    kept: dict[int, list[int]] = {}
    for name, t in report["tensors"].items():
        mt = _LAYER.search(name)
        if mt:
            k = kept.setdefault(int(mt.group(1)), [0, 0])
            k[0] += t["kept"][model]
            k[1] += t["numel"]
    return {layer: a / b for layer, (a, b) in sorted(kept.items()) if b}


def analyze(cfg: MergeConfig, out_dir: str, methods: list[str], sparsities: list[float],
            tensor: str | None = None, plots: bool = True, chunk_size: int | None = None,
            workers: int | None = None, memory: int | str | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run every (method, sparsity), write ``analysis.json`` (and PNG plots) into ``out_dir``."""
    for m in methods:
        if m not in ANALYSIS_METHODS:
            raise ConfigError(f"cannot analyze method {m!r}; choose from {', '.join(ANALYSIS_METHODS)}")
    for s in sparsities:
        if not 0 <= s < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {s}")
    if not sparsities or not methods:
        raise ConfigError("give at least one method and one sparsity")
    if plots:
        _pyplot()  # fail before the work, not after it
    inputs = [cfg.base, *(s.path for s in cfg.models)]
    output.check_output(out_dir, inputs, overwrite=True)  # never inside, or holding, an input
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"analysis output {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, ".analysis-work")
    output.private_dir(work)
    results: dict[str, Any] = {"models": [s.path for s in cfg.models], "points": []}
    heat: dict[str, np.ndarray] = {}
    shown = tensor
    try:
        for method in methods:
            for s in sparsities:
                v = variant(cfg, method, s)
                wd = os.path.join(work, f"{method}-{s}")
                plan, rep = execute(v, wd, EngineOptions(chunk_size, workers, memory, quiet=quiet, save_masks=True),
                                    dry=True)
                if shown is None:  # the largest 2-D merged tensor
                    two_d = [t for t in plan.tensors if t.merged and len(t.shape) == 2]
                    if not two_d:
                        raise ConfigError("no merged 2-D tensor to show in the heatmap; name one with `tensor`")
                    shown = max(two_d, key=lambda t: t.numel).name
                else:
                    names = [t.name for t in plan.tensors if t.merged and len(t.shape) >= 2]
                    if shown not in names:
                        near = difflib.get_close_matches(shown, names, n=5, cutoff=0.4)
                        raise ConfigError(f"`tensor` {shown!r} is not a merged tensor of 2 or more dimensions"
                                          + (f"; did you mean {', '.join(near)}?" if near else ""))
                point = {"method": method, "sparsity": s, "density": rep["density"], "overlap": rep["overlap"],
                         "cv_rows": rep["cv_rows"], "cv_groups": rep["cv_groups"],
                         "per_layer_kept": {str(k): v for k, v in per_layer(rep, 0).items()},
                         "tensors": rep["tensors"], "seconds": rep["seconds"]["total"]}
                results["points"].append(point)
                if s == sparsities[len(sparsities) // 2]:
                    shape = next(t.shape for t in plan.tensors if t.name == shown)
                    heat[method] = heatmap(os.path.join(wd, MASKS_NAME), shown, shape, 0)
                shutil.rmtree(wd, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["heatmap_tensor"] = shown
    results["heatmap_sparsity"] = sparsities[len(sparsities) // 2]
    output.write_json(os.path.join(out_dir, "analysis.json"), results)
    if plots:
        results["plots"] = make_plots(results, heat, out_dir)
    return results


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'cabs-stream[plots]' (or pass `plots=False`)") from None
    return plt


def make_plots(results: dict[str, Any], heat: dict[str, np.ndarray], out_dir: str) -> list[str]:
    """overlap_vs_sparsity.png (paper Fig. 2), density_heatmap.png (Fig. 3), per_layer_kept.png."""
    plt = _pyplot()
    paths = []
    pts = results["points"]
    methods = list(dict.fromkeys(p["method"] for p in pts))

    styles = [dict(marker=mk, linestyle=ls, markersize=ms) for mk, ls, ms in
              zip("osD^vP*X", ["-", "--", "-.", ":"] * 2, [9, 7, 6, 8, 6, 8, 9, 6])]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for n, m in enumerate(methods):  # distinct markers and dashes: coinciding lines stay visible
        xs = [p["sparsity"] for p in pts if p["method"] == m]
        ys = [p["overlap"][0][1] if len(p["overlap"]) > 1 and p["overlap"][0][1] is not None else 0.0
              for p in pts if p["method"] == m]
        ax.plot(xs, ys, label=m, alpha=0.85, fillstyle="none", **styles[n % len(styles)])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("overlap rate |A and B| / |A| (models 1, 2)")
    ax.set_title("Overlap of kept weights vs sparsity")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "overlap_vs_sparsity.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    if heat:
        top = max(max(float(g.max()) for g in heat.values()), 1e-9)  # one colour scale for every panel
        fig, axes = plt.subplots(1, len(heat), figsize=(4 * len(heat), 4), dpi=100, squeeze=False)
        for ax, (m, grid) in zip(axes[0], heat.items()):
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=top, aspect="auto")
            ax.set_title(f"{m}: kept density, model 1")
            ax.set_xlabel("column block")
            ax.set_ylabel("row block")
        fig.colorbar(im, ax=list(axes[0]), fraction=0.046, label="kept fraction (same scale in every panel)")
        fig.suptitle(f"{results['heatmap_tensor']} at sparsity {results['heatmap_sparsity']} "
                      f"(model 1: {os.path.basename(str(results['models'][0]))})")
        paths.append(os.path.join(out_dir, "density_heatmap.png"))
        fig.savefig(paths[-1])
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    s_mid = results["heatmap_sparsity"]
    for p in pts:
        if p["sparsity"] == s_mid and p["per_layer_kept"]:
            layers = sorted(int(x) for x in p["per_layer_kept"])
            ax.plot(layers, [p["per_layer_kept"][str(i)] for i in layers], label=p["method"], alpha=0.85,
                    fillstyle="none", **styles[methods.index(p["method"]) % len(styles)])
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction (model 1)")
    ax.set_title(f"Kept fraction per layer at sparsity {s_mid}")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "per_layer_kept.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths
