"""The output folder: written under a temporary name, renamed into place only when complete
(``finish.py`` completes it: index, configs, tokenizer, reports).

Layout while running: ``<parent>/.<name>.cabs-partial/`` holding ``lock`` (held by the run
that writes there), ``model/`` (the future output: preallocated shards with their final
headers) and ``state.zarr`` (the resume record, ``io/workstate.py``). On success ``model/``
is completed (index, config and tokenizer files, manifest, report), flushed to disk and
renamed to ``<name>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import threading
import time
import warnings
from typing import Callable, Protocol, Sequence

from ..errors import OutputError
from . import hub, platform
from .adapter import spec_paths
from .checkpoint import INDEX_NAME
from .platform import NOFOLLOW

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model",
                   # transformers saves named chat templates other than the default one there
                   "additional_chat_templates/*.jinja")


def _user_key() -> bytes:
    """A random per-user secret (created once, readable by this user only) that names work
    folders, so another user can neither predict nor claim one."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(root, "cabs-stream")
    path = os.path.join(folder, "work-key")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not os.path.lexists(path):  # written aside, then linked: readers never see a partial key
            tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != getattr(os, "getuid", lambda: st.st_uid)() or st.st_mode & 0o077 or st.st_size != 32:
                raise OutputError(f"{path} must be a 32-byte file readable only by you; remove it (it is recreated)")
            return os.read(fd, 32)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot keep the work-folder key in {path}: {e.strerror}; set XDG_CACHE_HOME to a "
                          "folder of yours") from None


def work_dir(out_dir: str) -> str:
    """The run's private work folder beside the output: ``.<name>.cabs-partial-<tag>``, the tag
    an HMAC of the output path under this user's key (the same folder for a rerun, which
    resumes; unpredictable to anyone else)."""
    out_dir = os.path.abspath(out_dir)
    tag = hmac.new(_user_key(), out_dir.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:20]
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.cabs-partial-{tag}")


