"""Hugging Face ids as inputs, resolved from a local Hub cache built here (no network)."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from cabs_stream import CheckpointError, build_config, merge
from conftest import shard_bytes

pytest.importorskip("huggingface_hub")


def cache_model(cache, repo: str, folder: str, revision: str = "a" * 40) -> None:
    """Lay ``folder`` out as huggingface_hub's cache does: refs/main -> snapshots/<revision>/."""
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)


def test_hub_ids_resolve_from_the_local_cache_offline(family, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache_model(cache, "acme/base-7b", family["base"])
    cache_model(cache, "acme/math-ft", family["ft1"], revision="b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_id = merge(build_config(base="acme/base-7b", models=["acme/math-ft", family["ft2"]], n=3, m=8),
                  str(tmp_path / "by-id"))
    by_path = merge(build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8),
                    str(tmp_path / "by-path"))
    assert shard_bytes(by_id.out_dir) == shard_bytes(by_path.out_dir)
    assert os.path.exists(os.path.join(by_id.out_dir, "tokenizer.json"))  # from the cached base
    card = open(os.path.join(by_id.out_dir, "README.md")).read()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["acme/base-7b", "acme/math-ft"]  # the ids; the local ft2 is not a Hub model
    with pytest.raises(CheckpointError, match=r"acme/unknown.*not in the Hugging Face cache.*HF_HUB_OFFLINE.*"
                                              r"huggingface-cli download acme/unknown"):
        merge(build_config(base="acme/base-7b", models=["acme/unknown"], n=3, m=8), str(tmp_path / "x"))
    revision = merge(build_config(base="acme/base-7b", models=["acme/math-ft@" + "b" * 40], n=3, m=8),
                     str(tmp_path / "rev"))
    assert revision.report["kept"]
