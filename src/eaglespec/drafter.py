"""Drafters: whatever proposes a token tree for the target to verify.

One narrow interface (as transformers' candidate generators): `begin` a sequence, `observe` what
the target committed, `propose` a tree. The decode loop knows nothing else about a drafter, so
plain decoding (`NoDrafter`, a tree of just the root), EAGLE with static or dynamic trees,
prompt lookup (lookup.py) and any future drafter share one loop, and the benchmark gets its
baseline for free.

`EagleDrafter` composes three parts: a head runner (head_runner.py: the draft model, its cache and
LM-head rows), a static plan (tree.py) or the dynamic expansion (expand.py), and the bookkeeping
of what the target committed since the last proposal.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from eaglespec.backends import cheap_host_sync
from eaglespec.cost import MAX_REST, SizerMemory, TreeSizer, probe_cost_curve
from eaglespec.expand import dynamic_slots, expand_dynamic, expand_static
from eaglespec.head_runner import HeadRunner, head_runner
from eaglespec.tree import STATIC_PRESETS, DraftTree, root_only, static_plan, walk_chain

#: the prompt positions a head reads while its drafts have been paying less than plain decoding
#: (its first draft after a rest then sees the prompt's end)
RESTING_PROMPT_FEATURES = 32
#: the most prompt positions a head of the last hidden state reads where each costs the target a
#: row of LM head (`TargetModel.prompt_hidden_costs_logits`, llama.cpp): on the default model and
#: Q4_1 file, a 750-token prompt took 5.01 s instead of 5.89, for a tau of 1.750 instead of 1.774
#: on Spec-Bench's long prompts (docs/benchmarks.md); elsewhere a head reads them all
PROMPT_WINDOW = 256

if TYPE_CHECKING:
    from eaglespec.backends import DraftSetup
    from eaglespec.draft import DraftHead
    from eaglespec.eagle3 import Eagle3Head
    from eaglespec.backends.base import TargetModel


class Drafter(ABC):
    """Proposes draft trees. Protocol per sequence: begin, then observe/propose alternately."""

    #: the largest tree `propose` returns (root included), for sizing caches
    max_tree_size: int = 1
    #: the target features `observe` expects: the inputs of these decoder layers side by side
    #: (`Target.set_feature_layers`), or None: the last hidden state, or no features at all
    feature_layers: tuple[int, ...] | None = None
    #: how many of a prompt's last positions `observe` needs features of (None: all, 0: none);
    #: a target may then spare the others' work
    prompt_features: int | None = None

    def begin(self) -> None:
        """Forget the previous sequence."""

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """The target committed k positions: tokens[i] ([k]) is the token that follows the i-th,
        tokens[-1] the next root. features ([m, F], m <= k) are the target's features at the
        last m of them: all k after a verification, the last `prompt_features` after a prompt."""

    @abstractmethod
    def propose(self, root: torch.Tensor) -> DraftTree:
        """A tree whose node 0 holds `root` ([1] long), the last committed token."""

    def end(self) -> None:
        """The sequence ended (its last token, a stop, or a caller that stopped reading): a drafter
        may keep what it learnt beyond this process."""


class NoDrafter(Drafter):
    """Plain autoregressive decoding: the tree is the root alone (its shape built once per device)."""

    max_tree_size = 1
    prompt_features = 0

    def propose(self, root: torch.Tensor) -> DraftTree:
        return root_only(root)


@dataclass(frozen=True)
class TreeConfig:
    """The shape of the draft tree.

    Defaults are a fixed 16-node tree, chosen early on a 2-core AMX CPU (README,
    `eaglespec bench --trees`) and kept for GPUs; `eaglespec.backends.default_tree` gives the shape for
    where a target runs (on CPUs: sized each step by the measured cost of a node, eaglespec/cost.py).
    """

    kind: Literal["static", "dynamic"] = "dynamic"  # EAGLE-1 static tree or EAGLE-2 dynamic tree
    top_k: int = 4  # dynamic: children drafted per expanded node, and frontier width
    depth: int = 5  # dynamic: deepest guessed token
    total_tokens: int = 16  # dynamic: nodes verified per step, root included (with sizing "cost": at most)
    # dynamic: verify only guesses whose cumulative draft probability is at least this (the best
    # guess is always kept), so unsure steps verify fewer nodes; 0 keeps total_tokens every step
    min_prob: float = 0.0
    # dynamic: "fixed" verifies total_tokens nodes every step; "cost" as many as pay best by the
    # target's cost curve measured on this machine (eaglespec.cost.TreeSizer)
    sizing: Literal["fixed", "cost"] = "fixed"
    static_tree: str = "cpu_small"  # static: a preset name from eaglespec.tree.STATIC_PRESETS
    static_paths: tuple[tuple[int, ...], ...] | None = field(default=None)  # static: explicit rank paths

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dynamic"):
            raise ValueError(f"tree kind must be 'static' or 'dynamic', got {self.kind!r}")
        if self.top_k < 1 or self.depth < 1 or self.total_tokens < 2:
            raise ValueError(
                f"tree needs top_k >= 1, depth >= 1, total_tokens >= 2; got {self.top_k}, {self.depth}, {self.total_tokens}"
            )
        if self.sizing not in ("fixed", "cost"):
            raise ValueError(f"tree sizing must be 'fixed' or 'cost', got {self.sizing!r}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        if self.kind == "static" and self.static_paths is None and self.static_tree not in STATIC_PRESETS:
            raise ValueError(f"unknown static tree {self.static_tree!r}; presets: {sorted(STATIC_PRESETS)}")

    def paths(self) -> tuple[tuple[int, ...], ...]:
        return self.static_paths if self.static_paths is not None else STATIC_PRESETS[self.static_tree]


class EagleDrafter(Drafter):
    """Drafts with a head runner over the target's features, as a static or dynamic tree."""

    def __init__(self, runner: HeadRunner, tree: TreeConfig = TreeConfig(), stop_early: bool | None = None,
                 sizer: TreeSizer | None = None, prompt_window: int | None = None) -> None:
        """stop_early (dynamic trees): stop drafting deeper once deeper nodes cannot make the tree
        (the same tree, fewer head runs), for a host sync per depth; None: where a sync is cheap
        (`backends.cheap_host_sync`: on a CPU). sizer: the node budget of each step of a dynamic
        tree (needed for `tree.sizing == "cost"`; `from_head` builds it from the target's cost
        curve), at most `tree.total_tokens - 1` nodes. prompt_window: the most prompt positions
        the head reads (None: all; `from_head` sets `PROMPT_WINDOW` where they cost the target)."""
        if prompt_window is not None and prompt_window < 1:
            raise ValueError(f"prompt_window must be >= 1 or None, got {prompt_window}")
        if tree.kind == "dynamic" and tree.sizing == "cost" and sizer is None:
            raise ValueError("a cost-sized tree needs a TreeSizer (EagleDrafter.from_head measures the target)")
        self.runner = runner
        self.tree_config = tree
        self.sizer = sizer if tree.kind == "dynamic" else None
        self.feature_layers = runner.feature_layers
        self.prompt_window = prompt_window
        device = runner.vocab_ids.device
        self.plan = static_plan(tree.paths()).to(device) if tree.kind == "static" else None
        self.max_tree_size = self.plan.size if self.plan is not None else tree.total_tokens
        runner.allocate(self.plan.slots if self.plan is not None else dynamic_slots(tree))
        self.stop_early = cheap_host_sync(device) if stop_early is None else stop_early
        self.early_stops = 0  # how many proposals stopped early
        self.pending_tokens: list[torch.Tensor] = []
        self.pending_features: list[torch.Tensor] = []
        self._fresh = True  # no proposal yet in this sequence: the pending tokens are the prompt
        self._proposed_at: float | None = None  # when the last proposal was handed to the target
        self._sized_tree: DraftTree | None = None  # the last drafted tree, while its verdict is due
        self.memory: SizerMemory | None = None  # where the sizer's state outlives the process (`remember`)

    @classmethod
    def from_head(cls, head: DraftHead | Eagle3Head, target: TargetModel, tree: TreeConfig = TreeConfig(),
                  setup: DraftSetup | None = None) -> EagleDrafter:
        """The drafter of an EAGLE-1/2 or EAGLE-3 head. setup: the head's dtype and weight layout
        (`backends.draft_setup` picks for the hardware; None: float32, weights as loaded). The
        target must return the features the head reads: `target.set_feature_layers(drafter.feature_layers)`
        (`eaglespec.heads.load_drafter` does it all from a head folder)."""
        runner = head_runner(head, target, setup)
        costly = runner.feature_layers is None and getattr(target, "prompt_hidden_costs_logits", False)
        return cls(runner, tree, sizer=tree_sizer(target, tree), prompt_window=PROMPT_WINDOW if costly else None)

    def remember(self, memory: SizerMemory) -> bool:
        """Keep the sizer's learnt state in `memory` after each sequence, and start from the state
        kept there, if any. Returns whether one was resumed (False too without a sizer)."""
        if self.sizer is None:
            return False
        self.memory = memory
        return memory.load(self.sizer)

    def end(self) -> None:
        if self.memory is not None and self.sizer is not None:
            self.memory.save(self.sizer)

    def begin(self) -> None:
        self._proposed_at = None
        self._sized_tree = None
        self.runner.reset()
        self.pending_tokens.clear()
        self.pending_features.clear()
        self._fresh = True
        if self.sizer is not None:
            self.sizer.begin()

    @property
    def prompt_features(self) -> int | None:
        """The last `prompt_window` of a prompt's features (None: all), or while the sizer has been
        resting the last few, and none while a rest longer than MAX_REST lies ahead (the sizer rests
        that long only where its probes lose much; a probe that far into the answer sees the
        answer's own tokens): a llama.cpp target spares the LM head of the others (docs/design.md,
        "llama.cpp backend")."""
        if self.sizer is not None and self.sizer.resting:
            if self.sizer.rest_left > MAX_REST:
                return 0
            return RESTING_PROMPT_FEATURES if self.prompt_window is None else min(RESTING_PROMPT_FEATURES, self.prompt_window)
        return self.prompt_window

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.pending_tokens.append(tokens[tokens.shape[0] - features.shape[0]:])  # those with features
        self.pending_features.append(features)
        if self.sizer is not None:
            if self._proposed_at is not None:  # the target's verification of the last proposal, as measured
                self.sizer.record_step(time.perf_counter() - self._proposed_at)
                self._proposed_at = None
            tree, self._sized_tree = self._sized_tree, None
            tree_accepted = None
            if tree is not None:  # the nodes of the head's own tree on the accepted path
                _, tree_accepted = walk_chain(tree.tokens.tolist(), tree.parents.tolist(), tokens[:-1].tolist())
            self.sizer.record_accepted(tokens.shape[0] - 1, tree_accepted)  # the last token is the bonus

    @torch.inference_mode()
    def propose(self, root: torch.Tensor) -> DraftTree:
        if self.sizer is None:
            return self._propose(root)
        if not self.sizer.should_draft():  # speculation pays less than plain decoding here, for now
            self._proposed_at = time.perf_counter()
            return root_only(root)  # the pending features wait for the next draft's commit
        start = time.perf_counter()
        self._catch_up()
        self.sizer.record_catch_up(time.perf_counter() - start)
        start = time.perf_counter()
        tree = self._propose(root)
        self._sized_tree = tree  # before anything is hung below it (lookup.py), for `observe`
        self._proposed_at = time.perf_counter()
        self.sizer.record_draft(self._proposed_at - start)
        return tree

    def _catch_up(self) -> None:
        """Run the head over the pending tokens a drafting step does not commit in steady state:
        all but the last verification's (the tokens of rested steps), or, first in a sequence,
        all of the prompt but its last token. The step's timed draft then covers what drafting
        every step costs. Counted in, a commit of 32 rested tokens made drafting look slower
        than it is, so the sizer rested more, and so on."""
        keep = 1 if self._fresh else self.pending_tokens[-1].shape[0]
        self._fresh = False
        tokens, features = self._pending()
        if tokens.shape[0] > keep:
            self.runner.commit(tokens[:-keep], features[:-keep])
            tokens, features = tokens[-keep:], features[-keep:]
        self.pending_tokens[:], self.pending_features[:] = [tokens], [features]

    def _pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending tokens [k] and features [k, F] as one tensor each (no copy when they are one)."""
        if len(self.pending_tokens) == 1:
            return self.pending_tokens[0], self.pending_features[0]
        return torch.cat(self.pending_tokens), torch.cat(self.pending_features)

    def _propose(self, root: torch.Tensor) -> DraftTree:
        tokens, features = self._pending()
        self.pending_tokens.clear()
        self.pending_features.clear()
        h_root = self.runner.commit(tokens, features)  # [D] the head's output after the root
        r = self.runner
        if self.plan is not None:
            return expand_static(self.plan, root, h_root, r.step, r.logprobs, r.vocab_ids)
        tree, stopped = expand_dynamic(self.tree_config, root, h_root, r.step, r.logprobs, r.vocab_ids,
                                       stop_early=self.stop_early, sizer=self.sizer)
        self.early_stops += stopped
        return tree


def tree_sizer(target: TargetModel, tree: TreeConfig) -> TreeSizer | None:
    """The node budget of a cost-sized dynamic tree on `target`: its cost curve measured on this
    machine (cached), up to `tree.total_tokens - 1` nodes; None for other trees. On a CPU the sizer
    also times each step (`TreeSizer.timed`); on a GPU a step's wall time ends before its kernels do."""
    if tree.kind != "dynamic" or tree.sizing != "cost":
        return None
    timed = torch.device(getattr(target, "device", "cpu")).type == "cpu"
    return TreeSizer(probe_cost_curve(target), tree.total_tokens - 1, timed=timed)
