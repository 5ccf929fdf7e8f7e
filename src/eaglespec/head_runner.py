"""Head runners: a draft model as a tree drafter runs it, behind four calls.

A runner owns a draft model, its KV cache and the LM-head rows of its draft vocabulary. The
drafter (drafter.py) and the tree expansions (expand.py) see only this interface:

    commit(tokens [k], features [k, F]) -> h_last [D]   the target committed k (feature, next token)
                                                         pairs; the head's output after the last one
    step(feats [q, D], tokens [q], depth, rows [q, S])  q tree nodes at one depth, each fed its
                                       -> hidden [q, D]  parent's output; rows: the tree slots each sees
    logprobs(hidden [q, D]) -> [q, K]                   draft log-probabilities over the draft vocabulary
    vocab_ids [K]                                       the target token id of each draft id

F is whatever the target's forward exposes (`Target.set_feature_layers`), D the head's own output
width, S the tree slots reserved with `allocate`. Two kinds of head run here:

    EagleHeadRunner   EAGLE-1/2: F = D = H, the target's last hidden state; the tree steps feed the
                      head's predicted feature; logits from the target's LM head rows
    Eagle3HeadRunner  EAGLE-3: F = 3H, the inputs of three target layers (`feature_layers`); the
                      tree steps feed the head's own pre-norm output; logits from its own norm and
                      LM head over its draft vocabulary

Both pair feature i with token i+1 at position i, and put a node at depth d at the position of
the last committed pair plus d. The drafter does not know which kind it drives.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from eaglespec.backends import DraftSetup, convert_draft
from eaglespec.draft import DraftHead, DraftHeadError, check_fits
from eaglespec.eagle3 import Eagle3Head
from eaglespec.eagle3 import check_fits as check_eagle3_fits
from eaglespec.layers import fuse_projections

if TYPE_CHECKING:
    from eaglespec.backends.base import TargetModel


class HeadRunner(ABC):
    """A draft model with its KV cache: committed pairs, then one tree's nodes, then rolled back."""

    #: [K] long: the target token id of each draft-vocabulary id
    vocab_ids: torch.Tensor
    #: the target layers whose inputs `commit` reads, side by side (`Target.set_feature_layers`);
    #: None: the target's last hidden state
    feature_layers: tuple[int, ...] | None = None

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


class CachedHeadRunner(HeadRunner):
    """What both EAGLE runners share: a head module called as head(hidden [1, q, D], embeds [1, q, H],
    positions [1, q], visible [1, 1, q, kv], cache) that writes its keys into a `DraftKVCache`, the
    target's frozen embedding, and the tree steps. Subclasses set `head`, `setup`, `vocab_ids`,
    `target_embed`, `max_len` and `cache`, and define commit and logprobs."""

    head: nn.Module
    setup: DraftSetup
    feature_width: int  # F: the width of the target features `commit` reads

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

    def step(self, feats: torch.Tensor, tokens: torch.Tensor, depth: int, rows: torch.Tensor) -> torch.Tensor:
        positions, visible = step_layout(self.cache.length, self.cache.tree_len, depth, rows)
        return self.head(feats[None], self.embed(tokens)[None], positions[None], visible[None, None], self.cache)[0]


