"""Prompt lookup: drafting by copying what followed the latest earlier occurrence of the last
few tokens, alone or grafted into EAGLE's tree."""

from __future__ import annotations

import itertools
import operator

import torch

from eaglespec.cost import CostTarget, TreeSizer, probe_cost_curve
from eaglespec.drafter import Drafter
from eaglespec.tree import DraftTree, graft_chain, make_tree, root_only

#: a lookup token's chance to be right, given the chain before it was, before any is seen
CHAIN_PRIOR = 0.5
#: weight of the newest observation in those chances' moving averages
CHAIN_EMA = 0.1


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
        self.prompt_features = 0  # tokens alone
        self.history: list[int] = []
        self.matched = 0  # the n of the last guess's n-gram (0: nothing matched)
        #: latest[n - 1][gram]: the start of the latest occurrence of the n-gram that some token
        #: follows, kept as the history grows, so a guess costs a few lookups, not a scan
        self.latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]

    def begin(self) -> None:
        self.history = []
        self.latest = [{} for _ in range(self.max_ngram)]

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        h = self.history
        for t in tokens.tolist():  # host copy: once per step
            j = len(h)  # t follows the n-grams that end at j - 1
            for n in range(1, min(self.max_ngram, j) + 1):
                self.latest[n - 1][tuple(h[j - n:j])] = j - n
            h.append(t)

    def propose(self, root: torch.Tensor) -> DraftTree:
        return chain_tree(root, self.guess())

    def guess(self) -> list[int]:
        """The chain to propose after the committed history: what followed the latest earlier
        occurrence of its last n tokens, n as long as matches (empty when nothing does)."""
        h = self.history
        for n in range(min(self.max_ngram, len(h) - 1), 0, -1):
            start = self.latest[n - 1].get(tuple(h[-n:]))  # never the tail itself: nothing follows it yet
            if start is not None:
                self.matched = n
                return h[start + n : start + n + self.num_tokens]
        self.matched = 0
        return []


class ChainOdds:
    """What a lookup chain's tokens are worth: `odds[n][j]`, the chance that its j-th token is right
    given the ones before it were, for chains found by an n-token match (n = 1 .. max_ngram;
    odds[0] is unused). What follows a lone repeated token is a far weaker guess than what follows
    three. Each is a moving average (CHAIN_EMA) of the target's verdicts, from CHAIN_PRIOR."""

    def __init__(self, max_ngram: int, num_tokens: int) -> None:
        self.odds = [[CHAIN_PRIOR] * num_tokens for _ in range(max_ngram + 1)]

    def reach(self, matched: int, length: int) -> list[float]:
        """[length] the chance that a chain found by a `matched`-token match is right up to each token."""
        return list(itertools.accumulate(self.odds[matched][:length], operator.mul))

    def learn(self, guess: list[int], matched: int, tokens: list[int]) -> int:
        """Score a chain (`guess`, found by a `matched`-token match) against the target's tokens
        after the root (the accepted ones and the bonus), each position given that the ones
        before it were right. Returns how many of its first tokens the target chose."""
        odds = self.odds[matched]
        right = 0
        for j, (g, t) in enumerate(zip(guess, tokens)):
            odds[j] += CHAIN_EMA * ((g == t) - odds[j])
            if g != t:
                break
            right += 1
        return right


class WeighedLookupDrafter(Drafter):
    """The prompt-lookup chain alone, as many of its tokens as pay by the target's measured cost:
    what a model without a draft head drafts with. Each step verifies the chain's first m tokens,
    m (0 included: the root alone) of the most expected tokens per second by `sizer`'s cost curve
    and the chain's learnt chances (`ChainOdds`), as a drafter with a head does while the head
    rests (`TreeSizer.chain_alone`). Where the chain rarely holds or a verified row costs nearly a
    forward, it verifies the root alone: plain decoding."""

    prompt_features = 0  # tokens alone

    def __init__(self, lookup: PromptLookupDrafter, sizer: TreeSizer) -> None:
        self.lookup = lookup
        self.sizer = sizer
        self.max_tree_size = lookup.num_tokens + 1
        self.chain_odds = ChainOdds(lookup.max_ngram, lookup.num_tokens)
        self._guess: list[int] = []  # the last proposal's whole chain
        self.verified = 0  # chain tokens verified, over all steps (for reports)

    @classmethod
    def for_target(cls, target: CostTarget, num_tokens: int = 8) -> WeighedLookupDrafter:
        """A chain of up to `num_tokens`, weighed by `target`'s cost curve as measured on this
        machine (`probe_cost_curve`: once, then cached)."""
        return cls(PromptLookupDrafter(num_tokens=num_tokens), TreeSizer(probe_cost_curve(target), num_tokens))

    def begin(self) -> None:
        self.lookup.begin()
        self._guess = []

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        guess, self._guess = self._guess, []
        if guess:
            self.chain_odds.learn(guess, self.lookup.matched, tokens.tolist())  # host copy: once per step
        self.lookup.observe(tokens, features)

    def propose(self, root: torch.Tensor) -> DraftTree:
        chain = self._guess = self.lookup.guess()
        keep = self.sizer.chain_alone(self.chain_odds.reach(self.lookup.matched, len(chain))) if chain else 0
        self.verified += keep
        return chain_tree(root, chain[:keep])