def private_dir(path: str) -> None:
    """Create ``path`` mode 0700 (and its missing parents, as ordinary folders), or accept it
    only if it is a real folder (not a symlink) owned by this user and closed to everyone else."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise OutputError(f"cannot create the work folder {path}: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"work folder {path} exists and is not a folder (a symlink?); it was not made by this "
                          "tool: remove it")
    if st.st_uid != getattr(os, "getuid", lambda: st.st_uid)() or st.st_mode & 0o077:
        raise OutputError(f"work folder {path} belongs to another user or is open to others "
                          f"(mode {stat.S_IMODE(st.st_mode):o}); it was not made by this tool: remove it")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output(out_dir: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an output that is, contains or is inside an input (through symlinks), one that
    exists (unless ``overwrite``) or is not a folder, and one whose parent cannot hold it.
    A model given as ``checkpoint+adapter`` is both paths."""
    if not out_dir or "\0" in str(out_dir):
        raise OutputError(f"invalid output folder {out_dir!r}")
    out_dir = os.path.abspath(out_dir)  # ".." taken lexically, as every later step takes it
    out = os.path.realpath(out_dir)
    for p in (q for spec in inputs for q in spec_paths(spec)):
        root = os.path.realpath(hub.local_path(p))
        if _inside(out, root):
            raise OutputError(f"output folder {out_dir} is inside input {p}; choose a folder outside the inputs")
        if _inside(root, out):
            raise OutputError(f"output folder {out_dir} contains input {p}; it would be replaced: choose a folder "
                              "that holds no input")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise OutputError(f"output {out_dir} exists and is not a folder; choose another name")
        if not overwrite:
            raise OutputError(f"output folder {out_dir} already exists; pass `overwrite=True` to replace it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    existing = parent
    while not os.path.lexists(existing):  # missing folders are created (as mergekit does)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"cannot create output folder {out_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output folder {out_dir}: {existing} is not writable")
    if len(os.path.basename(os.path.abspath(out_dir)).encode()) > 200:
        raise OutputError(f"output folder name {os.path.basename(out_dir)[:40]}... is too long (200 bytes at most)")


class WorkLock:
    """An exclusive ``flock`` on the work folder for the whole run. The kernel drops it when
    the process ends, so a killed run never blocks the rerun."""

    def __init__(self, work: str, out_dir: str) -> None:
        private_dir(work)
        path = os.path.join(work, "lock")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
        try:
            platform.lock_exclusive(self.fd)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode("utf-8", "replace").strip() or "another run"
            os.close(self.fd)
            raise OutputError(f"output folder {out_dir} is being written by {holder}; wait for that run to "
                              "finish or stop it, then rerun (it resumes)") from None
        os.ftruncate(self.fd, 0)
        platform.pwrite(self.fd, memoryview(f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})"
                                            .encode()), 0)

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
                    fd = self._fds[shard] = os.open(self.paths[shard], os.O_WRONLY | NOFOLLOW)
        return fd

    def write(self, shard: int, data: memoryview, offset: int, sync: bool = False) -> None:
        """Write all of ``data`` at ``offset`` of shard ``shard`` (and with ``sync`` wait until it
        is on disk)."""
        try:
            fd = self._fd(shard)
            start, size = offset, len(data)
            while data:
                n = platform.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
            if sync:
                platform.datasync(fd)
            else:  # start writing back now: the disk works while the merge goes on
                platform.fadvise(fd, "DONTNEED", start, size)
        except OSError as e:
            raise OutputError(f"cannot write {self.paths[shard]}: {e.strerror}") from None

    def read(self, shard: int, offset: int, size: int) -> bytes | None:
        """Bytes written earlier (None if the shard is missing or too short)."""
        try:
            with open(self.paths[shard], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError:
            return None
        return data if len(data) == size else None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        ShardFiles.__init__(self, state["paths"])


class ShardLayout(Protocol):
    """An output shard as the plan lays it out (``layout.OutShard`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def header(self) -> bytes: ...

    @property
    def size(self) -> int: ...


def preallocate(shards: Sequence[ShardLayout], model_dir: str, resume: bool, keep: tuple[str, ...] = ()) -> list[str]:
    """Create every output shard at its final size with its header. When resuming, shards of
    the right size are kept (their chunks are verified before reuse) and anything else in the
    folder but ``keep`` is removed; otherwise the folder starts empty."""
    if not resume:
        shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir, exist_ok=True)
    wanted = {s.name for s in shards} | set(keep)
    for name in os.listdir(model_dir):
        if name not in wanted:
            p = os.path.join(model_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    paths = []
    for shard in shards:
        path = os.path.join(model_dir, shard.name)
        if not (resume and os.path.exists(path) and os.path.getsize(path) == shard.size):
            with open(path, "wb") as f:
                f.write(shard.header)
                f.flush()
                try:  # reserve the space now: a full disk fails here, not mid-merge
                    platform.reserve(f.fileno(), shard.size)
                except OSError as e:
                    raise OutputError(f"cannot reserve {shard.size / 1e9:.2f} GB for {path}: {e.strerror}") from None
        paths.append(path)
    return paths


#: What a merged folder holds (by cabs-stream or mergekit): what replacing one may delete.
MERGED_FILES = (*CONFIG_FILES, *(n for n in TOKENIZER_FILES if "/" not in n), "additional_chat_templates",
                INDEX_NAME, "README.md", "cabs_manifest.json", "cabs_report.json", "cabs_masks.zarr",
                "mergekit_config.yml", "mergekit_tokenizer_config.json")
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$|^model\.safetensors$")


def foreign_entries(folder: str) -> list[str]:
    """The entries of ``folder`` that no merge writes (a user's notes, other folders): replacing
    the folder would delete them."""
    return sorted(n for n in os.listdir(folder) if n not in MERGED_FILES and not _SHARD.match(n))


def check_tokenizer_source(path: str) -> None:
    """A tokenizer source must be a folder holding at least one tokenizer file."""
    path = hub.local_path(path)
    if not os.path.isdir(path):
        raise OutputError(f"tokenizer_source {path} is not a folder")
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise OutputError(f"tokenizer_source {path} holds no tokenizer file (looked for {', '.join(TOKENIZER_FILES)})")


def _side_file_roots(model_dir: str) -> list[str]:
    """Where a model folder's side files may really live: the folder itself and, for a Hugging
    Face cache snapshot (``.../models--org--name/snapshots/<rev>``), that repository's cache,
    whose ``blobs/`` its links point into."""
    real = os.path.realpath(model_dir)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.dirname(os.path.dirname(real)))
    return roots


def copy_file(src_dir: str, name: str, dst_dir: str, root: str | None = None) -> bool:
    """Copy ``src_dir/name`` into ``dst_dir`` if it is a file whose real path stays inside the
    model folder ``root`` (default ``src_dir``; or its Hub cache's blobs): a link to a file
    elsewhere (a key, a credentials file) is not copied, with a note. The copy's mode is at most
    the source's. ``folder/*.ext`` copies the folder's files of that extension into
    ``dst_dir/folder``. True if anything was copied."""
    root = root or src_dir
    folder, _, pattern = name.rpartition("/")
    if pattern.startswith("*"):
        src = os.path.join(src_dir, folder)
        names = sorted(n for n in os.listdir(src) if n.endswith(pattern[1:])) if src_dir and os.path.isdir(src) else []
        copied = False
        for n in names:
            if os.path.isfile(os.path.join(src, n)):
                os.makedirs(os.path.join(dst_dir, folder), exist_ok=True)
                copied |= copy_file(src, n, os.path.join(dst_dir, folder), root)
        return copied
    src = os.path.join(src_dir, name)
    if not (src_dir and os.path.isfile(src)):
        return False
    if not any(_inside(os.path.realpath(src), r) for r in _side_file_roots(root)):
        warnings.warn(f"{src} links outside its model folder (to {os.path.realpath(src)}); not copied", stacklevel=2)
        return False
    dst = os.path.join(dst_dir, name)
    shutil.copyfile(src, dst)
    os.chmod(dst, stat.S_IMODE(os.stat(dst).st_mode) & stat.S_IMODE(os.stat(src).st_mode))
    return True


def move_into_place(model_dir: str, out_dir: str, overwrite: bool, before_rename: Callable[[], None] = lambda: None,
                    remove_work: bool = True) -> None:
    """Flush a complete folder and rename it to ``out_dir`` (replacing it with ``overwrite``);
    the work folder around it is removed (unless ``remove_work``: more is still to come)."""
    flush(model_dir)
    before_rename()
    out_dir = os.path.abspath(out_dir)
    old = None
    if os.path.exists(out_dir):
        if not overwrite:
            raise OutputError(f"output folder {out_dir} appeared while merging; result left in {model_dir}")
        old = os.path.join(os.path.dirname(model_dir), f"replaced-{os.path.basename(model_dir)}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(model_dir, out_dir)
    if remove_work:
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


def write_atomic(path: str, text: str) -> None:
    """Write a fixed-name file safely: into a new file of a random name beside it (created with
    O_EXCL and O_NOFOLLOW, mode 0644 under the umask), then renamed over ``path``. A symlink or
    another user's file planted at ``path`` is replaced, never written through, and a reader
    sees the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: object) -> None:
    """``obj`` as indented JSON at ``path``, written by ``write_atomic``."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def check_own_folder(path: str, what: str) -> None:
    """Refuse to read or reuse ``path`` unless it is a real folder (not a symlink) owned by this
    user and not writable by others: another user could have planted it, or what is in it."""
    st = os.lstat(path)
    uid = getattr(os, "getuid", lambda: st.st_uid)()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        raise OutputError(f"{what} {path} is not a folder of yours closed to others (a symlink, another user's, or "
                          f"writable by others: mode {stat.S_IMODE(st.st_mode):o}); it was not made by you: choose "
                          "another folder")
