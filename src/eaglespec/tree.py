"""Draft trees: their shapes, attention masks and root-to-leaf paths, as pure functions.

Vocabulary. Node 0 is the *root*: the last committed token, which the target has not processed
yet. Every other node is a guessed token; `parents[i] < i` (topological order), so a path read
in ascending node order is read in depth order. Worked example:

    parents [-1, 0, 0, 1]  ->  depths [0, 1, 1, 2]
    mask (row i sees column j iff j is i or an ancestor of i)
        [[1, 0, 0, 0],
         [1, 1, 0, 0],
         [1, 0, 1, 0],
         [1, 1, 0, 1]]
    retrieve (one root-to-leaf path per row, -1 padded)   [[0, 1, 3], [0, 2, -1]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# EAGLE-1's default tree (SafeAILab/EAGLE, model/choices.py `mc_sim_7b_63`): each entry is the
# path of child ranks from the root, e.g. [0, 1] = the root's top-1 guess, then its top-2 guess.
MC_SIM_7B_63: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)

# A small static tree for CPUs, where every verified node costs time: 12 nodes, depth 5.
CPU_SMALL: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0), (0, 0, 0, 1),
    (0, 0, 0, 0, 0),
)

STATIC_PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {"mc_sim_7b_63": MC_SIM_7B_63, "cpu_small": CPU_SMALL}


@dataclass(frozen=True)
class DraftTree:
    """A token tree to verify in one target forward."""

    tokens: torch.Tensor  # [N] long, tokens[0] is the root
    parents: torch.Tensor  # [N] long, parents[0] == -1, parents[i] < i
    depths: torch.Tensor  # [N] long, depths[0] == 0
    mask: torch.Tensor  # [N, N] bool, ancestor-or-self
    retrieve: torch.Tensor  # [num_leaves, max_depth + 1] long node indices, -1 padded

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[N, N] bool, row i true at i and at each ancestor of i.

    Pointer jumping: after step s, `anc` holds each node's ancestor s+1 levels up (-1 past the
    root), so `max_depth` vectorised steps cover every path with no host sync.
    """
    n = parents.shape[0]
    rows = torch.arange(n, device=parents.device)
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    anc = parents.clone()
    for _ in range(max_depth):
        valid = anc >= 0
        mask[rows[valid], anc[valid]] = True
        anc = torch.where(valid, parents[anc.clamp(min=0)], anc)
    return mask


def make_tree(tokens: torch.Tensor, parents: torch.Tensor, max_depth: int | None = None) -> DraftTree:
    """Build the frozen tree from tokens and parent indices (topologically ordered).

    max_depth bounds the depth (the drafter knows it); None reads it from the parents on the host.
    On a CPU the shape is worked out in Python lists (`tree_on_host`), the same tensors.
    """
    if parents.device.type == "cpu":
        return tree_on_host(tokens, parents, max_depth)
    return tree_vectorised(tokens, parents, max_depth)


def tree_vectorised(tokens: torch.Tensor, parents: torch.Tensor, max_depth: int | None = None) -> DraftTree:
    """`make_tree` in tensor operations on the tree's device, with no host sync given max_depth."""
    if max_depth is None:
        max_depth = _depth_on_host(parents.tolist())
    mask = ancestor_mask(parents, max_depth)
    depths = mask.sum(dim=1) - 1  # ancestors strictly above each node
    n = tokens.shape[0]
    has_child = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    has_child[parents[1:]] = True
    leaves = (~has_child).nonzero().squeeze(1)  # [L]
    # onehot[l, j, d]: node j lies on leaf l's path at depth d
    levels = torch.arange(max_depth + 1, device=tokens.device)
    onehot = mask[leaves][:, :, None] & (depths[None, :, None] == levels[None, None, :])  # [L, N, D+1]
    retrieve = onehot.to(torch.uint8).argmax(dim=1)  # [L, D+1]
    retrieve = torch.where(onehot.any(dim=1), retrieve, torch.full_like(retrieve, -1))
    return DraftTree(tokens=tokens, parents=parents, depths=depths, mask=mask, retrieve=retrieve)