class EagleHeadRunner(CachedHeadRunner):
    """An EAGLE-1/2 head (draft.py) over the target's last hidden state, with the target's frozen
    embedding and its LM head restricted to the head's draft vocabulary."""

    def __init__(self, head: DraftHead, target: TargetModel, setup: DraftSetup | None = None) -> None:
        """setup: what the head computes in and how its linears are stored (`backends.draft_setup`
        chooses for the hardware; None: float32, as loaded); neither changes what is accepted, only
        what is proposed. The caller's head is left as it is: the runner converts a copy."""
        check_fits(head, target.hidden_size, target.vocab_size)
        setup = setup or DraftSetup(torch.float32)
        device, dtype = target.device, setup.dtype
        self.setup = setup
        self.feature_width = head.hidden_size
        own = head  # used as it is when nothing needs changing
        if setup.weights != "plain" or head.fc.weight.device != device or head.fc.weight.dtype != dtype:
            own = copy.deepcopy(head).to(device=device, dtype=dtype).eval().requires_grad_(False)
            fuse_projections(own)
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

    def commit(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        check_width(features, self.feature_width, self.feature_layers)
        self.cache.drop_tree()
        positions, visible = commit_layout(self.cache.length, tokens.shape[0], tokens.device)
        h = self.head(features.to(self.dtype)[None], self.embed(tokens)[None], positions[None], visible[None, None],
                      self.cache, commit=True)
        return h[0, -1]

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm(hidden).float().log_softmax(dim=-1).clamp_(max=0.0)


class Eagle3HeadRunner(CachedHeadRunner):
    """An EAGLE-3 head (eagle3.py): the fused features of its three target layers at commit, its
    own pre-norm outputs at tree steps, its own norm and LM head over its draft vocabulary, and the
    target's frozen embedding. The target must return those layers' inputs as its features:
    `target.set_feature_layers(runner.feature_layers)`."""

    def __init__(self, head: Eagle3Head, target: TargetModel, setup: DraftSetup | None = None) -> None:
        """setup: as for `EagleHeadRunner` (int8 or packing also covers the head's fc and lm_head).
        The caller's head is left as it is: the runner converts a copy."""
        check_eagle3_fits(head, target.hidden_size, target.vocab_size, target.num_layers)
        setup = setup or DraftSetup(torch.float32)
        device, dtype = target.device, setup.dtype
        self.setup = setup
        self.feature_layers = head.aux_layer_ids
        self.feature_width = 3 * head.target_hidden_size
        own = head  # used as it is when nothing needs changing
        if setup.weights != "plain" or head.fc.weight.device != device or head.fc.weight.dtype != dtype:
            own = copy.deepcopy(head).to(device=device, dtype=dtype).eval().requires_grad_(False)
            fuse_projections(own)
            # fc and the decoder layer go through the backend as one module, lm_head as the LM head
            body, own.lm_head = convert_draft(nn.ModuleDict({"fc": own.fc, "midlayer": own.midlayer}), own.lm_head,
                                              setup)
            own.fc, own.midlayer = body["fc"], body["midlayer"]
        self.head = own
        self.vocab_ids = head.draft_token_ids().to(device)  # [K]
        self.target_embed = target.embed
        self.max_len = target.max_len
        self.cache = own.new_cache(0, device, dtype)

    def commit(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        check_width(features, self.feature_width, self.feature_layers)
        self.cache.drop_tree()
        positions, visible = commit_layout(self.cache.length, tokens.shape[0], tokens.device)
        hidden = self.head.fc(features.to(self.dtype))  # [k, 3Ht] -> [k, H]
        h = self.head(hidden[None], self.embed(tokens)[None], positions[None], visible[None, None], self.cache,
                      commit=True)
        return h[0, -1]  # pre-norm: the next step's hidden input

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.lm_head(self.head.norm(hidden)).float().log_softmax(dim=-1).clamp_(max=0.0)


def head_runner(head: DraftHead | Eagle3Head, target: TargetModel, setup: DraftSetup | None = None) -> HeadRunner:
    """The runner of a head of either kind. An EAGLE-3 runner needs the target to return its
    `feature_layers` (`target.set_feature_layers`)."""
    if isinstance(head, Eagle3Head):
        return Eagle3HeadRunner(head, target, setup)
    return EagleHeadRunner(head, target, setup)


def commit_layout(past: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [k] and visibility [k, past + k] of k committed pairs after `past` in the cache:
    all of the context, causal among themselves. past 2, k 2 -> positions [2, 3], visible
    [[1, 1, 1, 0], [1, 1, 1, 1]]."""
    positions = torch.arange(past, past + k, device=device)
    visible = torch.cat([torch.ones(k, past, dtype=torch.bool, device=device),
                         torch.ones(k, k, dtype=torch.bool, device=device).tril_()], dim=1)
    return positions, visible


def step_layout(ctx: int, held: int, depth: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [q] and visibility [q, ctx + held + q] of q tree nodes at `depth` after `ctx`
    committed pairs and `held` earlier nodes: the context, and the tree slots `rows` marks. A node
    at depth d pairs its parent's output with its token, at the parent's position ctx + d - 1."""
    q = rows.shape[0]
    positions = torch.full((q,), ctx + depth - 1, dtype=torch.long, device=rows.device)
    visible = torch.cat([torch.ones(q, ctx, dtype=torch.bool, device=rows.device), rows[:, : held + q]], dim=1)
    return positions, visible


def check_width(features: torch.Tensor, width: int, layers: tuple[int, ...] | None) -> None:
    """Refuse features of another width than the head reads, saying what the target should return
    (a shape, read without a host sync)."""
    if features.shape[-1] != width:
        wanted = "its last hidden state" if layers is None else f"the inputs of layers {list(layers)}"
        ids = None if layers is None else list(layers)
        raise DraftHeadError(f"the head reads features of width {width} but got {features.shape[-1]}: the target "
                             f"must return {wanted} (target.set_feature_layers({ids}))")
