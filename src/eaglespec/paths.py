"""Where eaglespec keeps what it derives once and reuses: converted targets, probe results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$EAGLESPEC_CACHE, else ~/.cache/eaglespec."""
    env = os.environ.get("EAGLESPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eaglespec"
