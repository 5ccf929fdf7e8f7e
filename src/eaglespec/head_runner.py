"""Head runners: a draft model as a tree drafter runs it, behind four calls.

A runner owns a draft model, its KV cache and the LM-head rows of its draft vocabulary. The
drafter (drafter.py) and the tree expansions (expand.py) see only this interface:

    commit(tokens [k], features [k, F]) -> h_last [D]   the target committed k (feature, next token)
                                                         pairs; the head's output after the last one
    step(feats [q, D], tokens [q], depth, rows [q, S])  q tree nodes at one depth, each fed its
                                       -> hidden [q, D]  parent's output; rows: the tree slots each sees
    logprobs(hidden [q, D]) -> [q, K]                   draft log-probabilities over the draft vocabulary
    vocab_ids [K]                                       the target token id of each draft id

F is whatever the target's forward exposes (its last hidden state for EAGLE-1/2), D the head's
own output width, S the tree slots reserved with `allocate`. A head of another kind (EAGLE-3: fused
features of three target layers at commit, its own hidden output at tree steps, its own norm and
LM head over a reduced vocabulary) is another `HeadRunner` subclass; the drafter does not change.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from eaglespec.backends import DraftSetup, convert_draft
from eaglespec.draft import DraftHead, check_fits

if TYPE_CHECKING:
    from eaglespec.target import Target


class HeadRunner(ABC):
    """A draft model with its KV cache: committed pairs, then one tree's nodes, then rolled back."""

    #: [K] long: the target token id of each draft-vocabulary id
    vocab_ids: torch.Tensor

    @abstractmethod
    def allocate(self, tree_slots: int) -> None:
        """Make room for a whole sequence plus `tree_slots` tree nodes (before the first `reset`)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the sequence."""

    @abstractmethod
    def commit(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Drop the previous tree's nodes, run the head over the newly committed pairs (features[i]
        precedes tokens[i]) and keep them as context; return the output after the last one ([D])."""

    @abstractmethod
    def step(self, feats: torch.Tensor, tokens: torch.Tensor, depth: int, rows: torch.Tensor) -> torch.Tensor:
        """Run q tree nodes at tree depth `depth` (1 = the root's children): feats [q, D] their
        parents' outputs, tokens [q], rows [q, S] bool the tree slots each node sees (its ancestors
        and itself, in the order nodes were stepped). The nodes stay held until the next commit."""

    @abstractmethod
    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, D] -> [q, K] draft log-probabilities, clamped to <= 0 (a path's score never grows)."""


class EagleHeadRunner(HeadRunner):
    """An EAGLE-1/2 head (draft.py) over the target's last hidden state, with the target's frozen
    embedding and its LM head restricted to the head's draft vocabulary."""

    def __init__(self, head: DraftHead, target: Target, setup: DraftSetup | None = None) -> None:
        """setup: what the head computes in and how its linears are stored (`backends.draft_setup`
        chooses for the hardware; None: float32, as loaded); neither changes what is accepted, only
        what is proposed. The caller's head is left as it is: the runner converts a copy."""
        check_fits(head, target.hidden_size, target.vocab_size)
        setup = setup or DraftSetup(torch.float32)
        device, dtype = target.device, setup.dtype
        self.setup = setup
        own = head  # used as it is when nothing needs changing
        if setup.weights != "plain" or head.fc.weight.device != device or head.fc.weight.dtype != dtype:
            own = copy.deepcopy(head).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.vocab_ids = head.draft_token_ids().to(device)  # [K]
        weight = target.lm_head.weight
        # [K, H] the LM head restricted to the draft vocabulary, in the head's dtype
        rows = (weight[self.vocab_ids] if head.reduced_vocab else weight).to(dtype)
        lm = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device="meta")  # no throwaway init
        lm.weight = nn.Parameter(rows, requires_grad=False)
        self.head, self.lm = convert_draft(own, lm, setup)
        self.target_embed = target.embed
        self.max_len = target.max_len
        self.cache = self.head.new_cache(0, device, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.setup.dtype

    def allocate(self, tree_slots: int) -> None:
        self.cache = self.head.new_cache(self.max_len + tree_slots, self.vocab_ids.device, self.dtype)

    def reset(self) -> None:
        self.cache.reset()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The target's (frozen) embedding, in the head's dtype: [q] -> [q, H]."""
        return self.target_embed(tokens).to(self.dtype)

    def commit(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self.cache.drop_tree()
        past, k = self.cache.length, tokens.shape[0]
        device = tokens.device
        positions = torch.arange(past, past + k, device=device)
        visible = torch.cat(
            [torch.ones(k, past, dtype=torch.bool, device=device),
             torch.ones(k, k, dtype=torch.bool, device=device).tril_()], dim=1)
        h = self.head(features.to(self.dtype)[None], self.embed(tokens)[None], positions[None], visible[None, None],
                      self.cache, commit=True)
        return h[0, -1]

    def step(self, feats: torch.Tensor, tokens: torch.Tensor, depth: int, rows: torch.Tensor) -> torch.Tensor:
        q = tokens.shape[0]
        ctx, held = self.cache.length, self.cache.tree_len
        # a node at depth d pairs its parent's output with its token, at the parent's position
        positions = torch.full((1, q), ctx + depth - 1, dtype=torch.long, device=tokens.device)
        visible = torch.cat([torch.ones(q, ctx, dtype=torch.bool, device=tokens.device), rows[:, : held + q]], dim=1)
        return self.head(feats[None], self.embed(tokens)[None], positions, visible[None, None], self.cache)[0]

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm(hidden).float().log_softmax(dim=-1).clamp_(max=0.0)
