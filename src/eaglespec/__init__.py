"""eaglespec: lossless speculative decoding with EAGLE draft heads."""

from eaglespec.backends import default_tree, draft_setup, optimize_target
from eaglespec.draft import DraftHead
from eaglespec.drafter import Drafter, EagleDrafter, NoDrafter, TreeConfig
from eaglespec.eagle3 import Eagle3Head
from eaglespec.generate import GenerationConfig, GenerationResult, GenerationStats, Generator
from eaglespec.head_runner import Eagle3HeadRunner, EagleHeadRunner, HeadRunner
from eaglespec.heads import load_drafter, load_head
from eaglespec.lookup import HybridDrafter, PromptLookupDrafter
from eaglespec.target import Target, load_model, load_target
from eaglespec.verify import SamplingParams

__all__ = ["DraftHead", "Drafter", "Eagle3Head", "Eagle3HeadRunner", "EagleDrafter", "EagleHeadRunner", "HeadRunner",
           "HybridDrafter", "NoDrafter", "load_drafter", "load_head",
           "PromptLookupDrafter", "TreeConfig", "GenerationConfig", "GenerationResult", "GenerationStats", "Generator",
           "Target", "load_model", "load_target", "SamplingParams", "default_tree", "draft_setup", "optimize_target"]
__version__ = "0.1.0"
