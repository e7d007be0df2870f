"""The output folder: written under a temporary name, renamed into place only when complete.

Layout while running: ``<parent>/.<name>.cabs-partial/`` holding ``model/`` (the future
output: preallocated shards with their final headers) and ``state.zarr`` (see state.py).
On success ``model/`` is completed (index, config and tokenizer files, manifest, report),
flushed to disk and renamed to ``<name>``.
"""

from __future__ import annotations

import json
import os
import shutil

from .checkpoint import INDEX_NAME
from .errors import OutputError
from .plan import Plan

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def work_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.cabs-partial")


def check_output(out_dir: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) and an output inside an input folder."""
    out = os.path.realpath(out_dir)
    for p in inputs:
        root = os.path.realpath(p)
        if out == root or out.startswith(root.rstrip(os.sep) + os.sep):
            raise OutputError(f"output folder {out_dir} is inside input {p}; choose a folder outside the inputs")
    if os.path.exists(out_dir) and not overwrite:
        raise OutputError(f"output folder {out_dir} already exists; pass --overwrite to replace it")


def preallocate(plan: Plan, model_dir: str, resume: bool) -> list[str]:
    """Create every output shard at its final size with its header (kept when resuming)."""
    os.makedirs(model_dir, exist_ok=True)
    paths = []
    for shard in plan.shards:
        path = os.path.join(model_dir, shard.name)
        if not (resume and os.path.exists(path) and os.path.getsize(path) == shard.size):
            with open(path, "wb") as f:
                f.write(shard.header)
                try:  # reserve the space now: a full disk fails here, not mid-merge
                    os.posix_fallocate(f.fileno(), 0, shard.size)
                except OSError as e:
                    raise OutputError(f"cannot reserve {shard.size / 1e9:.2f} GB for {path}: {e.strerror}") from None
        paths.append(path)
    return paths


def _copy_file(src_dir: str, name: str, dst_dir: str) -> bool:
    src = os.path.join(src_dir, name)
    if src_dir and os.path.isfile(src):
        shutil.copyfile(src, os.path.join(dst_dir, name))
        return True
    return False


def finish(plan: Plan, model_dir: str, out_dir: str, extra_json: dict[str, object], overwrite: bool) -> None:
    """Write index, configs, tokenizer and JSON files, flush, and move the folder into place."""
    weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
    total = sum(s.size - len(s.header) for s in plan.shards)
    _write_json(os.path.join(model_dir, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})

    base_root = plan.base.root
    for name in CONFIG_FILES:
        _copy_file(base_root, name, model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    if plan.config.dtype and os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["torch_dtype"] = _TORCH_NAMES[plan.config.dtype]
        if "dtype" in cfg:
            cfg["dtype"] = cfg["torch_dtype"]
        _write_json(cfg_path, cfg)
    tok_root = os.path.abspath(plan.config.tokenizer_source) if plan.config.tokenizer_source else base_root
    for name in TOKENIZER_FILES:
        _copy_file(tok_root, name, model_dir)
    for name, obj in extra_json.items():
        _write_json(os.path.join(model_dir, name), obj)

    flush(model_dir)
    out_dir = os.path.abspath(out_dir)
    old = None
    if os.path.exists(out_dir):
        if not overwrite:
            raise OutputError(f"output folder {out_dir} appeared while merging; result left in {model_dir}")
        old = os.path.join(os.path.dirname(model_dir), "replaced")
        os.rename(out_dir, old)
    os.rename(model_dir, out_dir)
    shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)


def flush(model_dir: str) -> None:
    """fsync every file of the output folder (the shards are the bulk: done before the report)."""
    for name in os.listdir(model_dir):
        fd = os.open(os.path.join(model_dir, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
