"""What a backend's choices look like, whatever the hardware."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

#: how a draft model's linear weights are stored: as loaded, pre-packed for the CPU's matmul
#: library, or int8 (weight-only)
DraftWeights = Literal["plain", "packed", "int8"]


@dataclass(frozen=True)
class DraftSetup:
    """How a draft head runs: what it computes in and how its linear weights are stored."""

    dtype: torch.dtype
    weights: DraftWeights = "plain"

    def __post_init__(self) -> None:
        if self.weights not in ("plain", "packed", "int8"):
            raise ValueError(f"draft weights must be 'plain', 'packed' or 'int8', got {self.weights!r}")


@dataclass(frozen=True)
class TargetOptimization:
    """What `optimize_target` did to a target."""

    packed_linears: int = 0  # linear slots swapped for pre-packed ones (0: the stock products run)
    #: whether the stock products give a row the same bits in any block of rows as alone (what
    #: lossless trees need); None where not checked (packed, or not a CPU)
    row_invariant: bool | None = None
