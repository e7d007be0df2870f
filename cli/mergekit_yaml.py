"""``cabs-stream-yaml CONFIG OUT [flags]``: mergekit-yaml's command line, run by cabs-stream.

The flags people paste from mergekit tutorials work: those with a meaning here are honoured
(``--copy-tokenizer``, ``--out-shard-size`` in parameters with K/M/B suffixes,
``--write-model-card``, ``--random-seed``, ``--quiet``); those without one (GPU, lazy loading,
thread and write options) are accepted with a one-line note each, never silently.
"""

from __future__ import annotations

import os
import re

import click

import cabs_stream
from cabs_stream.config import load_config
from cabs_stream.errors import ConfigError, OutputError

from .common import cli_errors, print_summary

_NO_MEANING = {
    "allow_crimes": "--allow-crimes: architectures are not checked by name here; tensors must match by name and shape",
    "lazy_unpickle": "--lazy-unpickle: inputs are always memory-mapped chunk by chunk",
    "low_cpu_memory": "--low-cpu-memory: memory is always bounded (see --memory of `cabs-stream merge`)",
    "cuda": "--cuda: cabs-stream runs on the CPU",
    "read_to_gpu": "--read-to-gpu: cabs-stream runs on the CPU",
    "multi_gpu": "--multi-gpu: cabs-stream runs on the CPU",
    "gpu_rich": "--gpu-rich: cabs-stream runs on the CPU",
    "trust_remote_code": "--trust-remote-code: no model code is ever loaded or run",
    "clone_tensors": "--clone-tensors: every output tensor is written once",
    "async_write": "--async-write: shards are always written in place as chunks complete",
    "safe_serialization": "--safe-serialization: the output is always safetensors",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)


def parameters(text: str) -> int:
    """mergekit's --out-shard-size: a number of parameters, with K/M/B (and T) suffixes."""
    mt = _SIZE.match(text)
    if not mt:
        raise click.BadParameter(f"{text!r}: write a number of parameters such as 5B, 500M or 1000K")
    value = float(mt.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[mt.group(2).lower()]
    if value < 1e6:
        raise click.BadParameter(f"{text!r} is under 1M parameters per shard; too small to be useful")
    return int(value)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the tokenizer of tokenizer_source (default: the base) to the output.")
@click.option("--out-shard-size", default="5B", show_default=True, metavar="PARAMS",
              help="Parameters per output shard, with K/M/B suffixes (mergekit's meaning; bytes = parameters x "
                   "the output dtype's size).")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
              help="Write a README.md model card with the recipe.")
@click.option("--random-seed", type=int, default=None,
              help="Seed of the randomized methods (dare_*, della*, random): their random_seed parameter.")
@click.option("--quiet/--no-quiet", default=False, help="No progress output.")
@click.option("-v", "--verbose", count=True, help="Accepted (cabs-stream prints a summary; -q for none).")
@click.option("--allow-crimes/--no-allow-crimes", default=False, help="Accepted with a note.")
@click.option("--lazy-unpickle/--no-lazy-unpickle", default=False, help="Accepted with a note.")
@click.option("--low-cpu-memory/--no-low-cpu-memory", default=False, help="Accepted with a note.")
@click.option("--cuda/--no-cuda", default=False, help="Accepted with a note (CPU only).")
@click.option("--read-to-gpu/--no-read-to-gpu", default=False, help="Accepted with a note (CPU only).")
@click.option("--multi-gpu/--no-multi-gpu", default=False, help="Accepted with a note (CPU only).")
@click.option("--gpu-rich", is_flag=True, help="Accepted with a note (CPU only).")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, help="Accepted with a note.")
@click.option("--clone-tensors/--no-clone-tensors", default=False, help="Accepted with a note.")
@click.option("--async-write/--no-async-write", default=False, help="Accepted with a note.")
@click.option("--safe-serialization/--no-safe-serialization", default=True, help="Accepted (always safetensors).")
@click.option("--device", default=None, help="Accepted with a note unless cpu.")
@click.option("--num-threads", "-j", type=int, default=None, help="Chunks processed in parallel (--workers).")
@click.option("--write-threads", type=int, default=None, help="Accepted with a note.")
@click.option("--transformers-cache", default=None, help="Accepted with a note (models are local folders here).")
@click.option("--lora-merge-cache", default=None, help="Accepted with a note.")
@click.option("--lora-merge-dtype", default=None, help="Accepted with a note.")
@click.option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", default=False,
              help="Not supported: an error if set.")
@click.option("--memory", default=None, metavar="SIZE", help="cabs-stream's memory budget, e.g. 1GiB.")
def main(config, out_path, copy_tokenizer, out_shard_size, write_model_card, random_seed, quiet, verbose,
         unsafe_truncate_embeddings, device, num_threads, write_threads, transformers_cache, lora_merge_cache,
         lora_merge_dtype, memory, safe_serialization, **no_meaning) -> None:
    """Merge CONFIG (a mergekit YAML recipe) into OUT_PATH, as `mergekit-yaml CONFIG OUT_PATH` would.

    Runs on cabs-stream's streaming engine (bounded memory, exact resume); `cabs-stream merge`
    has the full set of options.
    """
    def note(text: str) -> None:
        click.echo(f"note: {text}; ignored", err=True)

    for key, on in no_meaning.items():
        if on:
            note(_NO_MEANING[key])
    if not safe_serialization:
        note(_NO_MEANING["safe_serialization"])
    if device not in (None, "cpu", "auto"):
        note(f"--device {device}: cabs-stream runs on the CPU")
    for flag, value in (("--write-threads", write_threads), ("--transformers-cache", transformers_cache)):
        if value is not None:
            note(f"{flag}: has no meaning here")
    if lora_merge_cache is not None:
        note("--lora-merge-cache: adapters are applied chunk by chunk during the merge, no merged copy is cached")
    if lora_merge_dtype is not None:
        note("--lora-merge-dtype: an adapter is merged in the dtype of the checkpoint it applies to, as PEFT does")
    with cli_errors():
        if unsafe_truncate_embeddings:
            raise ConfigError("--unsafe-truncate-embeddings is not supported: vocabularies must match the base's")
        if os.path.isdir(out_path) and not os.path.islink(out_path):
            from cabs_stream.io.output import foreign_entries  # loads the engine's I/O (and Numba): not at start-up

            foreign = foreign_entries(out_path)
            if foreign:
                raise OutputError(f"{out_path} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                                  "which a merge does not write: cabs-stream-yaml replaces an earlier merge's folder "
                                  "as a whole (when the new one is complete), so it refuses one holding anything "
                                  "else; choose a new folder or move those away")
        cfg = load_config(config)
        if random_seed is not None:
            if cfg.spec.param("random_seed") is None:
                note("--random-seed: this recipe's method has no randomness")
            else:
                cfg = load_config(config, params={"random_seed": random_seed})
        itemsize = 4 if cfg.dtype == "F32" else 2
        res = cabs_stream.merge(cfg, out_path, shard_size=parameters(out_shard_size) * itemsize, overwrite=True,
                                quiet=quiet, workers=num_threads, memory=memory, copy_tokenizer=copy_tokenizer,
                                model_card=write_model_card)
    if not quiet:
        print_summary(res.report, res.out_dir)


if __name__ == "__main__":
    main()
