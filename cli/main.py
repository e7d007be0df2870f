"""``cabs-stream``: merge fine-tuned models with CABS, streaming, on CPUs."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace

import click

import cabs_stream
from cabs_stream import SCHEDULERS, __version__
from cabs_stream.config import build_config, load_config, parse_size
from cabs_stream.errors import CabsError, ConfigError
from cabs_stream.methods import registry
from cabs_stream.methods.base import Param

from .common import cli_errors, print_summary


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except CabsError as e:
        raise click.BadParameter(str(e)) from None


def engine_options(f):
    """Options of the streaming engine (they never change the merged bytes)."""
    opts = [
        click.option("--chunk-size", type=int, default=None, metavar="ELEMENTS",
                     help="Elements per chunk, rounded up to a multiple of lcm(m, 8). "
                          "Default: derived from --memory, else 4194304."),
        click.option("--workers", type=int, default=None, metavar="N",
                     help="Chunks processed in parallel. Default: twice the number of CPUs (I/O and compute overlap)."),
        click.option("--memory", default=None, metavar="SIZE", callback=_size,
                     help="Memory budget such as 1GiB or 800MB; sets the chunk size from the "
                          "worker count when --chunk-size is not given."),
        click.option("--scheduler", type=click.Choice(SCHEDULERS),
                     default="threads", show_default=True, help="Dask scheduler that runs the chunks."),
        click.option("--shard-size", default="5GB", show_default=True, metavar="SIZE",
                     help="Maximum size of an output safetensors shard."),
        click.option("--overwrite", is_flag=True,
                     help="Replace OUT_DIR if it exists (only once the merge is complete)."),
        click.option("--save-masks", is_flag=True,
                     help="Keep the bit-packed masks (1 bit per parameter per model) as a Zarr store, "
                          "OUT_DIR/cabs_masks.zarr."),
        click.option("--durable", is_flag=True,
                     help="fsync each chunk's bytes before recording it done, so a resume after a power loss "
                          "reuses every recorded chunk (without it such chunks fail verification and are redone)."),
        click.option("--allow-nonfinite", is_flag=True,
                     help="Merge even if a task vector holds NaN or Inf (default: stop with an error)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress output and no summary."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cabs-stream")
def main() -> None:
    """Merge fine-tuned models with CABS (conflict-aware, balanced sparsification) or task
    arithmetic, chunk by chunk, in bounded memory on CPUs."""


def _method_params() -> dict[str, tuple[Param, list[str]]]:
    """Every parameter of every registered method, with the methods that take it."""
    out: dict[str, tuple[Param, list[str]]] = {}
    for name in registry.names():
        for p in registry.get(name).params:
            if p.name in ("weight", "int8_mask"):
                continue
            if p.name not in out:
                out[p.name] = (p, [])
            out[p.name][1].append(name)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_options(f):
    """One option per method parameter, generated from the methods' schemas (``--help``
    lists the methods each applies to)."""
    for name, (p, users) in reversed(list(_method_params().items())):
        where = f" [{', '.join(users)}]"
        dest = "p_" + name
        p = replace(p, help=p.help[0].upper() + p.help[1:])
        if p.kind == "bool":
            opt = click.option(f"{_flag(name)}/--no-{name.replace('_', '-')}", dest, default=None,
                               help=p.help + where)
        elif p.kind == "choice":
            choices = sorted({c for m in users for c in registry.get(m).param(name).choices})
            opt = click.option(_flag(name), dest, type=click.Choice(choices), default=None, help=p.help + where)
        elif p.kind == "models":
            opt = click.option(_flag(name), dest, multiple=True, metavar="MODEL",
                               help=p.help + " (repeat, model paths)" + where)
        else:
            typ = float if p.kind == "float" else int
            per = " Once for every model, or once per model in --model order." if p.per_model else ""
            opt = click.option(_flag(name), dest, type=typ, default=None, multiple=p.per_model,
                               help=p.help.rstrip(".") + "." + per + where)
        f = opt(f)
    return f


def _collect(values: dict) -> tuple[dict, dict[str, list]]:
    """Split the generated options into global parameters and per-model lists."""
    shared, per_model = {}, {}
    for key, v in values.items():
        name = key[2:]
        if v is None or v == ():
            continue
        p, _ = _method_params()[name]
        if p.per_model and len(v) > 1:
            per_model[name] = list(v)
        elif p.per_model:
            shared[name] = v[0]
        elif p.kind == "models":
            shared[name] = list(v)
        else:
            shared[name] = v
    return shared, per_model


@main.command("merge")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), help="Output folder (instead of OUT_DIR).")
@click.option("--method", type=click.Choice(registry.names()), default=None,
              help="Merge method (default cabs, or the config's merge_method). See the README's method table.")
@click.option("--base", default=None, help="Base model: a Hugging Face folder or .safetensors file.")
@click.option("--model", "models", multiple=True, help="A fine-tuned model (repeat for each).")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Lambda of each --model's task vector, in the same order (default 1.0).")
@method_options
@click.option("--dtype", default=None, help="Output dtype: bfloat16, float16 or float32 (default: the base's).")
@click.option("--tokenizer-source", default=None,
              help="The output's vocabulary and tokenizer: base (default), union, or a model folder (rows of "
                   "embeddings and lm_head aligned by token as mergekit does).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep tensors whose name contains PATTERN from the base (repeat), e.g. embed_tokens.")
@click.option("--allow-missing", is_flag=True,
              help="A tensor missing from a fine-tuned model counts as an all-zero task vector.")
@click.option("--from", "from_store", default=None, metavar="STORE",
              help="Merge from a task-vector store (`cabs-stream prune`) with new --weight values, reading only "
                   "the base and the store.")
@click.option("--keep-task-vectors", default=None, metavar="STORE",
              help="Also write the pruned task vectors to a task-vector store (as `cabs-stream prune` does).")
@engine_options
def merge_cmd(config, out_dir, output, method, base, models, weights, dtype, tokenizer_source, exclude,
              allow_missing, from_store, keep_task_vectors, chunk_size, workers, memory, scheduler, shard_size,
              overwrite, save_masks, durable, allow_nonfinite, quiet, **method_values) -> None:
    """Merge models into OUT_DIR, from a mergekit-style CONFIG.yml or from flags.

    \b
      cabs-stream merge config.yml merged/
      cabs-stream merge --base B --model A --model C -o merged --n 64 --m 256 --weight 1.2 --weight 1.0

    Method parameters apply only to the methods listed in brackets; giving one to another
    method is an error.
    """
    if config and not out_dir and not output and not config.endswith((".yml", ".yaml")):
        config, out_dir = None, config  # a single positional argument is the output folder
    target = output or out_dir
    if not target:
        raise click.UsageError("give the output folder as OUT_DIR or with -o/--output")
    if output and out_dir:
        raise click.UsageError("give the output folder once, as OUT_DIR or with -o")
    params, per_model = _collect(method_values)
    if from_store:
        given = [f for f, v in (("CONFIG", config), ("--base", base), ("--model", models), ("--method", method),
                                ("--dtype", dtype), ("--tokenizer-source", tokenizer_source), ("--exclude", exclude),
                                ("--allow-missing", allow_missing), ("--keep-task-vectors", keep_task_vectors),
                                ("--memory", memory), ("--chunk-size", chunk_size), ("--save-masks", save_masks),
                                ("--allow-nonfinite", allow_nonfinite)) if v] + [_flag(n) for n in params]
        if given:
            raise click.UsageError(f"{given[0]} does not apply with --from (the store fixes the recipe and its "
                                   "chunking); give --weight values and engine options only")
        with cli_errors():
            res = cabs_stream.merge_from_store(from_store, target, list(weights) or None, workers=workers,
                                               scheduler=scheduler, shard_size=shard_size, overwrite=overwrite,
                                               quiet=quiet, durable=durable)
        if not quiet:
            print_summary(res.report, res.out_dir)
        return
    if config and (base or models):
        raise click.UsageError("--base/--model cannot be combined with a CONFIG file")
    if not config and not models:
        raise click.UsageError("give a CONFIG file, or --base and at least one --model (linear may leave out --base)")
    with cli_errors():
        if config:
            k = len(load_config(config).models) if per_model else 0
            cfg = load_config(config, method=method, dtype=dtype, tokenizer_source=tokenizer_source,
                              allow_missing=allow_missing or None, weights=list(weights) or None,
                              params=params or None, model_params=_per_model(per_model, k),
                              exclude=list(exclude) or None)
        else:
            cfg = build_config(method=method or "cabs", base=base, models=list(models), weights=list(weights),
                               dtype=dtype, tokenizer_source=tokenizer_source, allow_missing=allow_missing,
                               params=params, model_params=_per_model(per_model, len(models)),
                               exclude=list(exclude))
        res = cabs_stream.merge(cfg, target, chunk_size=chunk_size, workers=workers, memory=memory,
                                scheduler=scheduler, shard_size=shard_size, overwrite=overwrite,
                                save_masks=save_masks, allow_nonfinite=allow_nonfinite, quiet=quiet, durable=durable,
                                keep_task_vectors=keep_task_vectors)
    if not quiet:
        print_summary(res.report, res.out_dir)


def _per_model(per_model: dict[str, list], k: int) -> list[dict] | None:
    """Per-model option values (given once per model) as one dict per model."""
    if not per_model:
        return None
    for name, values in per_model.items():
        if len(values) != k:
            raise ConfigError(f"{_flag(name)} given {len(values)} times for {k} models; give it once (every "
                              "model) or once per model")
    return [{name: values[i] for name, values in per_model.items()} for i in range(k)]


@main.command("prune")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--chunk-size", type=int, default=None, metavar="ELEMENTS", help="Elements per chunk.")
@click.option("--workers", type=int, default=None, metavar="N", help="Chunks processed in parallel.")
@click.option("--memory", default=None, metavar="SIZE", callback=_size, help="Memory budget, e.g. 1GiB.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="threads",
              show_default=True, help="Dask scheduler that runs the chunks.")
@click.option("--overwrite", is_flag=True, help="Replace STORE if it exists (once the new one is complete).")
@click.option("--allow-nonfinite", is_flag=True, help="Proceed even if a task vector holds NaN or Inf.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def prune_cmd(config, store, chunk_size, workers, memory, scheduler, overwrite, allow_nonfinite, quiet) -> None:
    """Write the pruned task vectors of CONFIG.yml to a Zarr task-vector STORE.

    Then `cabs-stream merge --from STORE --weight ... OUT` merges any lambdas reading only the
    base and the store (bit-identical to a fresh merge), and `cabs-stream sweep` searches them.
    """
    with cli_errors():
        res = cabs_stream.prune(config, store, chunk_size=chunk_size, workers=workers, memory=memory,
                                scheduler=scheduler, overwrite=overwrite, allow_nonfinite=allow_nonfinite, quiet=quiet)
    if not quiet:
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(res.out_dir) for f in fs)
        k = len(res.report["models"])
        click.echo(f"pruned {k} task vectors of {res.report['numel'] / 1e6:.1f} M parameters into {res.out_dir} "
                   f"({size / 1e6:.1f} MB, {size / max(res.report['numel'] * k, 1):.3f} bytes per parameter "
                   f"per model)")


def _range(ctx, param, value):
    if value is None:
        return None
    try:
        lo, hi = (float(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter("write LO:HI, e.g. 0:2") from None
    return lo, hi


@main.command("sweep")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--weights", default=None, metavar="LO:HI:STEP",
              help="One lambda for every model, on this grid (e.g. 0.8:2.0:0.1).")
@click.option("--weights-per-model", multiple=True, metavar="LO:HI:STEP",
              help="A grid per model (repeat, in the config's order; once = the same grid for each); "
                   "all combinations are merged, at most --max-points.")
@click.option("--max-points", type=click.IntRange(1, 2000), default=400, show_default=True,
              help="Cap on the points of a per-model grid.")
@click.option("--eval", "eval_cmd", default=None, metavar="'COMMAND {model}'",
              help="Scores a merged folder: {model} is replaced by its path; the last number it prints is the "
                   "score (higher is better unless --minimize). A failing point is recorded and the sweep goes on.")
@click.option("--minimize", is_flag=True, help="Lower scores are better.")
@click.option("--keep", type=click.Choice(["best", "all"]), default="best", show_default=True,
              help="Which merged folders stay (best: the disk of about two models).")
@click.option("--refine", is_flag=True,
              help="The paper's search: a 0.1 grid over --weights' range (default 0.1:3.0), then 0.01 around the best.")
@click.option("--search", type=click.Choice(["optuna"]), default=None,
              help="Search per-model lambdas with Optuna instead of a grid (pip install 'cabs-stream[search]').")
@click.option("--trials", type=click.IntRange(1, 10000), default=30, show_default=True, help="Optuna trials.")
@click.option("--range", "search_range", default="0:2", show_default=True, callback=_range, metavar="LO:HI",
              help="Optuna: the range of every model's lambda.")
@click.option("--sampler", type=click.Choice(["gp", "tpe", "cmaes"]), default="gp", show_default=True,
              help="Optuna sampler (gp: Gaussian process, fewest evaluations; tpe; cmaes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Optuna seed (reruns repeat).")
@click.option("--chunk-size", type=int, default=None, metavar="ELEMENTS", help="Elements per chunk (pruning).")
@click.option("--workers", type=int, default=None, metavar="N", help="Chunks processed in parallel.")
@click.option("--memory", default=None, metavar="SIZE", callback=_size, help="Memory budget, e.g. 1GiB.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def sweep_cmd(config, out_dir, weights, weights_per_model, max_points, eval_cmd, minimize, keep, refine, search,
              trials, search_range, sampler, seed, chunk_size, workers, memory, quiet) -> None:
    """Prune CONFIG.yml once into OUT_DIR/store.zarr, then merge and score lambda points.

    \b
      cabs-stream sweep merge.yml sweep/ --weights 0.8:2.0:0.1 --eval 'python eval.py {model}'
      cabs-stream sweep merge.yml sweep/ --refine --eval 'python eval.py {model}'
      cabs-stream sweep merge.yml sweep/ --search optuna --trials 30 --eval 'python eval.py {model}'

    Results: OUT_DIR/sweep.json (every point; best.weights in the config's model order and
    best.score), sweep.csv and sweep.png. An interrupted sweep resumes at the first missing point.
    """
    with cli_errors("the points merged so far are kept; rerun the same command to resume the sweep"):
        doc = cabs_stream.sweep(config, out_dir, weights=weights, weights_per_model=list(weights_per_model) or None,
                                evaluate=eval_cmd, minimize=minimize, keep=keep, refine=refine, search=search,
                                trials=trials, search_range=search_range, sampler=sampler, seed=seed,
                                max_points=max_points, quiet=quiet, chunk_size=chunk_size, workers=workers,
                                memory=memory)
    best = doc["best"]
    failed = sum(1 for p in doc["points"] if p["error"])
    click.echo(f"{len(doc['points'])} points" + (f" ({failed} failed)" if failed else "")
               + (f"; best score {best['score']} at weights {best['weights']}" if best else "")
               + f"; {os.path.join(out_dir, 'sweep.json')}")


@main.command("analyze")
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default="cabs-analysis", show_default=True,
              help="Folder for analysis.json and the plots.")
@click.option("--method", "methods", multiple=True, default=("magnitude", "random", "cabs"), show_default=True,
              help="Methods to compare (repeat): magnitude, random, cabs, bs_only, ca_only, ties, dare_ties.")
@click.option("--sparsity", "sparsities", type=float, multiple=True, default=(0.5, 0.75, 0.9), show_default=True,
              help="Sparsities to evaluate (repeat).")
@click.option("--tensor", default=None, help="Tensor shown in the density heatmap (default: the largest 2-D one).")
@click.option("--no-plots", is_flag=True, help="Only write analysis.json (no matplotlib needed).")
@click.option("--chunk-size", type=int, default=None, metavar="ELEMENTS", help="Elements per chunk.")
@click.option("--workers", type=int, default=None, metavar="N", help="Chunks processed in parallel.")
@click.option("--memory", default=None, metavar="SIZE", callback=_size, help="Memory budget, e.g. 1GiB.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output and no summary.")
def analyze_cmd(config, out, methods, sparsities, tensor, no_plots, chunk_size, workers, memory, quiet) -> None:
    """Compare what methods keep (overlap, balance, per-layer density) without writing a model.

    CONFIG gives the base and fine-tuned models (its merge_method is ignored); every method is
    run at every sparsity on the streaming engine and the results go to OUTPUT/analysis.json
    with the plots overlap_vs_sparsity.png, density_heatmap.png and per_layer_kept.png.
    """
    from cabs_stream.analyze import analyze

    with cli_errors("no analysis was written; rerun the same command"):
        res = analyze(load_config(config), out, list(methods), list(sparsities), tensor=tensor,
                      plots=not no_plots, chunk_size=chunk_size, workers=workers, memory=memory, quiet=quiet)
    if not quiet:
        k = len(res["models"])
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        click.echo(f"{'method':<12} {'sparsity':>8} {'density 1':>9} " + " ".join(f"{f'overlap {i + 1}|{j + 1}':>12}"
                                                                           for i, j in pairs)
                   + f" {'CV rows':>8} {'CV groups':>9}")
        for p in res["points"]:
            click.echo(f"{p['method']:<12} {p['sparsity']:>8} {f(p['density'][0]):>9} "
                       + " ".join(f"{f(p['overlap'][i][j]):>12}" for i, j in pairs)
                       + f" {f(p['cv_rows'][0]):>8} {f(p['cv_groups'][0]):>9}")
        click.echo("overlap i|j = |kept by i and j| / |kept by i|; models: "
                   + ", ".join(f"{i + 1} = {m}" for i, m in enumerate(res["models"])))
        click.echo(f"wrote {os.path.join(out, 'analysis.json')}" +
                   "".join(f"\nwrote {p}" for p in res.get("plots", [])))


@main.command("demo")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Where to put the demo family and merge (default: a new temporary folder).")
@click.option("--models", "k", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Fine-tuned models to generate (1-16).")
@click.option("--quiet", "-q", is_flag=True, help="Only print the output folder.")
def demo_cmd(out, k, quiet) -> None:
    """Generate a small Llama-shaped family (no downloads) and merge it with CABS 64:256."""
    from cabs_stream.synthetic import SHAPES, generate_family

    root = out or tempfile.mkdtemp(prefix="cabs-demo-")
    os.makedirs(root, exist_ok=True)
    t0 = time.monotonic()
    shape = SHAPES["demo"]
    base, fts = generate_family(os.path.join(root, "family"), shape, k=k, shard_size=4_000_000)
    if not quiet:
        click.echo(f"generated base + {k} fine-tuned models ({shape.params / 1e6:.1f} M parameters, bf16) "
                   f"in {root}/family ({time.monotonic() - t0:.1f} s)")
    with cli_errors():
        cfg = build_config(method="cabs", base=base, models=fts, weights=[1.0] * k, n=64, m=256)
        res = cabs_stream.merge(cfg, os.path.join(root, "merged"), overwrite=True, shard_size="4MB", quiet=True)
    if quiet:
        click.echo(res.out_dir)
    else:
        print_summary(res.report, res.out_dir)
        click.echo(f"report: {os.path.join(res.out_dir, 'cabs_report.json')}")
        click.echo("(a first run includes the one-time Numba compilation of the kernels, cached afterwards)")
        if out is None:
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(root) for f in fs)
            click.echo(f"the demo folder ({size / 1e6:.0f} MB) stays in {root}; remove it with: rm -r {root}")


if __name__ == "__main__":
    main()
