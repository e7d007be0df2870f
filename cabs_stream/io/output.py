"""The output folder: written under a temporary name, renamed into place only when complete.

Layout while running: ``<parent>/.<name>.cabs-partial/`` holding ``lock`` (held by the run
that writes there), ``model/`` (the future output: preallocated shards with their final
headers) and ``state.zarr`` (the resume record, ``run/workstate.py``). On success ``model/``
is completed (index, config and tokenizer files, manifest, report), flushed to disk and
renamed to ``<name>``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time

from ..errors import OutputError
from ..plan import Plan
from .checkpoint import INDEX_NAME

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


class WorkLock:
    """An exclusive ``flock`` on the work folder for the whole run. The kernel drops it when
    the process ends, so a killed run never blocks the rerun."""

    def __init__(self, work: str, out_dir: str) -> None:
        os.makedirs(work, exist_ok=True)
        path = os.path.join(work, "lock")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "another run"
            os.close(self.fd)
            raise OutputError(f"output folder {out_dir} is being written by {holder}; wait for that run to "
                              "finish or stop it, then rerun (it resumes)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_if_empty(work: str) -> None:
    """Remove a work folder that holds nothing resumable (only the lock of a run that failed early)."""
    try:
        if set(os.listdir(work)) <= {"lock"}:
            shutil.rmtree(work, ignore_errors=True)
    except FileNotFoundError:
        pass


class ShardFiles:
    """The output shards of a run, opened for positioned writes on first use (per process)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = os.open(self.paths[shard], os.O_WRONLY)
        return fd

    def write(self, shard: int, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` of shard ``shard``."""
        fd = self._fd(shard)
        try:
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as e:
            raise OutputError(f"cannot write {self.paths[shard]}: {e.strerror}") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"])


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
    """fsync every file and folder of the output (the shards are the bulk: done before the report)."""
    for root, dirs, files in os.walk(model_dir, topdown=False):
        for name in [*files, *dirs, ""]:
            fd = os.open(os.path.join(root, name) if name else root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
