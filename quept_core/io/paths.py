"""Where the cache lives: base-model float copies and calibrated artifacts, never in git."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `QUEPT_CACHE_DIR`, else `~/.cache/quept`."""
    root = os.environ.get("QUEPT_CACHE_DIR") or Path.home() / ".cache" / "quept"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
