"""Accept or reject a draft tree against the target, losslessly.

Vocabulary (as in vLLM's rejection sampler):
- p: the target's *processed* next-token distribution at a node: logits / temperature, then top-k,
  then top-p (the order of transformers' warpers), then softmax. Every token this module emits, an
  accepted guess or a bonus token, follows this same p.
- accepted tokens: guesses equal to the token the target chooses at their parent (its argmax, or
  its sample).
- bonus token: the target's own choice at the last accepted node, which no guess matched.

Greedy (temperature 0): walk from the root taking the child whose token is the target's argmax;
the output is exactly the target's greedy continuation.

Sampling: every token is drawn by inverse transform sampling with a uniform fixed by (seed,
position): the token at absolute position t is the first y (in token-id order) whose cumulative
mass p(0) + ... + p(y) exceeds u_t, where u_t in [0, 1) is a hash of (seed, t) alone
(`SampleNoise`). That token is distributed exactly as p. A tree is then walked as in greedy
decoding, with each node's sampled token in place of its argmax: a guess is kept iff it is the
token the target samples there.

- Lossless: the emitted token at position t is the one plain sampling with the same seed emits,
  whatever the tree proposed. u_t does not depend on the tokens before t, so given the prefix the
  token follows p exactly.
- A node's guesses are accepted with probability sum p(x_i) over its children: what EAGLE's
  multi-round speculative sampling gives for deterministic top-k children (each a point mass).
- Reproducible: the same seed gives the same text with any draft, any tree size and plain
  decoding, so a cost-sized tree (which changes with timing) cannot change a seeded sample.
"""

from __future__ import annotations

import hashlib
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


#: tokens the nucleus (top-p) search ranks first; it ranks 8 times more until their mass reaches top_p
NUCLEUS_FIRST = 64


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The processed target distribution p. logits: [..., V] float -> probs [..., V]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = logits.masked_fill(~nucleus(logits.softmax(dim=-1), params.top_p), float("-inf"))
    return logits.softmax(dim=-1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., V] bool: the tokens top-p keeps, those ranked before the mass of the tokens ranked
    above them reaches top_p (the most likely always; transformers' `TopPLogitsWarper` keeps the
    same set). The nucleus is rarely more than a few hundred tokens, so the search ranks the
    NUCLEUS_FIRST most likely and widens only while their mass falls short: sorting Gemma 3's
    262k-token vocabulary cost more than decoding a token (docs/design.md, sampling)."""
    vocab = probs.shape[-1]
    k = min(NUCLEUS_FIRST, vocab)
    while True:
        top, idx = probs.topk(k, dim=-1)  # [..., k] descending
        mass = top.cumsum(dim=-1)
        if k == vocab or bool((mass[..., -1] >= top_p).all()):
            break
        k = min(vocab, 8 * k)
    above = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)  # [..., k]
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, above < top_p)


class SampleNoise:
    """The sampling noise of one request: for each absolute position t a uniform u_t in [0, 1),
    53 bits of a hash of (seed, t) alone, so a position's draw is the same whichever order
    positions are asked for in, and whatever was sampled before it.

    One number a position, not one a token: the Gumbel-max trick this replaced drew V
    exponential variates a position, a large share of a small model's decode step
    (docs/design.md, sampling)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed, self.device = int(seed), torch.device(device)

    def uniform(self, position: int) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{position}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) * 2.0**-53

    def at(self, position: int) -> torch.Tensor:
        """u_position: [] float64."""
        return torch.tensor(self.uniform(position), dtype=torch.float64, device=self.device)

    def span(self, first: int, count: int) -> torch.Tensor:
        """[count] float64: u_first .. u_{first + count - 1}."""
        return torch.tensor([self.uniform(first + i) for i in range(count)], dtype=torch.float64, device=self.device)


