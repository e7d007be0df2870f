"""Progress of a merge: a tqdm bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import sys
import time

from dask.callbacks import Callback
from tqdm import tqdm


class MergeProgress(Callback):
    """Dask callback counting merged elements (and bytes read) as chunk tasks finish."""

    def __init__(self, sizes: dict[object, tuple[int, int]], total_bytes: int, quiet: bool = False,
                 interval: float = 10.0, stream=None) -> None:
        super().__init__()
        self.sizes = sizes  # task key -> (elements, input bytes)
        self.total_bytes = total_bytes
        self.quiet = quiet
        self.interval = interval
        self.stream = stream or sys.stderr
        self.done_bytes = 0
        self.bar: tqdm | None = None

    def _start(self, dsk) -> None:
        if self.quiet:
            return
        self.t0 = self.last = time.monotonic()
        if self.stream.isatty():
            self.bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="merging", file=self.stream, smoothing=0.1)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if self.quiet:
            return
        _, nbytes = self.sizes.get(key, (0, 0))
        self.done_bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        el = now - self.t0
        rate = self.done_bytes / el if el > 0 else 0.0
        frac = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        eta = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("nan")
        print(f"cabs-stream: {100 * frac:5.1f}% read {self.done_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, "
              f"{rate / 1e9:.2f} GB/s, ETA {eta:.0f} s", file=self.stream, flush=True)

    def _finish(self, dsk, state, errored) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet and not errored:
            self._log(time.monotonic())
