"""Drafters: whatever proposes a token tree for the target to verify.

One narrow interface (as transformers' candidate generators): `begin` a sequence, `observe` what
the target committed, `propose` a tree. The decode loop knows nothing else about a drafter, so
plain decoding (`NoDrafter`, a tree of just the root), EAGLE with static or dynamic trees, and
any future drafter share one loop, and the benchmark gets its baseline for free.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from eaglespec.backends import convert_draft, draft_setup
from eaglespec.draft import DraftHead, check_fits
from eaglespec.target import Target
from eaglespec.tree import STATIC_PRESETS, DraftTree, graft_chain, make_tree, root_only, select_dynamic, static_shape


class Drafter(ABC):
    """Proposes draft trees. Protocol per sequence: begin, then observe/propose alternately."""

    #: the largest tree `propose` returns (root included), for sizing caches
    max_tree_size: int = 1

    def begin(self) -> None:
        """Forget the previous sequence."""

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """The target committed: features[i] ([k, H]) is the top feature at a committed position
        and tokens[i] ([k]) the token that follows it. tokens[-1] is the next root."""

    @abstractmethod
    def propose(self, root: torch.Tensor) -> DraftTree:
        """A tree whose node 0 holds `root` ([1] long), the last committed token."""


class NoDrafter(Drafter):
    """Plain autoregressive decoding: the tree is the root alone (its shape built once)."""

    max_tree_size = 1

    def __init__(self) -> None:
        self._shape: DraftTree | None = None

    def propose(self, root: torch.Tensor) -> DraftTree:
        shape = self._shape
        if shape is None or shape.tokens.device != root.device:
            shape = self._shape = root_only(root)
        return DraftTree(tokens=root.reshape(1), parents=shape.parents, depths=shape.depths, mask=shape.mask,
                         retrieve=shape.retrieve)


@dataclass(frozen=True)
class TreeConfig:
    """The shape of the draft tree.

    Defaults are a fixed 16-node tree, chosen early on a 2-core AMX CPU (README,
    `scripts/tree_sweep.py`) and kept for GPUs; `eaglespec.backends.default_tree` gives the shape for
    where a target runs (CPUs get a confidence floor).
    """

    kind: Literal["static", "dynamic"] = "dynamic"  # EAGLE-1 static tree or EAGLE-2 dynamic tree
    top_k: int = 4  # dynamic: children drafted per expanded node, and frontier width
    depth: int = 5  # dynamic: deepest guessed token
    total_tokens: int = 16  # dynamic: nodes verified per step, root included
    # dynamic: verify only guesses whose cumulative draft probability is at least this (the best
    # guess is always kept), so unsure steps verify fewer nodes; 0 keeps total_tokens every step
    min_prob: float = 0.0
    static_tree: str = "cpu_small"  # static: a preset name from eaglespec.tree.STATIC_PRESETS
    static_paths: tuple[tuple[int, ...], ...] | None = field(default=None)  # static: explicit rank paths

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dynamic"):
            raise ValueError(f"tree kind must be 'static' or 'dynamic', got {self.kind!r}")
        if self.top_k < 1 or self.depth < 1 or self.total_tokens < 2:
            raise ValueError(
                f"tree needs top_k >= 1, depth >= 1, total_tokens >= 2; got {self.top_k}, {self.depth}, {self.total_tokens}"
            )
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        if self.kind == "static" and self.static_paths is None and self.static_tree not in STATIC_PRESETS:
            raise ValueError(f"unknown static tree {self.static_tree!r}; presets: {sorted(STATIC_PRESETS)}")

    def paths(self) -> tuple[tuple[int, ...], ...]:
        return self.static_paths if self.static_paths is not None else STATIC_PRESETS[self.static_tree]


class EagleDrafter(Drafter):
    """Drafts with an EAGLE head over the target's features, as a static or dynamic tree."""

    def __init__(self, head: DraftHead, target: Target, tree: TreeConfig = TreeConfig(),
                 dtype: torch.dtype | None = None, weights: Literal["auto", "int8", "full"] = "auto") -> None:
        """dtype: what the head computes in. None: bf16 for bf16 targets on CPU where its linears
        can be pre-packed (a stock bf16 matmul of a few rows is slower than fp32 there), float32
        otherwise. weights: "int8" stores the head's linears and its LM head rows as int8
        (eaglespec/quant.py; on a CPU a draft step is bound by reading them); "full" keeps them in
        `dtype`, pre-packed on CPU; "auto" is int8 where the int8 kernel pays (bf16 drafts on
        AVX-512 CPUs), full elsewhere. Neither choice changes what is accepted, only what is proposed."""
        check_fits(head, target.hidden_size, target.vocab_size)
        device = target.device
        setup = draft_setup(device, target.dtype, weights, dtype)
        self.dtype = dtype = setup.dtype
        self.int8 = setup.weights == "int8"
        if setup.weights != "plain":
            head = copy.deepcopy(head)  # changed below: the caller's head stays a plain module
        self.head = head.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.target_embed = target.embed
        self.tree_config = tree
        self.vocab_ids = head.draft_token_ids().to(device)  # [K] target id of each draft id
        weight = target.lm_head.weight
        # [K, H] the LM head restricted to the draft vocabulary, in the head's dtype
        lm_weight = (weight[self.vocab_ids] if head.reduced_vocab else weight).to(dtype)
        lm = nn.Linear(lm_weight.shape[1], lm_weight.shape[0], bias=False, device=device, dtype=dtype)
        lm.weight = nn.Parameter(lm_weight, requires_grad=False)
        self.head, self.lm = convert_draft(self.head, lm, setup)
        if tree.kind == "static":
            self._init_static(tree, device)
        else:
            self.max_tree_size = tree.total_tokens
            self.slots = tree.top_k * max(tree.depth - 1, 0)
        # dynamic trees: stop drafting deeper once deeper nodes cannot make the tree (same tree,
        # fewer head runs). It costs a host sync per depth, which is free on a CPU only.
        self.stop_early = device.type == "cpu"
        self.early_stops = 0  # how many proposals stopped early
        #: when a list, each dynamic proposal appends its candidates before selection as (scores
        #: [C] cumulative log-probabilities, parents [C], tokens [C]), in creation order
        #: (scripts/tree_calibration.py reads them); None records nothing
        self.candidate_log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.cache = self.head.new_cache(target.max_len + self.slots, device, dtype)
        self.pending_tokens: list[torch.Tensor] = []
        self.pending_features: list[torch.Tensor] = []

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The target's (frozen) embedding, in the head's dtype: [q] -> [q, H]."""
        return self.target_embed(tokens).to(self.dtype)

    # -- static-tree bookkeeping, computed once ---------------------------------------------

    def _init_static(self, tree: TreeConfig, device: torch.device) -> None:
        shape = static_shape(tree.paths())
        self.shape = shape
        self.max_tree_size = shape.size
        parents = shape.parents.tolist()
        depths = shape.depths.tolist()
        has_child = {p for p in parents if p >= 0}
        # nodes the draft head runs at each depth d >= 1 (those with children), in slot order
        expand = [[i for i in range(shape.size) if depths[i] == d and i in has_child] for d in range(shape.max_depth)]
        slot = {node: s for s, node in enumerate(n for level in expand[1:] for n in level)}
        self.slots = len(slot)
        template = make_tree(torch.zeros(shape.size, dtype=torch.long), shape.parents, shape.max_depth)
        anc = template.mask.tolist()
        self.static_template = DraftTree(
            tokens=template.tokens.to(device), parents=template.parents.to(device), depths=template.depths.to(device),
            mask=template.mask.to(device), retrieve=template.retrieve.to(device),
        )
        self.static_levels = []  # per depth d >= 1: what one draft step needs
        for d in range(1, shape.max_depth + 1):
            children = shape.levels[d - 1]
            if d == 1:
                row_of_parent = torch.zeros(len(children), dtype=torch.long)
                run = torch.zeros(0, dtype=torch.long)
                rows = torch.zeros(0, self.slots, dtype=torch.bool)
                feat_rows = torch.zeros(0, dtype=torch.long)
            else:
                run_nodes = expand[d - 1]
                run = torch.tensor(run_nodes, dtype=torch.long)
                rows = torch.zeros(len(run_nodes), self.slots, dtype=torch.bool)
                for r, node in enumerate(run_nodes):
                    for a in range(1, shape.size):
                        if anc[node][a]:
                            rows[r, slot[a]] = True
                prev = expand[d - 2] if d >= 3 else []
                # the feature each run node consumes: its parent's draft output (the root's at d == 2)
                feat_rows = torch.tensor([prev.index(parents[n]) if d >= 3 else 0 for n in run_nodes], dtype=torch.long)
                row_of_parent = torch.tensor([run_nodes.index(parents[c]) for c in children.tolist()], dtype=torch.long)
            self.static_levels.append(
                dict(children=children.to(device), ranks=shape.ranks[children].to(device), k=shape.topk[d - 1],
                     run=run.to(device), rows=rows.to(device), feat_rows=feat_rows.to(device),
                     row_of_parent=row_of_parent.to(device))
            )

    # -- the Drafter protocol ----------------------------------------------------------------

    def begin(self) -> None:
        self.cache.reset()
        self.pending_tokens.clear()
        self.pending_features.clear()

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.pending_tokens.append(tokens)
        self.pending_features.append(features)

    @torch.inference_mode()
    def propose(self, root: torch.Tensor) -> DraftTree:
        h_root = self._commit_pending()  # [H] predicted feature after the root
        try:
            if self.tree_config.kind == "static":
                return self._propose_static(root, h_root)
            return self._propose_dynamic(root, h_root)
        finally:
            self.cache.drop_tree()

    # -- drafting steps ------------------------------------------------------------------------

    def _commit_pending(self) -> torch.Tensor:
        """Run the head over the newly committed (feature, next token) pairs; return the last output."""
        tokens = torch.cat(self.pending_tokens)  # [k]
        features = torch.cat(self.pending_features)  # [k, H]
        self.pending_tokens.clear()
        self.pending_features.clear()
        past, k = self.cache.length, tokens.shape[0]
        device = tokens.device
        positions = torch.arange(past, past + k, device=device)
        visible = torch.cat(
            [torch.ones(k, past, dtype=torch.bool, device=device),
             torch.ones(k, k, dtype=torch.bool, device=device).tril_()], dim=1)
        h = self.head(features.to(self.dtype)[None], self.embed(tokens)[None], positions[None], visible[None, None],
                      self.cache, commit=True)
        return h[0, -1]

    def _tree_step(self, feats: torch.Tensor, tokens: torch.Tensor, depth: int, rows: torch.Tensor) -> torch.Tensor:
        """Run q tree nodes at one depth: feats [q, H] (their parents' outputs), tokens [q],
        rows [q, slots] bool: the tree slots each node sees (its ancestors and itself)."""
        q = tokens.shape[0]
        ctx, held = self.cache.length, self.cache.tree_len
        positions = torch.full((1, q), ctx + depth - 1, dtype=torch.long, device=tokens.device)
        visible = torch.cat([torch.ones(q, ctx, dtype=torch.bool, device=tokens.device), rows[:, : held + q]], dim=1)
        return self.head(feats[None], self.embed(tokens)[None], positions, visible[None, None], self.cache)[0]

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, H] -> [q, K] draft log-probabilities, clamped to <= 0 so scores never grow down a path."""
        return self.lm(hidden).float().log_softmax(dim=-1).clamp_(max=0.0)

    def _propose_static(self, root: torch.Tensor, h_root: torch.Tensor) -> DraftTree:
        tokens = torch.empty(self.max_tree_size, dtype=torch.long, device=root.device)
        tokens[0] = root[0]
        hidden = h_root[None]  # [1, H] outputs of the previous depth's run nodes
        for d, level in enumerate(self.static_levels, start=1):
            if d > 1:
                feats = hidden[level["feat_rows"]]
                hidden = self._tree_step(feats, tokens[level["run"]], d - 1, level["rows"])
            top = self._logprobs(hidden).topk(level["k"], dim=-1).indices  # [runs, k]
            tokens[level["children"]] = self.vocab_ids[top[level["row_of_parent"], level["ranks"]]]
        t = self.static_template
        return DraftTree(tokens=tokens, parents=t.parents, depths=t.depths, mask=t.mask, retrieve=t.retrieve)

    def _propose_dynamic(self, root: torch.Tensor, h_root: torch.Tensor) -> DraftTree:
        cfg = self.tree_config
        k, device = cfg.top_k, root.device
        top = self._logprobs(h_root[None])[0].topk(k)
        all_tokens = [self.vocab_ids[top.indices]]  # per step: candidate tokens
        all_scores = [top.values]  # cumulative log-probabilities
        all_parents = [torch.full((k,), -1, dtype=torch.long, device=device)]  # -1 = the root
        front = torch.arange(k, device=device)  # candidate indices of the nodes to expand next
        front_tokens, front_scores = all_tokens[0], top.values
        front_feats = h_root.expand(k, -1)
        front_rows = torch.zeros(k, self.slots, dtype=torch.bool, device=device)
        n_cand = k
        arange_k = torch.arange(k, device=device)
        keep_n = cfg.total_tokens - 1
        # the floor as a float32 value, as the scores are: the early stop and the selection then agree exactly
        floor = float(torch.tensor(math.log(cfg.min_prob), dtype=torch.float32)) if cfg.min_prob > 0 else None
        for d in range(1, cfg.depth):
            if self.stop_early and self._deeper_is_hopeless(all_scores, front_scores, keep_n, n_cand, floor):
                self.early_stops += 1
                break
            rows = front_rows.clone()
            rows[arange_k, self.cache.tree_len + arange_k] = True
            hidden = self._tree_step(front_feats, front_tokens, d, rows)  # [k, H]
            child = self._logprobs(hidden).topk(k, dim=-1)  # [k, k]
            scores = (front_scores[:, None] + child.values).flatten()  # [k*k]
            all_tokens.append(self.vocab_ids[child.indices].flatten())
            all_scores.append(scores)
            all_parents.append(front.repeat_interleave(k))
            if d + 1 < cfg.depth:  # the next frontier: the best k of these k*k children
                best = scores.topk(k).indices
                front = n_cand + best
                front_tokens, front_scores = all_tokens[-1][best], scores[best]
                front_feats, front_rows = hidden[best // k], rows[best // k]
            n_cand += k * k
        scores, parents, tokens = torch.cat(all_scores), torch.cat(all_parents), torch.cat(all_tokens)
        if self.candidate_log is not None:
            self.candidate_log.append((scores, parents, tokens))
        tree, _ = select_dynamic(scores, parents, tokens, cfg.total_tokens, cfg.depth, min_score=floor)
        tree.tokens[0] = root[0]
        return tree

    @staticmethod
    def _deeper_is_hopeless(all_scores: list[torch.Tensor], front_scores: torch.Tensor, keep_n: int, n_cand: int,
                            floor: float | None = None) -> bool:
        """True when no descendant of the frontier can enter the kept set, so drafting deeper would
        not change the tree: a child scores at most its parent (log-probabilities <= 0), so none
        passes a `floor` that the frontier's best misses; and, tied, a child ranks after every
        earlier candidate, so `keep_n` candidates already scoring at least the frontier's best keep
        it out. One host sync."""
        best = float(front_scores.max())
        if floor is not None and best < floor:
            return True
        return n_cand >= keep_n and int(sum(int((s >= best).sum()) for s in all_scores)) >= keep_n


class PromptLookupDrafter(Drafter):
    """Prompt lookup decoding: propose, as a chain, the tokens that followed the latest earlier
    occurrence of the last n committed tokens (n from `max_ngram` down to 1). No model needed;
    it shines when the answer copies from the prompt (code edits, summaries, RAG)."""

    def __init__(self, max_ngram: int = 3, num_tokens: int = 8) -> None:
        if max_ngram < 1 or num_tokens < 1:
            raise ValueError("max_ngram and num_tokens must be >= 1")
        self.max_ngram = max_ngram
        self.num_tokens = num_tokens
        self.max_tree_size = num_tokens + 1
        self.history: list[int] = []

    def begin(self) -> None:
        self.history = []

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.history.extend(tokens.tolist())  # host copy: once per step

    def propose(self, root: torch.Tensor) -> DraftTree:
        guess = self.guess()
        tokens = torch.tensor([int(root[0])] + guess, dtype=torch.long, device=root.device)
        parents = torch.arange(-1, len(guess), dtype=torch.long, device=root.device)  # a chain
        return make_tree(tokens, parents, max_depth=len(guess))

    def guess(self) -> list[int]:
        """The chain to propose after the committed history (empty when nothing matches)."""
        h = self.history
        for n in range(min(self.max_ngram, len(h) - 1), 0, -1):
            tail = h[-n:]
            for start in range(len(h) - n - 1, -1, -1):  # latest earlier match first
                if h[start : start + n] == tail:
                    return h[start + n : start + n + self.num_tokens]
        return []


class HybridDrafter(Drafter):
    """EAGLE's tree with a prompt-lookup chain grafted in: one verification checks both.

    Small models repeat themselves and copy from the prompt; where the last few tokens occurred
    before, the lookup chain is often longer than anything the head dares to guess, and where they
    did not, the tree is EAGLE's alone. The merged tree is verified like any other, so output stays
    the target's (greedy) or distributed as the target's (sampling).
    """

    def __init__(self, eagle: EagleDrafter, lookup: PromptLookupDrafter) -> None:
        self.eagle = eagle
        self.lookup = lookup
        self.max_tree_size = eagle.max_tree_size + lookup.num_tokens

    def begin(self) -> None:
        self.eagle.begin()
        self.lookup.begin()

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.eagle.observe(tokens, features)
        self.lookup.observe(tokens, features)

    def propose(self, root: torch.Tensor) -> DraftTree:
        return graft_chain(self.eagle.propose(root), self.lookup.guess())
