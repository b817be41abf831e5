"""The project's one cache root: tiny models, the build's tables, finished batches and compiled kernels live under it."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MAGPIE_BUILDER_CACHE`, default `~/.cache/magpie_builder`."""
    return Path(os.environ.get("MAGPIE_BUILDER_CACHE", Path.home() / ".cache" / "magpie_builder"))