def chain_tree(root: torch.Tensor, chain: list[int]) -> DraftTree:
    """The root ([1] long) with `chain` below it, one token under the other (no chain: the shared
    root-alone tree, as plain decoding verifies it)."""
    if not chain:
        return root_only(root)
    tokens = torch.tensor([int(root[0])] + chain, dtype=torch.long, device=root.device)
    parents = torch.arange(-1, len(chain), dtype=torch.long, device=root.device)
    return make_tree(tokens, parents, max_depth=len(chain))


class HybridDrafter(Drafter):
    """EAGLE's tree with a prompt-lookup chain grafted in: one verification checks both.

    Small models repeat themselves and copy from the prompt; where the last few tokens occurred
    before, the lookup chain is often longer than anything the head dares to guess, and where they
    did not, the tree is EAGLE's alone. The merged tree is verified like any other, so output stays
    the target's (greedy) or distributed as the target's (sampling).

    With a cost-sized EAGLE tree the chain is weighed too: its j-th token is right, given the ones
    before it were, with a chance learnt from the target's tokens (`odds[n]`, a moving average per
    position for chains found by an n-token match: what follows a lone repeated token is a far
    weaker guess than what follows three), and the sizer keeps as many of its new nodes as raise
    the expected tokens per second (`TreeSizer.extend`). After each step the sizer is told what
    the chain alone would have earned there (`TreeSizer.record_chain_alone`): the bar the head's
    drafts must beat.
    """

    def __init__(self, eagle: Drafter, lookup: PromptLookupDrafter) -> None:
        self.eagle = eagle
        self.lookup = lookup
        self.max_tree_size = eagle.max_tree_size + lookup.num_tokens
        self.feature_layers = eagle.feature_layers
        self.sizer = getattr(eagle, "sizer", None)
        self.chain_odds = ChainOdds(lookup.max_ngram, lookup.num_tokens)
        self._guess: list[int] = []  # the last proposal's whole chain (found by a lookup.matched-token match)
        self._alone = 0  # nodes of that chain an undrafted step would have verified (`TreeSizer.chain_alone`)

    @property
    def prompt_features(self) -> int | None:
        return self.eagle.prompt_features

    def begin(self) -> None:
        self.eagle.begin()
        self.lookup.begin()
        self._guess, self._alone = [], 0

    def end(self) -> None:
        self.eagle.end()
        self.lookup.end()

    def observe(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        right = self._learn(tokens)
        if self.sizer is not None:  # the bar for the head's drafts: the chain alone, on this same step
            self.sizer.record_chain_alone(self._alone, right)
        self.eagle.observe(tokens, features)
        self.lookup.observe(tokens, features)

    @property
    def odds(self) -> list[list[float]]:
        """odds[n][j]: P(the chain's j-th token is right | the tokens before it are), for chains
        found by an n-token match (`ChainOdds`)."""
        return self.chain_odds.odds

    def _learn(self, tokens: torch.Tensor) -> int:
        """Score the last chain against the target's tokens after the root (`tokens`: the accepted
        ones and the bonus); how many of its first tokens the target chose."""
        guess, self._guess = self._guess, []
        return self.chain_odds.learn(guess, self.lookup.matched, tokens.tolist())  # host copy: once per step

    def propose(self, root: torch.Tensor) -> DraftTree:
        tree = self.eagle.propose(root)
        chain = self._guess = self.lookup.guess()
        if self.sizer is None:
            return graft_chain(tree, chain)
        reach = self.chain_odds.reach(self.lookup.matched, len(chain))  # P(right up to j)
        self._alone = self.sizer.chain_alone(reach)
        return graft_chain(tree, chain, new_nodes=lambda matched: self.sizer.extend(reach[matched:]))