def choose(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling: the first token whose cumulative probability exceeds u times
    the total. p [..., V] probabilities, u [...] uniforms in [0, 1) -> [...] long. For uniform u
    it is distributed as p (to float64 rounding of the sums); a token of p = 0 has an empty
    interval and is never chosen."""
    cum = p.double().cumsum(dim=-1)  # [..., V]
    total = cum[..., -1]
    # u * total may round up to the total itself (odds below 2**-52): kept just under it, the
    # draw stays inside the last token of nonzero probability
    x = torch.minimum(u.to(cum) * total, torch.nextafter(total, torch.zeros_like(total))).unsqueeze(-1)  # [..., 1]
    return torch.searchsorted(cum, x, right=True).squeeze(-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, noise: SampleNoise | None = None,
                position: int = 0) -> torch.Tensor:
    """The token at absolute position `position`, chosen from the last row of logits ([..., V]):
    its argmax (greedy) or its sample under `noise`. Returns a [1] long tensor."""
    row = logits.reshape(-1, logits.shape[-1])[-1]
    if params.greedy:
        return row.argmax().reshape(1)
    if noise is None:
        raise ValueError("sampling needs a SampleNoise")
    return choose(process_logits(row, params), noise.at(position)).reshape(1)


@dataclass(frozen=True)
class Verdict:
    """What one verification keeps."""

    nodes: torch.Tensor  # [k+1] long: root, then the accepted tree nodes, in path order
    tokens: torch.Tensor  # [k+1] long: the accepted guesses' tokens, then the bonus token


def verify(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, noise: SampleNoise | None = None,
           position: int = 0) -> Verdict:
    """logits: [N, V] the target's logits at each tree node (predicting that node's next token);
    position: the absolute position of the token the root's logits predict (a node at depth d
    predicts position + d). Sampling draws with `noise` (required unless greedy)."""
    if params.greedy:
        return accept(tree, argmax(logits))
    if noise is None:
        raise ValueError("sampling needs a SampleNoise")
    p = process_logits(logits, params)  # [N, V]
    u = noise.span(position, int(tree.depths.max()) + 1)  # [D+1]
    return accept(tree, choose(p, u[tree.depths]))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] long, the first maximum of each row. On a CPU through NumPy, which takes about
    4 us for a 49k vocabulary where torch's reduction takes about 65 us: a plain decoding step's
    share of a millisecond."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def accept(tree: DraftTree, choice: torch.Tensor) -> Verdict:
    """Walk the tree with the target's choice after each node (choice [N] long): keep the longest
    path whose every node is its parent's choice, then the choice after its last node."""
    if tree.size == 1:  # plain decoding: nothing to walk
        return Verdict(nodes=tree.retrieve[0, :1], tokens=choice[:1])
    if choice.device.type == "cpu":
        return accept_on_host(tree, choice)
    return accept_vectorised(tree, choice)


def accept_vectorised(tree: DraftTree, choice: torch.Tensor) -> Verdict:
    """`accept` in tensor operations on the tree's device, one host sync."""
    paths = tree.retrieve  # [L, D+1]
    safe = paths.clamp(min=0)
    # node path[j+1] is right iff its token is the target's choice after path[j]
    match = (tree.tokens[safe[:, 1:]] == choice[safe[:, :-1]]) & (paths[:, 1:] >= 0)  # [L, D]
    accept_len = match.to(torch.int32).cumprod(dim=1).sum(dim=1)  # [L]
    best = int(accept_len.argmax())  # host sync: once per step
    n = int(accept_len[best])
    nodes = paths[best, : n + 1]
    tokens = torch.cat([tree.tokens[nodes[1:]], choice[nodes[-1:]]])
    return Verdict(nodes=nodes, tokens=tokens)


def accept_on_host(tree: DraftTree, choice: torch.Tensor) -> Verdict:
    """`accept` for a CPU tree, walking its root-to-leaf paths in Python lists: the same verdict
    (the first of the longest paths, leaves in ascending order) for a fraction of the tensor
    operations' time on a tree of a few dozen nodes."""
    tokens, chosen = tree.tokens.tolist(), choice.tolist()
    best, best_n = [0], 0
    for path in tree.retrieve.tolist():
        n = 0
        while n + 1 < len(path) and path[n + 1] >= 0 and tokens[path[n + 1]] == chosen[path[n]]:
            n += 1
        if n > best_n:
            best, best_n = path, n
    nodes = best[: best_n + 1]
    return Verdict(nodes=torch.tensor(nodes, dtype=torch.long),
                   tokens=torch.tensor([tokens[j] for j in nodes[1:]] + [chosen[nodes[-1]]], dtype=torch.long))
