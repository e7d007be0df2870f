"""Completing an output folder, in one place: the merged model (index, configs, tokenizer,
manifest, report, model card) or a task-vector store, flushed and renamed into place.

``before_rename`` drops the run's work state once the folder is complete, so nothing of the
run can be resumed against the finished output.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from ._version import __version__
from .io import hub
from .io.checkpoint import INDEX_NAME
from .io.output import CONFIG_FILES, TOKENIZER_FILES, copy_file, move_into_place, write_atomic, write_json
from .io.workstate import MASKS_NAME
from .options import FinishOptions
from .plan import Plan
from .report import model_card as card

_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def manifest(plan: Plan, *, save_masks: bool, from_store: str | None) -> dict[str, Any]:
    """``cabs_manifest.json``: the recipe as run, the output dtypes and shards."""
    return {"tool": "cabs-stream", "version": __version__, **plan.config.describe(),
            "output_dtypes": sorted({t.out_dtype for t in plan.tensors}),
            "shards": [s.name for s in plan.shards], **({"masks": MASKS_NAME} if save_masks else {}),
            **({"from_store": from_store} if from_store else {})}


def finish_model(plan: Plan, model_dir: str, out_dir: str, report: dict[str, Any], manifest: dict[str, Any],
                 options: FinishOptions, overwrite: bool, before_rename: Callable[[], None]) -> None:
    """Write the index, configs, tokenizer, model card, manifest and report into ``model_dir``,
    flush it and move it to ``out_dir``."""
    weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
    total = sum(s.size - len(s.header) for s in plan.shards)
    write_json(os.path.join(model_dir, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _configs(plan, model_dir)
    if options.copy_tokenizer:
        _tokenizer(plan, model_dir)
    if options.model_card:
        write_atomic(os.path.join(model_dir, "README.md"), card.model_card(plan.config, report,
                                                                             os.path.basename(out_dir)))
    write_json(os.path.join(model_dir, "cabs_manifest.json"), manifest)
    write_json(os.path.join(model_dir, "cabs_report.json"), report)
    move_into_place(model_dir, out_dir, overwrite, before_rename)


def finish_store(store_dir: str, out_dir: str, overwrite: bool, *, before_rename: Callable[[], None] = lambda: None,
                 remove_work: bool = True) -> None:
    """Flush a complete task-vector store and move it to ``out_dir``."""
    move_into_place(store_dir, out_dir, overwrite, before_rename, remove_work=remove_work)


def _configs(plan: Plan, model_dir: str) -> None:
    """The base's config files; config.json with the output dtype and vocabulary size."""
    for name in CONFIG_FILES:
        copy_file(plan.base.root, name, model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    if (plan.config.dtype or plan.vocab) and os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if plan.config.dtype:
            cfg["torch_dtype"] = _TORCH_NAMES[plan.config.dtype]
            if "dtype" in cfg:
                cfg["dtype"] = cfg["torch_dtype"]
        if plan.vocab:  # the output's vocabulary (tokenizer_source union or a model)
            cfg["vocab_size"] = plan.vocab.size
        write_json(cfg_path, cfg)


def _tokenizer(plan: Plan, model_dir: str) -> None:
    """The union tokenizer (as mergekit writes it), or the tokenizer source's files."""
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        plan.vocab.tokenizer.save_pretrained(model_dir)
        return
    tok = plan.config.tokenizer_source
    tok_root = os.path.abspath(hub.local_path(tok)) if tok and tok != "union" else plan.base.root
    for name in TOKENIZER_FILES:
        copy_file(tok_root, name, model_dir)