def tree_on_host(tokens: torch.Tensor, parents: torch.Tensor, max_depth: int | None = None) -> DraftTree:
    """`make_tree` for a CPU tree, in Python lists: each node's ancestors are its
    parent's plus itself, so one pass in node order gives the mask, depths and root-to-leaf
    paths. A draft tree has a few dozen nodes at most, where each of the vectorised version's two
    dozen tensor operations costs more than this whole pass (every step builds one or two trees).
    retrieve has max(max_depth, the depth) + 1 columns, as there."""
    n = parents.shape[0]
    lineage: list[list[int]] = []  # per node: its root path, root first
    has_child = [False] * n
    for i, p in enumerate(parents.tolist()):
        if i == 0:
            lineage.append([0])
            continue
        if not 0 <= p < i:
            raise ValueError(f"parents must be topologically ordered: parents[{i}] = {p}")
        lineage.append(lineage[p] + [i])
        has_child[p] = True
    depth = max(len(path) for path in lineage) - 1
    width = max(depth, max_depth or 0) + 1
    rows = [i for i, path in enumerate(lineage) for _ in path]
    cols = [j for path in lineage for j in path]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[rows, cols] = True
    retrieve = [path + [-1] * (width - len(path)) for i, path in enumerate(lineage) if not has_child[i]]
    return DraftTree(tokens=tokens, parents=parents,
                     depths=torch.tensor([len(path) - 1 for path in lineage], dtype=torch.long), mask=mask,
                     retrieve=torch.tensor(retrieve, dtype=torch.long))


#: the root-alone tree's shape (parents, depths, mask, retrieve) per device, built once: plain
#: decoding and resting drafters verify it every step, where building it cost 0.27 ms of a 10 ms token
_ROOT_SHAPES: dict[torch.device, DraftTree] = {}


def root_only(root: torch.Tensor) -> DraftTree:
    """The trivial tree: plain autoregressive decoding verifies just the root ([1] long). Its shape
    tensors are shared between calls; callers never write to them."""
    shape = _ROOT_SHAPES.get(root.device)
    if shape is None:
        shape = _ROOT_SHAPES[root.device] = make_tree(torch.zeros(1, dtype=torch.long, device=root.device),
                                                      torch.full((1,), -1, dtype=torch.long, device=root.device),
                                                      max_depth=0)
    return DraftTree(tokens=root.reshape(1), parents=shape.parents, depths=shape.depths, mask=shape.mask,
                     retrieve=shape.retrieve)


def _depth_on_host(parents: Sequence[int]) -> int:
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        if i and p >= i:
            raise ValueError(f"parents must be topologically ordered: parents[{i}] = {p}")
        depth[i] = depth[p] + 1 if p >= 0 else 0
    return max(depth, default=0)


@dataclass(frozen=True)
class StaticShape:
    """A static tree's shape, computed once from its rank paths.

    parents/ranks/depths cover all nodes (root included, rank 0); `levels[d]` lists the nodes at
    depth d+1 and `expand[d]` the distinct parents they hang from, with `topk[d]` the largest rank
    needed there plus one.
    """

    parents: torch.Tensor  # [N] long
    ranks: torch.Tensor  # [N] long, child rank among the parent's draft top-k
    depths: torch.Tensor  # [N] long
    levels: tuple[torch.Tensor, ...]  # per depth d >= 1: node indices at that depth
    topk: tuple[int, ...]  # per depth d >= 1: how many top candidates the parents must draft
    max_depth: int

    @property
    def size(self) -> int:
        return self.parents.shape[0]


