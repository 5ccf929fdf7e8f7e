"""Draft heads shipped with the package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_HEAD = Path(__file__).parent / "smollm2-135m-instruct"


def default_head_path() -> Path | None:
    """The head trained for the default target (SmolLM2-135M-Instruct), if this install ships one."""
    return DEFAULT_HEAD if (DEFAULT_HEAD / "config.json").is_file() else None
