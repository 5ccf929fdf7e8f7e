"""Growing a draft tree with a draft model: EAGLE-1's static tree and EAGLE-2's dynamic one.

Both are functions of two callables that a head runner (head_runner.py) provides, so they know
nothing of the model, its cache or the hardware:

    step(feats [q, D], tokens [q], depth, rows [q, S]) -> hidden [q, D]   run q nodes at one depth
    logprobs(hidden [q, D]) -> [q, K]                                     draft log-probabilities

and `vocab_ids` [K], the target id of each draft id. The root's output `h_root` ([D], from the
head's commit) drafts depth 1. Tree slots (the columns of `rows`) number the nodes in the order
they are stepped.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import torch

from eaglespec.tree import DraftTree, StaticPlan, select_dynamic

if TYPE_CHECKING:
    from eaglespec.cost import TreeSizer
    from eaglespec.drafter import TreeConfig

Step = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
Logprobs = Callable[[torch.Tensor], torch.Tensor]


def expand_static(plan: StaticPlan, root: torch.Tensor, h_root: torch.Tensor, step: Step, logprobs: Logprobs,
                  vocab_ids: torch.Tensor) -> DraftTree:
    """The static tree of `plan` rooted at `root` ([1] long): at each depth, run the nodes with
    children and take each child as its parent's rank-th draft guess."""
    tokens = torch.empty(plan.size, dtype=torch.long, device=root.device)
    tokens[0] = root[0]
    hidden = h_root[None]  # [runs, D] outputs of the previous depth's run nodes
    for d, level in enumerate(plan.levels, start=1):
        if d > 1:
            hidden = step(hidden[level.feat_rows], tokens[level.run], d - 1, level.rows)
        top = logprobs(hidden).topk(level.k, dim=-1).indices  # [runs, k]
        tokens[level.children] = vocab_ids[top[level.row_of_parent, level.ranks]]
    t = plan.template
    return DraftTree(tokens=tokens, parents=t.parents, depths=t.depths, mask=t.mask, retrieve=t.retrieve)


def dynamic_slots(tree: TreeConfig) -> int:
    """Tree slots a dynamic expansion steps: top_k nodes at each depth but the last."""
    return tree.top_k * max(tree.depth - 1, 0)


def expand_dynamic(tree: TreeConfig, root: torch.Tensor, h_root: torch.Tensor, step: Step, logprobs: Logprobs,
                   vocab_ids: torch.Tensor, stop_early: bool = False,
                   sizer: TreeSizer | None = None) -> tuple[DraftTree, bool]:
    """EAGLE-2's tree: expand the top_k best-scoring frontier nodes one depth at a time, top_k
    children each, then keep the `total_tokens - 1` candidates of highest cumulative log-probability
    (at least `min_prob`, the best one always; `select_dynamic`). With a `sizer`, keep the first
    `sizer.choose(...)` of those instead: the count of the most expected tokens per second on this
    machine, 0 (the root alone) when no tree beats plain decoding's.

    stop_early: before each depth, stop when no deeper node could be kept (`deeper_is_hopeless`):
    the same tree with fewer head runs, for a host sync per depth; with a sizer, also when one more
    depth could not pay for its head run (`TreeSizer.deeper_pays`). Returns the tree and whether
    it stopped early."""
    k, device = tree.top_k, root.device
    slots = dynamic_slots(tree)
    top = logprobs(h_root[None])[0].topk(k)
    all_tokens = [vocab_ids[top.indices]]  # per depth: candidate tokens
    all_scores = [top.values]  # cumulative log-probabilities
    all_parents = [torch.full((k,), -1, dtype=torch.long, device=device)]  # -1 = the root
    front = torch.arange(k, device=device)  # candidate indices of the nodes to expand next
    front_tokens, front_scores = all_tokens[0], top.values
    front_feats = h_root.expand(k, -1)
    front_rows = torch.zeros(k, slots, dtype=torch.bool, device=device)
    n_cand = k
    arange_k = torch.arange(k, device=device)
    keep_n = tree.total_tokens - 1
    # the floor as a float32 value, as the scores are: the early stop and the selection then agree exactly
    floor = float(torch.tensor(math.log(tree.min_prob), dtype=torch.float32)) if tree.min_prob > 0 else None
    stopped = False
    seen = top.values.tolist() if stop_early else []  # the candidates' scores as floats, for the checks
    for d in range(1, tree.depth):
        if stop_early and hopeless(seen, front_scores.tolist(), keep_n, n_cand, floor, sizer):
            stopped = True
            break
        start = time.perf_counter()
        rows = front_rows.clone()
        # each depth steps k nodes, so depth d's nodes take slots (d-1)k .. dk-1
        rows[arange_k, (d - 1) * k + arange_k] = True
        hidden = step(front_feats, front_tokens, d, rows)  # [k, D]
        child = logprobs(hidden).topk(k, dim=-1)  # [k, k]
        if sizer is not None:  # what a depth costs (on a CPU, where sizing runs, the work is done here)
            sizer.record_depth(time.perf_counter() - start)
        scores = (front_scores[:, None] + child.values).flatten()  # [k*k]
        all_tokens.append(vocab_ids[child.indices].flatten())
        all_scores.append(scores)
        all_parents.append(front.repeat_interleave(k))
        if stop_early:
            seen += scores.tolist()
        if d + 1 < tree.depth:  # the next frontier: the best k of these k*k children
            best = scores.topk(k).indices
            front = n_cand + best
            front_tokens, front_scores = all_tokens[-1][best], scores[best]
            front_feats, front_rows = hidden[best // k], rows[best // k]
        n_cand += k * k
    scores, parents, tokens = torch.cat(all_scores), torch.cat(all_parents), torch.cat(all_tokens)
    drafted, _ = select_dynamic(scores, parents, tokens, tree.total_tokens, tree.depth, min_score=floor,
                                size=None if sizer is None else sizer.choose)
    drafted.tokens[0] = root[0]
    return drafted, stopped


def deeper_is_hopeless(scores: list[float], front: list[float], keep_n: int, n_cand: int,
                       floor: float | None = None) -> bool:
    """True when no descendant of the frontier can enter the kept set, so drafting deeper would
    not change the tree: a child scores at most its parent (log-probabilities <= 0), so none
    passes a `floor` that the frontier's best misses; and, tied, a child ranks after every
    earlier candidate, so `keep_n` candidates already scoring at least the frontier's best keep
    it out. scores: every candidate's so far; front: the frontier's (float32 values as floats,
    so the comparisons are the selection's)."""
    best = max(front)
    if floor is not None and best < floor:
        return True
    return n_cand >= keep_n and sum(1 for x in scores if x >= best) >= keep_n


def hopeless(scores: list[float], front: list[float], keep_n: int, n_cand: int, floor: float | None,
             sizer: TreeSizer | None) -> bool:
    """`deeper_is_hopeless`; with a sizer, also true when one more depth could not pay for itself."""
    if deeper_is_hopeless(scores, front, keep_n, n_cand, floor):
        return True
    return sizer is not None and not sizer.deeper_pays(scores, front)
