"""Measure the I/O floor of a merge: read every input byte, then write output-sized bytes.

usage: python benchmarks/io_floor.py --write-bytes 2200000000 --out-dir /work/bench-data/out FILE...

Plain sequential file I/O through the page cache with one reused 16 MiB buffer: each input
file is read start to end (one after the other), then a scratch file of ``--write-bytes`` is
written in 16 MiB writes, fsynced (a merge fsyncs its output too) and deleted. Drop the caches
before running it for a cold measurement (run_bench.py does, and runs it under the same memory
cap as the merge). Prints one JSON line: read/write seconds and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BUF = 16 << 20


def read_all(paths: list[str]) -> int:
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def write_bytes(path: str, nbytes: int) -> int:
    block = os.urandom(BUF)  # incompressible, though ext4 does not compress anyway
    done = 0
    with open(path, "wb", buffering=0) as f:
        while done < nbytes:
            done += f.write(block[: min(BUF, nbytes - done)])
        os.fsync(f.fileno())
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="files to read")
    p.add_argument("--write-bytes", type=int, required=True)
    p.add_argument("--out-dir", required=True, help="folder on the output's file system")
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    scratch = os.path.join(a.out_dir, f".io-floor-{os.getpid()}.bin")
    t0 = time.monotonic()
    nread = read_all(a.inputs)
    t1 = time.monotonic()
    try:
        nwritten = write_bytes(scratch, a.write_bytes)
        t2 = time.monotonic()
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    print(json.dumps({"read_bytes": nread, "read_s": t1 - t0, "write_bytes": nwritten, "write_s": t2 - t1,
                      "total_s": t2 - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
