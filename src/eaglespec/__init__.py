"""eaglespec: lossless speculative decoding with EAGLE draft heads."""

from eaglespec.backends import default_tree, draft_setup, optimize_target
from eaglespec.draft import DraftHead
from eaglespec.drafter import Drafter, EagleDrafter, NoDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, GenerationResult, GenerationStats, Generator
from eaglespec.head_runner import EagleHeadRunner, HeadRunner
from eaglespec.lookup import HybridDrafter, PromptLookupDrafter
from eaglespec.target import Target, load_model, load_target
from eaglespec.verify import SamplingParams

__all__ = ["DraftHead", "Drafter", "EagleDrafter", "EagleHeadRunner", "HeadRunner", "HybridDrafter", "NoDrafter",
           "PromptLookupDrafter", "TreeConfig", "GenerationConfig", "GenerationResult", "GenerationStats", "Generator",
           "Target", "load_model", "load_target", "SamplingParams", "default_tree", "draft_setup", "optimize_target"]
__version__ = "0.1.0"
