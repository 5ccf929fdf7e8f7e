"""Accept or reject a draft tree against the target, losslessly.

Vocabulary (as in vLLM's rejection sampler):
- p: the target's *processed* next-token distribution at a node: logits / temperature, then top-k,
  then top-p (the order of transformers' warpers), then softmax. Every token this module emits, an
  accepted guess, a recovered token or a bonus token, follows this same p.
- accepted tokens: guesses kept because the target agrees (greedy) or the rejection test passed.
- recovered token: sampled from the residual when every guess at a node was rejected.
- bonus token: sampled from p at the last accepted node when it has no children left to try.

Greedy (temperature 0): walk from the root taking the child whose token is the target's argmax;
the output is exactly the target's greedy continuation.

Sampling: EAGLE's multi-round speculative sampling over a node's children x_1..x_c. The tree's
children are deterministic top-k guesses (the draft distribution is a point mass on each), so child
x_i is accepted with probability r(x_i), where r is p with the already rejected x_1..x_{i-1}
removed and renormalised; if all are rejected the recovered token is drawn from r. Then
P(emit y) = p(y) for every y: the first child is emitted with p(x_1), else (1 - p(x_1)) times the
same walk on r, by induction. The chosen token is distributed as p whatever the draft proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    """How the target's logits become a next-token distribution."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 means no top-k filter

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The processed target distribution p. logits: [..., V] float -> probs [..., V]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= 1 - params.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits.softmax(dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token from the last row of logits ([..., V]); returns a [1] long tensor."""
    row = logits.reshape(-1, logits.shape[-1])[-1]
    if params.greedy:
        return row.argmax().reshape(1)
    return torch.multinomial(process_logits(row, params), 1, generator=generator)


@dataclass(frozen=True)
class Verdict:
    """What one verification keeps."""

    nodes: torch.Tensor  # [k+1] long: root, then the accepted tree nodes, in path order
    tokens: torch.Tensor  # [k+1] long: the accepted guesses' tokens, then the bonus/recovered token


def verify(
    tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> Verdict:
    """logits: [N, V] the target's logits at each tree node (predicting that node's next token)."""
    if params.greedy:
        return verify_greedy(tree, logits)
    return verify_sampling(tree, logits, params, generator)


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Verdict:
    target = logits.argmax(dim=-1)  # [N] the target's choice after each node
    if tree.size == 1:  # plain decoding: nothing to walk
        return Verdict(nodes=tree.retrieve[0, :1], tokens=target)
    paths = tree.retrieve  # [L, D+1]
    safe = paths.clamp(min=0)
    # node path[j+1] is right iff its token is the target's choice after path[j]
    match = (tree.tokens[safe[:, 1:]] == target[safe[:, :-1]]) & (paths[:, 1:] >= 0)  # [L, D]
    accept_len = match.to(torch.int32).cumprod(dim=1).sum(dim=1)  # [L]
    best = int(accept_len.argmax())  # host sync: once per step
    n = int(accept_len[best])
    nodes = paths[best, : n + 1]
    tokens = torch.cat([tree.tokens[nodes[1:]], target[nodes[-1:]]])
    return Verdict(nodes=nodes, tokens=tokens)


def verify_sampling(
    tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Verdict:
    p = process_logits(logits, params)  # [N, V]
    n = tree.size
    # One host copy per step of the few numbers the walk needs (never a sync per node).
    parents = tree.parents.tolist()
    child_p = p[tree.parents[1:], tree.tokens[1:]].tolist() if n > 1 else []  # p(x) at x's parent
    uniforms = torch.rand(n, generator=generator, device=p.device).tolist()
    children: list[list[int]] = [[] for _ in range(n)]
    for node in range(1, n):
        children[parents[node]].append(node)

    path = [0]
    node = 0
    while True:
        mass_left = 1.0  # 1 - p(rejected siblings so far)
        rejected: list[int] = []
        chosen = None
        for child in children[node]:
            px = child_p[child - 1]
            if mass_left > 0 and uniforms[child] * mass_left < px:  # u < r(x) = p(x) / mass_left
                chosen = child
                break
            mass_left -= px
            rejected.append(child)
        if chosen is None:
            break
        path.append(chosen)
        node = chosen

    residual = p[node]
    if rejected:
        residual = residual.clone()
        residual[tree.tokens[rejected]] = 0.0
        if not residual.sum() > 0:  # float dust: every bit of mass sat on rejected guesses
            residual = p[node]
    last = torch.multinomial(residual, 1, generator=generator)
    nodes = torch.tensor(path, dtype=torch.long, device=tree.tokens.device)
    return Verdict(nodes=nodes, tokens=torch.cat([tree.tokens[nodes[1:]], last]))
