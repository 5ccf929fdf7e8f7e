"""eaglespec: lossless speculative decoding with EAGLE draft heads."""

from eaglespec.draft import DraftHead
from eaglespec.drafter import Drafter, EagleDrafter, HybridDrafter, NoDrafter, PromptLookupDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, GenerationResult, GenerationStats, Generator
from eaglespec.target import Target, load_target
from eaglespec.verify import SamplingParams

__all__ = ["DraftHead", "Drafter", "EagleDrafter", "HybridDrafter", "NoDrafter", "PromptLookupDrafter", "TreeConfig", "GenerationConfig",
           "GenerationResult", "GenerationStats", "Generator", "Target", "load_target", "SamplingParams"]
__version__ = "0.1.0"
