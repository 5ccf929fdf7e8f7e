"""What a backend's choices look like, whatever the hardware, and what a target backend implements
(`TargetModel`: `eaglespec.target.Target` for PyTorch, `eaglespec.backends.llamacpp.LlamaCppTarget`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: how a draft model's linear weights are stored: as loaded, pre-packed for the CPU's matmul
#: library, int8, or fp16 (fp32 arithmetic)
DraftWeights = Literal["plain", "packed", "int8", "fp16"]


@dataclass(frozen=True)
class DraftSetup:
    """How a draft head runs: what it computes in and how its linear weights are stored."""

    dtype: torch.dtype
    weights: DraftWeights = "plain"

    def __post_init__(self) -> None:
        if self.weights not in ("plain", "packed", "int8", "fp16"):
            raise ValueError(f"draft weights must be 'plain', 'packed', 'int8' or 'fp16', got {self.weights!r}")
        if self.weights == "fp16" and self.dtype != torch.float32:
            raise ValueError(f"fp16 draft weights compute in float32, not {self.dtype}")


@dataclass(frozen=True)
class TargetOptimization:
    """What `optimize_target` did to a target."""

    packed_linears: int = 0  # linear slots swapped for pre-packed ones (0: the stock products run)
    #: whether the stock products give a row the same bits in any block of rows as alone (what
    #: lossless trees need); None where not checked (packed, or not a CPU)
    row_invariant: bool | None = None


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [q, vocab] float32 ([1, vocab] with last_logits_only)
    #: [q, F] in the model's dtype: the LM head's input (F = hidden), or with feature layers set
    #: (`Target.set_feature_layers`) the inputs of those layers side by side (F = len(ids) x hidden)
    features: torch.Tensor

    def last_features(self, rows: int | None) -> TargetOutput:
        """The same output with the features of the last `rows` positions alone (None: all)."""
        if rows is None or rows >= self.features.shape[0]:
            return self
        return TargetOutput(self.logits, self.features[self.features.shape[0] - max(rows, 0):])


class TargetCache(Protocol):
    """What the decode loop uses of a target's cache."""

    #: committed tokens
    length: int

    def compact(self, nodes: torch.Tensor) -> None:
        """Commit the accepted nodes ([a] indices into the last forward's tree, root first, in
        path order) after the prefix; the rest of that tree is dropped."""


class TargetModel(Protocol):
    """What the decode loop, the drafters and the server use of a target: `Target` (a transformers
    model run by torch) and `eaglespec.backends.llamacpp.LlamaCppTarget` (a GGUF run by llama.cpp)."""

    tokenizer: PreTrainedTokenizerBase | None
    max_len: int
    cache: TargetCache
    #: whether each prompt position whose last hidden state `prefill` returns costs a row of LM
    #: head (llama.cpp computes logits wherever it returns a hidden state); False: they come free
    #: with the forward (a transformers model), and drafters read them all
    prompt_hidden_costs_logits: bool

    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def embed(self) -> torch.nn.Module: ...
    @property
    def lm_head(self) -> torch.nn.Module: ...
    @property
    def feature_layers(self) -> tuple[int, ...] | None: ...

    def set_feature_layers(self, layer_ids: Sequence[int] | None) -> None: ...
    def reset(self) -> None: ...
    def prefill(self, tokens: torch.Tensor, feature_rows: int | None = None) -> TargetOutput: ...
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, last_logits_only: bool = False) -> TargetOutput: ...