def static_shape(paths: Sequence[Sequence[int]]) -> StaticShape:
    """Turn EAGLE/Medusa-style rank paths into parents, ranks and per-depth levels.

    Nodes are sorted by (depth, path) so parents precede children. Every path's prefix must be a
    path too: [0, 1] needs [0].
    """
    ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    if not ordered or any(len(p) == 0 for p in ordered):
        raise ValueError("a static tree needs non-empty rank paths such as [[0], [1], [0, 0]]")
    index = {(): 0}
    parents, ranks, depths = [-1], [0], [0]
    for p in ordered:
        if min(p) < 0:
            raise ValueError(f"ranks must be >= 0: {list(p)}")
        if p[:-1] not in index:
            raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])}")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
        depths.append(len(p))
    max_depth = max(depths)
    levels, topk = [], []
    for d in range(1, max_depth + 1):
        nodes = [i for i, dep in enumerate(depths) if dep == d]
        levels.append(torch.tensor(nodes, dtype=torch.long))
        topk.append(max(ranks[i] for i in nodes) + 1)
    return StaticShape(
        parents=torch.tensor(parents, dtype=torch.long),
        ranks=torch.tensor(ranks, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        levels=tuple(levels),
        topk=tuple(topk),
        max_depth=max_depth,
    )


def select_dynamic(
    scores: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, total_tokens: int, max_depth: int,
    min_score: float | None = None, size: Callable[[torch.Tensor | list[float]], int] | None = None,
) -> tuple[DraftTree, torch.Tensor]:
    """EAGLE-2's re-ranking: keep the `total_tokens - 1` candidates of highest cumulative score,
    and (with `min_score`) only those scoring at least it, the best one always. `size`, given the
    scores of those sorted descending (a tensor; floats for CPU candidates), may keep fewer: the
    first size(...) of them (0: the root alone).

    Candidates are in creation order (a parent before its children, parents[c] == -1 for the
    root's children), and a child's score is its parent's plus a log-probability <= 0, so a kept
    child's parent is kept too: a stable descending sort breaks ties toward the lower index.

    scores, parents, tokens: [C]; tokens[...] excludes the root, whose token is filled in by the
    caller as tree.tokens[0]. Returns the tree (root token set to -1) and the kept candidate
    indices [N-1] in tree order.
    """
    if scores.device.type == "cpu":
        return select_on_host(scores, parents, tokens, total_tokens, max_depth, min_score, size)
    return select_vectorised(scores, parents, tokens, total_tokens, max_depth, min_score, size)


def select_vectorised(
    scores: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, total_tokens: int, max_depth: int,
    min_score: float | None = None, size: Callable[[torch.Tensor], int] | None = None,
) -> tuple[DraftTree, torch.Tensor]:
    """`select_dynamic` in tensor operations on the candidates' device."""
    keep_n = min(total_tokens - 1, scores.shape[0])
    if min_score is not None:  # one host sync; a kept child's parent scores at least as much
        keep_n = max(1, min(keep_n, int((scores >= min_score).sum())))
    ranked = torch.sort(scores, descending=True, stable=True)
    if size is not None:
        keep_n = max(0, min(keep_n, size(ranked.values[:keep_n])))
    order = ranked.indices[:keep_n]
    kept = order.sort().values  # [N-1], creation order is topological
    # new index of each candidate: 1 + its rank in `kept`; -1 for dropped ones
    new_index = torch.full((scores.shape[0] + 1,), -1, dtype=torch.long, device=scores.device)
    new_index[kept + 1] = torch.arange(1, keep_n + 1, device=scores.device)
    new_index[0] = 0  # candidate parent -1 (the root) maps to node 0 via the +1 shift
    node_parents = torch.cat([torch.tensor([-1], device=scores.device), new_index[parents[kept] + 1]])
    node_tokens = torch.cat([torch.tensor([-1], device=scores.device), tokens[kept]])
    return make_tree(node_tokens, node_parents, max_depth=max_depth), kept


def select_on_host(
    scores: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, total_tokens: int, max_depth: int,
    min_score: float | None, size: Callable[[list[float]], int] | None,
) -> tuple[DraftTree, torch.Tensor]:
    """`select_dynamic` for CPU candidates, ranked and renumbered in Python lists (a few dozen
    candidates): the same tree. Python's sort is stable with reverse=True too, so ties keep
    creation order as torch's stable descending sort does; float32 scores convert exactly."""
    s = scores.tolist()
    keep_n = min(total_tokens - 1, len(s))
    if min_score is not None:
        keep_n = max(1, min(keep_n, sum(1 for x in s if x >= min_score)))
    order = sorted(range(len(s)), key=s.__getitem__, reverse=True)
    if size is not None:  # the sizer reads floats (`TreeSizer.choose`): no tensor to build
        keep_n = max(0, min(keep_n, size([s[c] for c in order[:keep_n]])))
    kept = sorted(order[:keep_n])  # creation order is topological
    new_index = {-1: 0, **{c: i for i, c in enumerate(kept, start=1)}}
    par, tok = parents.tolist(), tokens.tolist()
    node_parents = torch.tensor([-1] + [new_index.get(par[c], -1) for c in kept], dtype=torch.long)
    node_tokens = torch.tensor([-1] + [tok[c] for c in kept], dtype=tokens.dtype)
    return make_tree(node_tokens, node_parents, max_depth=max_depth), torch.tensor(kept, dtype=torch.long)


def walk_chain(tokens: Sequence[int], parents: Sequence[int], chain: Sequence[int]) -> tuple[int, int]:
    """Follow a chain of tokens down a tree from the root while they match children: the node
    reached and how many chain tokens it took (those need no nodes of their own)."""
    child_of = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens)) if i > 0}
    node, matched = 0, 0
    while matched < len(chain) and (node, chain[matched]) in child_of:
        node = child_of[(node, chain[matched])]
        matched += 1
    return node, matched


