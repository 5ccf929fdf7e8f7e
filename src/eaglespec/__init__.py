"""eaglespec: lossless speculative decoding with EAGLE draft heads."""

from __future__ import annotations

import importlib

# The public names load their module on first use (PEP 562), so that `import eaglespec.cli`, and
# with it `eaglespec --help`, does not pay for torch and transformers.
_EXPORTS = {
    "default_tree": "eaglespec.backends",
    "draft_setup": "eaglespec.backends",
    "optimize_target": "eaglespec.backends",
    "DraftHead": "eaglespec.draft",
    "Drafter": "eaglespec.drafter",
    "Eagle3Head": "eaglespec.eagle3",
    "EngineConfig": "eaglespec.engine",
    "load_engine": "eaglespec.engine",
    "EagleDrafter": "eaglespec.drafter",
    "NoDrafter": "eaglespec.drafter",
    "TreeConfig": "eaglespec.drafter",
    "GenerationConfig": "eaglespec.generate",
    "GenerationResult": "eaglespec.generate",
    "GenerationStats": "eaglespec.generate",
    "Generator": "eaglespec.generate",
    "EagleHeadRunner": "eaglespec.head_runner",
    "HeadRunner": "eaglespec.head_runner",
    "Eagle3HeadRunner": "eaglespec.head_runner",
    "load_drafter": "eaglespec.heads",
    "load_head": "eaglespec.heads",
    "HybridDrafter": "eaglespec.lookup",
    "PromptLookupDrafter": "eaglespec.lookup",
    "WeighedLookupDrafter": "eaglespec.lookup",
    "Target": "eaglespec.target",
    "load_model": "eaglespec.target",
    "load_target": "eaglespec.target",
    "SamplingParams": "eaglespec.verify",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eaglespec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value
