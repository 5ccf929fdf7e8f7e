"""How good is the dynamic tree's choice of nodes, and how much better could any choice be?

Decodes prompts greedily with a wide dynamic tree (no floor) and records every candidate the head
drafts before EAGLE-2's re-ranking keeps the best `total_tokens - 1`. Greedy output does not depend
on the tree, so afterwards each candidate is known to be right (its path is what the target
wrote) or wrong. From the same candidates the script then replays node selections of any size N
(root included) and reports the acceptance length each gives per step:

- **draft**: EAGLE-2's rule, the N - 1 candidates of highest cumulative draft probability;
- **calibrated**: the same rule over acceptance rates looked up from the head's confidence (binned
  draft probability, and whether the token is its parent's top guess), fitted on `--fit-on`
  prompts (default: these prompts themselves);
- **pool ceiling**: the deepest right path among all candidates, cut to N - 1 nodes: what a perfect
  choice from this head's guesses would reach.

It also prints the calibration table: for candidates whose parent is right, how often a guess of
a given draft probability is right. If the draft's confidence is calibrated, "calibrated" equals
"draft"; if the ceiling stays close to "draft", no selection rule can buy much and only better
guesses (the head) can.

    python scripts/tree_calibration.py --prompts 40 --out /tmp/cal_val.json
    python scripts/tree_calibration.py --questions ../shared/data/mt_bench/question.jsonl --prompts 40 \\
        --fit-on /tmp/cal_val.json

Per-step figures are simulated on the recorded steps: a step's acceptance length is 1 (the bonus
token) plus the depth of the deepest right node kept. Steps come from the wide tree's run, so a
smaller tree's run would have cut its steps at other places; the comparison between rules on the
same steps is exact.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch

#: draft-probability bins of the calibration table: [0, 0.1), [0.1, 0.2), ... [0.9, 1]
N_BINS = 10


@dataclass
class Step:
    """The candidates of one proposal, in creation order (a parent before its children)."""

    scores: list[float]  # cumulative draft log-probability
    parents: list[int]  # candidate index of the parent, -1 for the root's children
    depth: list[int]  # 1 for the root's children
    right: list[bool]  # the path to this candidate is what the target wrote
    prob: list[float]  # the draft's probability of this token given its parent
    top: list[bool]  # this token is its parent's first (most probable) guess


def to_step(scores: list[float], parents: list[int], tokens: list[int], truth: list[int]) -> Step:
    """One proposal's candidates against `truth`: the tokens the target wrote after the root
    (truth[0] follows the root)."""
    n = len(scores)
    depth, right, prob, top = [0] * n, [False] * n, [0.0] * n, [False] * n
    first_child: dict[int, int] = {}
    for c in range(n):
        p = parents[c]
        depth[c] = 1 if p < 0 else depth[p] + 1
        prob[c] = math.exp(scores[c] - (scores[p] if p >= 0 else 0.0))
        top[c] = first_child.setdefault(p, c) == c  # children come in the head's rank order
        parent_right = p < 0 or right[p]
        right[c] = parent_right and depth[c] <= len(truth) and tokens[c] == truth[depth[c] - 1]
    return Step(scores, parents, depth, right, prob, top)


def steps_of(output: list[int], accept_lengths: list[int], proposals: list[tuple[list[float], list[int], list[int]]],
             max_depth: int) -> list[Step]:
    """The proposals of one greedy generation as Steps. output: the generated ids (output[0] was the
    root of the first proposal); accept_lengths: tokens each step added. Steps too close to the end
    for their deepest candidate to be judged are left out."""
    steps, root = [], 0
    for added, (scores, parents, tokens) in zip(accept_lengths, proposals):
        truth = output[root + 1: root + 1 + max_depth]
        if len(truth) == max_depth:
            steps.append(to_step(scores, parents, tokens, truth))
        root += added
    return steps


def bin_of(step: Step, c: int) -> tuple[int, bool]:
    return min(int(step.prob[c] * N_BINS), N_BINS - 1), step.top[c]


def calibration(steps: list[Step]) -> dict[tuple[int, bool], tuple[int, int]]:
    """(probability bin, top guess) -> (candidates whose parent is right, of which right)."""
    table: dict[tuple[int, bool], list[int]] = {}
    for s in steps:
        for c in range(len(s.scores)):
            p = s.parents[c]
            if p >= 0 and not s.right[p]:
                continue
            cell = table.setdefault(bin_of(s, c), [0, 0])
            cell[0] += 1
            cell[1] += s.right[c]
    return {k: (v[0], v[1]) for k, v in table.items()}


def calibrated_scores(step: Step, rates: dict[tuple[int, bool], float]) -> list[float]:
    """Cumulative log acceptance rates along each candidate's path (<= 0, so a child never
    outscores its parent and any top-N set keeps its ancestors)."""
    out: list[float] = []
    for c in range(len(step.scores)):
        rate = min(max(rates.get(bin_of(step, c), step.prob[c]), 1e-6), 1.0)
        p = step.parents[c]
        out.append(math.log(rate) + (out[p] if p >= 0 else 0.0))
    return out


def accept_length(step: Step, scores: list[float], nodes: int) -> int:
    """1 + depth of the deepest right candidate among the `nodes - 1` of highest score (ties to
    the earlier candidate, as select_dynamic)."""
    keep = sorted(range(len(scores)), key=lambda c: (-scores[c], c))[: nodes - 1]
    return 1 + max((step.depth[c] for c in keep if step.right[c]), default=0)


def ceiling(step: Step, nodes: int) -> int:
    """The best acceptance length any choice of `nodes - 1` candidates could give."""
    return 1 + min(nodes - 1, max((d for d, r in zip(step.depth, step.right) if r), default=0))


def summarize(steps: list[Step], sizes: list[int], rates: dict[tuple[int, bool], float]) -> list[dict]:
    rows = []
    for n in sizes:
        draft = sum(accept_length(s, s.scores, n) for s in steps) / len(steps)
        cal = sum(accept_length(s, calibrated_scores(s, rates), n) for s in steps) / len(steps)
        top = sum(ceiling(s, n) for s in steps) / len(steps)
        rows.append(dict(nodes=n, draft=draft, calibrated=cal, ceiling=top))
    return rows


def main() -> None:
    from eaglespec import DraftHead, EagleDrafter, GenerationConfig, Generator, TreeConfig, load_target
    from eaglespec.bench.run import load_questions
    from eaglespec.heads import default_head_path
    from eaglespec.train.data import heldout_prompts
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default=None, help="head folder (default: the shipped head)")
    ap.add_argument("--questions", default=None,
                    help="MT-bench / Spec-Bench question file, first turns (default: held-out ShareGPT val prompts)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--total-tokens", type=int, default=32, help="the wide tree decoded with (the pool is larger)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32])
    ap.add_argument("--fit-on", default=None, help="a JSON this script wrote: take its calibration table")
    ap.add_argument("--out", default=None, help="write the table and results as JSON")
    args = ap.parse_args()

    target = load_target(dtype=args.dtype)
    head = DraftHead.from_pretrained(args.draft or default_head_path())
    tree = TreeConfig(kind="dynamic", top_k=args.top_k, depth=args.depth, total_tokens=args.total_tokens)
    drafter = EagleDrafter(head, target, tree)
    engine = Generator(target, drafter)
    if args.questions:
        # one per category in turn, as tree_sweep.py and bench do
        by_cat: dict[str, list[str]] = {}
        for q in load_questions(args.questions):
            by_cat.setdefault(q.category, []).append(q.turns[0])
        rounds = max(len(v) for v in by_cat.values())
        prompts = [v[i] for i in range(rounds) for v in by_cat.values() if i < len(v)]
    else:
        prompts = [turns[0] for _, turns in heldout_prompts("val") if len(turns[0]) < 600]
    prompts = prompts[: args.prompts]
    steps: list[Step] = []
    taus = []
    for p in tqdm(prompts, desc="decoding", unit="prompt"):
        drafter.candidate_log = []
        r = engine.generate(engine.encode(p), GenerationConfig(max_new_tokens=args.max_new_tokens))
        proposals = [(s.tolist(), pa.tolist(), t.tolist()) for s, pa, t in drafter.candidate_log]
        steps += steps_of(r.token_ids, r.stats.accept_lengths, proposals, args.depth)
        taus.append(r.stats.mean_accept_len)
    table = calibration(steps)
    if args.fit_on:
        with open(args.fit_on) as f:
            fitted = {(c["bin"], c["top"]): (c["n"], c["right"]) for c in json.load(f)["calibration"]}
    else:
        fitted = table
    rates = {k: r / n for k, (n, r) in fitted.items() if n}
    rows = summarize(steps, args.sizes, rates)

    print(f"{len(prompts)} prompts, {len(steps)} steps; tau of the {args.total_tokens}-node run itself: "
          f"{sum(taus) / len(taus):.2f}")
    print("\n| draft probability | top guess | candidates | right |\n|---|---|---|---|")
    for (b, top), (n, r) in sorted(table.items()):
        print(f"| {b / N_BINS:.1f}-{(b + 1) / N_BINS:.1f} | {'yes' if top else 'no'} | {n} | {r / n:.3f} |")
    fit = f"fitted on {args.fit_on}" if args.fit_on else "fitted on these steps"
    print(f"\n| nodes verified | draft (EAGLE-2) | calibrated ({fit}) | pool ceiling |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['nodes']} | {row['draft']:.3f} | {row['calibrated']:.3f} | {row['ceiling']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(prompts=len(prompts), steps=len(steps), rows=rows,
                           calibration=[dict(bin=b, top=t, n=n, right=r) for (b, t), (n, r) in sorted(table.items())]),
                      f, indent=1)


if __name__ == "__main__":
    main()