def graft_chain(tree: DraftTree, chain: Sequence[int],
                new_nodes: Callable[[int], int] | None = None) -> DraftTree:
    """Merge a guessed chain (tokens following the root) into a tree.

    The chain walks down the tree while its tokens match existing children, and the rest hangs
    below the last match as new nodes, appended (so the order stays topological and siblings stay
    distinct). The merged tree verifies both guesses in one forward; e.g. a tree root->{a, b} with
    chain [a, c, d] becomes root->{a, b}, a->c, c->d. new_nodes(matched): how many of the chain's
    tokens after the `matched` the tree already holds become nodes (None: all).
    """
    if not chain:
        return tree
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()  # host copy: once per step
    node, matched = walk_chain(tokens, parents, chain)
    rest = list(chain[matched:])
    if new_nodes is not None:
        rest = rest[: new_nodes(matched)]
    if not rest:
        return tree
    depth = tree.depths.tolist()
    n = len(tokens)
    device = tree.tokens.device
    new_tokens = torch.tensor(tokens + rest, dtype=torch.long, device=device)
    new_parents = torch.tensor(parents + [node] + list(range(n, n + len(rest) - 1)), dtype=torch.long, device=device)
    max_depth = max(max(depth), depth[node] + len(rest))
    return make_tree(new_tokens, new_parents, max_depth)


@dataclass(frozen=True)
class StaticLevel:
    """What drafting depth d of a static tree needs (see `static_plan`)."""

    children: torch.Tensor  # [c] nodes at depth d
    ranks: torch.Tensor  # [c] each child's rank among its parent's draft top-k
    k: int  # how many top candidates its parents draft
    run: torch.Tensor  # [r] nodes at depth d-1 that the head runs (those with children); empty at d = 1
    rows: torch.Tensor  # [r, slots] bool: the tree slots each run node sees (its ancestors and itself)
    feat_rows: torch.Tensor  # [r] which output of depth d-2's run each run node consumes (its parent's)
    row_of_parent: torch.Tensor  # [c] which output (run row; the root's at d = 1) each child is drafted from


