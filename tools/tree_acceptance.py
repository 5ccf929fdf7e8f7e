"""How often the head's tree nodes are accepted against their path confidence, on the default
model's llama.cpp backend: for every node the head's own tree verified (a prompt-lookup chain
hung below it left out), its confidence p (the product of draft probabilities along its path),
its depth and whether the target accepted it. Prints acceptance over mean p by confidence bin and
by depth (1.0: calibrated), and, with a cost-sized tree, the calibration the sizer ended with and
averaged over its drafted steps.

With a fixed tree (--total-tokens N) every step verifies the N - 1 best candidates, so the same
steps also say what keeping only the n best would have accepted (a kept node's ancestors score
higher, so the n best are a tree). Each n's tau is then weighed by a cost curve measured now and
the head's runs as timed here: the modelled speed over plain decoding of every fixed size and of
a per-step choice by the confidences (`TreeSizer.best`'s rule, calibration 1), no rests.

    PYTHONPATH=src python tools/tree_acceptance.py --gguf F32.gguf --questions ../shared/data/mt_bench/question.jsonl --lookup 8
    PYTHONPATH=src python tools/tree_acceptance.py --gguf F32.gguf --questions ... --total-tokens 16

Keep other jobs off the machine while it measures the cost curve.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

#: upper edges of the confidence bins, descending
BINS = (1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.0)


@dataclass
class Step:
    """One verified tree: its nodes' confidences and depths (root excluded), which were accepted."""

    p: list[float]
    depth: list[int]
    accepted: list[bool]


def accepted_nodes(tokens: list[int], parents: list[int], committed: list[int]) -> set[int]:
    """The tree nodes on the accepted path: `committed` (the tokens after the root, bonus excluded)
    followed down from the root while they match a child (`tree.walk_chain`), then the last
    node's ancestors."""
    from eaglespec.tree import walk_chain

    node, _ = walk_chain(tokens, parents, committed)
    on_path = set()
    while node > 0:
        on_path.add(node)
        node = parents[node]
    return on_path


def table(rows: list[tuple[float, int, bool]], key, labels) -> None:
    print(f"{'':>12} {'nodes':>7} {'mean p':>7} {'accepted':>9} {'ratio':>6}")
    for label, pick in labels:
        sel = [r for r in rows if pick(key(r))]
        if sel:
            mp = statistics.fmean(r[0] for r in sel)
            ma = statistics.fmean(float(r[2]) for r in sel)
            print(f"{label:>12} {len(sel):7d} {mp:7.3f} {ma:9.3f} {ma / mp:6.2f}")


