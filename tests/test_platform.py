"""Every platform fallback, run on Linux by switching the fast path off: same bytes out."""

from __future__ import annotations

import pytest

from cabs_stream import build_config, merge
from cabs_stream.io import platform
from conftest import shard_bytes


@pytest.fixture
def reference(family, tmp_path, small_shards):
    out = str(tmp_path / "ref")
    merge(build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8), out, chunk_size=64,
          shard_size="3KB")
    return out


@pytest.mark.parametrize("fast", ["fallocate", "pwrite", "madvise", "fdatasync", "flock", "all"])
def test_fallbacks_give_the_same_model(family, tmp_path, reference, monkeypatch, fast):
    for key in (platform.FAST if fast == "all" else [fast]):
        monkeypatch.setitem(platform.FAST, key, False)
    out = str(tmp_path / "out")
    merge(build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8), out, chunk_size=64,
          shard_size="3KB", durable=True)
    assert shard_bytes(out) == shard_bytes(reference)


def test_lock_fallback_refuses_a_live_holder_and_takes_a_dead_ones(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    monkeypatch.setitem(platform.FAST, "flock", False)
    path = tmp_path / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    os.write(fd, f"process {holder.pid} (started now)".encode())
    os.lseek(fd, 0, os.SEEK_SET)
    with pytest.raises(BlockingIOError):
        platform.lock_exclusive(fd)
    holder.kill()
    holder.wait()
    os.lseek(fd, 0, os.SEEK_SET)
    platform.lock_exclusive(fd)  # the holder is gone
    os.close(fd)


def test_peak_rss_units(monkeypatch):
    linux = platform.peak_rss_bytes()
    monkeypatch.setattr(platform.sys, "platform", "darwin")
    assert platform.peak_rss_bytes() * 1024 == linux  # macOS reports bytes, Linux kilobytes