@dataclass(frozen=True)
class StaticPlan:
    """Drafting a static tree, worked out once: its template (the tree with zero tokens) and, per
    depth, which nodes the head runs and which outputs their children come from. Tree slots number
    the run nodes of depths >= 1 in the order the head runs them (the draft cache's tree slots)."""

    template: DraftTree
    levels: tuple[StaticLevel, ...]  # depth 1, 2, ...
    slots: int

    @property
    def size(self) -> int:
        return self.template.size

    def to(self, device: torch.device | str) -> StaticPlan:
        t = self.template
        template = DraftTree(*(x.to(device) for x in (t.tokens, t.parents, t.depths, t.mask, t.retrieve)))
        levels = tuple(StaticLevel(lv.children.to(device), lv.ranks.to(device), lv.k, lv.run.to(device),
                                   lv.rows.to(device), lv.feat_rows.to(device), lv.row_of_parent.to(device))
                       for lv in self.levels)
        return StaticPlan(template, levels, self.slots)


def static_plan(paths: Sequence[Sequence[int]]) -> StaticPlan:
    """The plan of a static tree given as rank paths (see `static_shape`), on the host.

    Worked example, paths [0], [1], [0, 0], [0, 1], [0, 0, 0]:

        nodes  0 root, 1 [0], 2 [1], 3 [0, 0], 4 [0, 1], 5 [0, 0, 0]
        parents [-1, 0, 0, 1, 1, 3]; run nodes (those with children) 1 at depth 1, 3 at depth 2,
        tree slots 1 -> 0, 3 -> 1
        depth 1: children [1, 2] from the root's output (commit), k 2
        depth 2: run [1] seeing slots [[1, 0]], fed the root's output; children [3, 4] from row 0
        depth 3: run [3] seeing slots [[1, 1]], fed node 1's output (row 0); child [5] from row 0
    """
    shape = static_shape(paths)
    parents = shape.parents.tolist()
    depths = shape.depths.tolist()
    has_child = {p for p in parents if p >= 0}
    # nodes the draft head runs at each depth d >= 1 (those with children), in slot order
    expand = [[i for i in range(shape.size) if depths[i] == d and i in has_child] for d in range(shape.max_depth)]
    slot = {node: s for s, node in enumerate(n for level in expand[1:] for n in level)}
    template = make_tree(torch.zeros(shape.size, dtype=torch.long), shape.parents, shape.max_depth)
    anc = template.mask.tolist()
    levels = []
    for d in range(1, shape.max_depth + 1):
        children = shape.levels[d - 1]
        if d == 1:
            run_nodes: list[int] = []
            feat_rows: list[int] = []
            row_of_parent = [0] * len(children)
        else:
            run_nodes = expand[d - 1]
            prev = expand[d - 2] if d >= 3 else []
            # the feature each run node consumes: its parent's draft output (the root's at d == 2)
            feat_rows = [prev.index(parents[n]) if d >= 3 else 0 for n in run_nodes]
            row_of_parent = [run_nodes.index(parents[c]) for c in children.tolist()]
        rows = torch.zeros(len(run_nodes), len(slot), dtype=torch.bool)
        for r, node in enumerate(run_nodes):
            for a in range(1, shape.size):
                if anc[node][a]:
                    rows[r, slot[a]] = True
        levels.append(StaticLevel(
            children=children, ranks=shape.ranks[children], k=shape.topk[d - 1],
            run=torch.tensor(run_nodes, dtype=torch.long), rows=rows,
            feat_rows=torch.tensor(feat_rows, dtype=torch.long),
            row_of_parent=torch.tensor(row_of_parent, dtype=torch.long)))
    return StaticPlan(template=template, levels=tuple(levels), slots=len(slot))
