"""The options of a run that never change the merged bytes (the engine) and those that
choose what the output folder holds besides the weights (the finish). Typed, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

#: The Dask schedulers a run can use (``run/schedule.py``).
SCHEDULERS = ("threads", "processes", "synchronous")


@dataclass(frozen=True)
class EngineOptions:
    """How a run streams: chunking, parallelism, memory budget, scheduler, shards, durability."""

    chunk_size: int | None = None  # elements per chunk (default: from ``memory``, else 4194304)
    workers: int | None = None  # chunks in parallel (default: twice the CPUs)
    memory: int | str | None = None  # budget such as "1GiB" (sets the chunk size)
    scheduler: str = "threads"
    shard_size: int | str = "5GB"
    save_masks: bool = False  # keep the bit-packed masks (cabs_masks.zarr)
    allow_nonfinite: bool = False  # merge task vectors holding NaN/Inf
    quiet: bool = True  # no progress bar
    durable: bool = False  # fdatasync every chunk before recording it done

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


@dataclass(frozen=True)
class FinishOptions:
    """What a merged folder holds besides the weights, config, manifest and report."""

    copy_tokenizer: bool = True
    model_card: bool = True
