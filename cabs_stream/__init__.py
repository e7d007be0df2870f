"""cabs-stream: out-of-core CABS model merging on CPUs."""

__version__ = "0.1.0"

from .config import MergeConfig, ModelSpec, build_config, load_config  # noqa: E402
from .errors import CabsError, CheckpointError, ConfigError, OutputError  # noqa: E402
from .pipeline import MergeResult, merge, merge_from_store, prune  # noqa: E402
from .sweep import sweep  # noqa: E402

__all__ = ["merge", "prune", "merge_from_store", "sweep", "MergeResult", "MergeConfig", "ModelSpec", "build_config", "load_config",
           "CabsError", "CheckpointError", "ConfigError", "OutputError", "__version__"]
