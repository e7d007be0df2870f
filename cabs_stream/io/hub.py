"""Hugging Face model ids as inputs: ``org/name`` or ``org/name@revision`` -> a local folder.

A path that exists is used as it is. Otherwise a name shaped like a Hub id is resolved through
``huggingface_hub``: from the local cache when it is there (this works offline), else, unless
``HF_HUB_OFFLINE`` is set, by downloading only what a merge reads (safetensors shards and
index, config, generation config, tokenizer and chat-template files), with hub's progress bars.
"""

from __future__ import annotations

import os
import re

from ..errors import CheckpointError

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
            "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
            "chat_template.json", "additional_chat_templates/*.jinja", "spiece.model", "adapter_config.json"]


_REVISION = re.compile(r"^[\w.-]+(/[\w.-]+)*$")


def check_revision(spec: str) -> None:
    """Refuse a revision that is not shaped like a git ref, branch or commit (``/``-rooted
    paths and ``.``/``..`` segments would make the cache read a file outside it)."""
    _, at, revision = spec.partition("@")
    if at and (not _REVISION.fullmatch(revision) or any(p in (".", "..") for p in revision.split("/"))):
        raise CheckpointError(f"revision {revision!r} is not a branch, tag or commit name (no leading '/', no "
                              "'.' or '..' parts)", model=spec)


def is_hub_id(spec: str) -> bool:
    """Shaped like ``org/name`` or ``org/name@revision`` and not an existing path."""
    return isinstance(spec, str) and not os.path.exists(spec) and bool(_ID.match(spec))


def local_path(spec: str) -> str:
    """The local folder of ``spec`` (a path, or a Hub id resolved as the module says)."""
    if not is_hub_id(spec):
        return spec
    check_revision(spec)
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError("is neither a local path nor resolvable: Hugging Face ids need huggingface_hub "
                              "(pip install huggingface_hub)", model=spec) from None
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=PATTERNS, cache_dir=cache,
                                 local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a malformed cache or id
        raise CheckpointError(f"cannot resolve this Hugging Face id from the local cache ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})", model=spec) from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError("is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                              f"fetch it first (huggingface-cli download {repo}) or give a local path", model=spec)
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=PATTERNS, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo
        raise CheckpointError(f"cannot download this Hugging Face model ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); check the name, your network and HF_TOKEN, or "
                              "give a local path", model=spec) from None