def main() -> None:
    from eaglespec.bench.run import add_tool_arguments, spread_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_arguments(parser)
    parser.add_argument("--lookup", type=int, default=0, help="lookup chain length (8: the generate default)")
    parser.add_argument("--total-tokens", type=int, default=None,
                        help="a fixed tree of this many nodes, root included (default: the cost-sized tree)")
    args = parser.parse_args()

    import eaglespec.expand as expand
    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
    from eaglespec.cost import TreeSizer, measure_cost_curve
    from eaglespec.drafter import EagleDrafter
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter
    from eaglespec.paths import default_gguf_path

    torch.set_num_threads(args.threads)
    target = LlamaCppTarget(args.gguf or default_gguf_path(), LlamaCppTargetConfig(threads=args.threads))
    tree = default_tree("cpu", torch.float32, total_tokens=args.total_tokens)
    drafter = load_drafter(default_head_path(), target, tree, draft_setup("cpu", torch.float32, "auto"),
                           lookup=args.lookup, remember=False)
    eagle: EagleDrafter = getattr(drafter, "eagle", drafter)
    print(tree)

    # the kept nodes' confidences, from the dynamic tree's selection (creation order = tree order)
    last: dict = {}
    select = expand.select_dynamic

    def recording_select(scores, parents, tokens, *a, **kw):
        drafted, kept = select(scores, parents, tokens, *a, **kw)
        last["tree"], last["p"] = drafted, scores[kept].exp().tolist()
        return drafted, kept

    expand.select_dynamic = recording_select
    steps: list[Step] = []
    observe = eagle.observe

    def recording_observe(tokens, features):
        drafted = last.pop("tree", None)
        if drafted is not None:
            on_path = accepted_nodes(drafted.tokens.tolist(), drafted.parents.tolist(), tokens[:-1].tolist())
            n = drafted.size
            steps.append(Step(last.pop("p"), drafted.depths.tolist()[1:], [i in on_path for i in range(1, n)]))
        observe(tokens, features)

    eagle.observe = recording_observe
    # the head's runs, timed: commit (the accepted tokens, then depth 1's output), step (a depth), logprobs
    timed: dict[str, list[float]] = {"commit": [], "step": [], "logprobs": []}
    for name in timed:
        def timing(*a, _inner=getattr(eagle.runner, name), _name=name, **kw):
            start = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                timed[_name].append(time.perf_counter() - start)
        setattr(eagle.runner, name, timing)
    sizer = eagle.sizer
    scales: list[float] = []
    if sizer is not None:
        record = sizer.record_accepted

        def recording_accepted(accepted, tree_accepted=None):
            drafted = sizer.pending is not None
            record(accepted) if tree_accepted is None else record(accepted, tree_accepted)
            if drafted:
                scales.append(sizer.scale)

        sizer.record_accepted = recording_accepted

    prompts = spread_prompts(args.questions, args.n)
    spec = Generator(target, drafter)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for prompt in prompts:
        spec.generate(spec.encode(prompt), cfg)

    nodes = [(p, d, a) for s in steps for p, d, a in zip(s.p, s.depth, s.accepted)]
    print(f"{len(steps)} drafted steps, {len(nodes)} verified tree nodes")
    print("by confidence:")
    table(nodes, lambda r: r[0], [(f"{lo:.2f}-{hi:.2f}", lambda p, lo=lo, hi=hi: lo < p <= hi)
                                  for hi, lo in zip(BINS, BINS[1:])])
    print("by depth:")
    table(nodes, lambda r: r[1], [(str(d), lambda x, d=d: x == d) for d in range(1, tree.depth + 1)])
    total_p, total_a = sum(r[0] for r in nodes), sum(r[2] for r in nodes)
    print(f"all nodes: accepted {total_a} against {total_p:.1f} expected by confidence, ratio {total_a / total_p:.2f}")
    if scales:
        print(f"sizer calibration: {sizer.scale:.2f} at the end, {statistics.fmean(scales):.2f} on average over "
              f"{len(scales)} drafted steps; {sizer.rested} steps rested")
    if args.total_tokens is None:
        return

    # what keeping the n best would have done on the same steps, weighed by the cost measured now
    curve = measure_cost_curve(target, sizes=(1, 2, 3, 4, 6, 8, 12, 16), repeats=9)
    commit_s, step_s, logprobs_s = (statistics.median(timed[k]) for k in ("commit", "step", "logprobs"))
    one = curve.at(1)
    print(f"cost curve now (x one token of {1000 * one:.2f} ms): "
          + ", ".join(f"{q}: {s / one:.2f}" for q, s in zip(curve.sizes, curve.seconds)))
    print(f"head runs (median ms): commit {1000 * commit_s:.2f}, depth {1000 * step_s:.2f}, logprobs {1000 * logprobs_s:.2f}")

    def draft_s(depth: int) -> float:  # the commit and depth 1's logprobs, then a run and logprobs per depth
        return commit_s + logprobs_s + max(depth - 1, 0) * (step_s + logprobs_s)

    full = [s for s in steps if len(s.p) == args.total_tokens - 1]
    ranked = [sorted(zip(s.p, s.depth, s.accepted), key=lambda r: -r[0]) for s in full]
    print(f"{'kept':>5} {'tau':>5} {'step ms':>8} {'x plain':>8}")
    for n in range(0, args.total_tokens):
        tokens = [1 + sum(a for _, _, a in r[:n]) for r in ranked]
        seconds = [curve.at(n + 1) + (draft_s(max(d for _, d, _ in r[:n])) if n else 0.0) for r in ranked]
        print(f"{n:5d} {statistics.fmean(tokens):5.2f} {1000 * statistics.fmean(seconds):8.2f} "
              f"{sum(tokens) / sum(seconds) * one:8.3f}")
    chooser = TreeSizer(curve, args.total_tokens - 1, calibrate=False)
    tokens = seconds = 0.0
    for r in ranked:
        best, best_rate = 0, 1.0 / (one + draft_s(1))
        for n in range(1, len(r) + 1):
            rate = (1 + sum(p for p, _, _ in r[:n])) / (chooser.cost(n) + draft_s(max(d for _, d, _ in r[:n])))
            if rate > best_rate:
                best, best_rate = n, rate
        tokens += 1 + sum(a for _, _, a in r[:best])
        seconds += chooser.cost(best) + draft_s(max([d for _, d, _ in r[:best]], default=1))
    print(f"per-step choice by confidence: tau {tokens / len(ranked):.2f}, {tokens / seconds * one:.3f}x plain")


if __name__ == "__main__":
    main()
