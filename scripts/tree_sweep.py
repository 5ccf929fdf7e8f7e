"""Sweep draft-tree shapes on the default model and print speedup and tau for each, measured side
by side with plain decoding (interleaved per prompt) on held-out ShareGPT `val` prompts. Used to choose TreeConfig's CPU defaults.

    python scripts/tree_sweep.py --draft src/eaglespec/heads/smollm2-135m-instruct --prompts 6
    python scripts/tree_sweep.py --questions ../shared/data/mt_bench/question.jsonl --prompts 8 --dtype bfloat16 \
        --grid 4,5,16 3,5,12 3,4,10 2,5,10

--grid takes dynamic trees as top_k,depth,total_tokens (default: the grid below), optionally with a
fourth number: the length of a prompt-lookup chain grafted into the tree (as `generate --lookup`),
and a fifth: the tree's confidence floor (TreeConfig.min_prob), e.g. 3,6,12,0,0.05.
"""

from __future__ import annotations

import argparse

import torch

from eaglespec import DraftHead, EagleDrafter, GenerationConfig, Generator, NoDrafter, TreeConfig, load_target
from eaglespec.drafter import HybridDrafter, PromptLookupDrafter
from eaglespec.bench.run import load_questions
from eaglespec.heads import default_head_path
from eaglespec.train.data import heldout_prompts

GRID = [
    TreeConfig(kind="static", static_tree="cpu_small"),
    TreeConfig(kind="static", static_tree="mc_sim_7b_63"),
    TreeConfig(kind="dynamic", top_k=2, depth=4, total_tokens=8),
    TreeConfig(kind="dynamic", top_k=4, depth=5, total_tokens=16),
    TreeConfig(kind="dynamic", top_k=4, depth=6, total_tokens=20),
    TreeConfig(kind="dynamic", top_k=4, depth=7, total_tokens=24),
    TreeConfig(kind="dynamic", top_k=6, depth=7, total_tokens=32),
    TreeConfig(kind="dynamic", top_k=6, depth=6, total_tokens=24),
    TreeConfig(kind="dynamic", top_k=8, depth=6, total_tokens=32),
    TreeConfig(kind="dynamic", top_k=10, depth=6, total_tokens=60),  # EAGLE-2's GPU setting
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--questions", default=None,
                    help="MT-bench / Spec-Bench question file: first turns, one per category in turn (default: ShareGPT val)")
    ap.add_argument("--grid", nargs="+", default=None, metavar="K,D,N[,L[,P]]",
                    help="dynamic trees top_k,depth,total_tokens[,lookup chain length[,min_prob]]")
    ap.add_argument("--draft-weights", default="auto", choices=["auto", "int8", "full"])
    args = ap.parse_args()
    grid, lookups = GRID, [0] * len(GRID)
    if args.grid is not None:
        specs = [g.split(",") for g in args.grid]
        if any(len(v) not in (3, 4, 5) for v in specs):
            ap.error("--grid entries are K,D,N or K,D,N,L or K,D,N,L,P")
        grid = [TreeConfig(kind="dynamic", top_k=int(v[0]), depth=int(v[1]), total_tokens=int(v[2]),
                           min_prob=float(v[4]) if len(v) == 5 else 0.0) for v in specs]
        lookups = [int(v[3]) if len(v) >= 4 else 0 for v in specs]
    torch.set_num_threads(2)
    target = load_target(dtype=args.dtype)
    head = DraftHead.from_pretrained(args.draft or default_head_path())
    # first turns of the ShareGPT `val` split whose prompt opens no training row: never trained on
    if args.questions:
        qs = load_questions(args.questions)
        by_cat: dict[str, list[str]] = {}
        for q in qs:
            by_cat.setdefault(q.category, []).append(q.turns[0])
        rounds = max(len(v) for v in by_cat.values())
        prompts = [v[i] for i in range(rounds) for v in by_cat.values() if i < len(v)][: args.prompts]
    else:
        prompts = [turns[0] for _, turns in heldout_prompts("val") if len(turns[0]) < 600][: args.prompts]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    plain = Generator(target, NoDrafter())
    def drafter(tc: TreeConfig, lookup: int):
        eagle = EagleDrafter(head, target, tc, weights=args.draft_weights)
        return HybridDrafter(eagle, PromptLookupDrafter(num_tokens=lookup)) if lookup else eagle

    engines = [(tc, Generator(target, drafter(tc, n))) for tc, n in zip(grid, lookups)]
    plain.generate("Hi", GenerationConfig(max_new_tokens=8))
    tps = {i: [] for i in range(len(grid))}
    taus = {i: [] for i in range(len(grid))}
    equal = {i: 0 for i in range(len(grid))}
    nodes = {i: [] for i in range(len(grid))}
    base = []
    for p in prompts:
        ids = plain.encode(p)
        r = plain.generate(ids, cfg)
        base.append(r.stats.tokens_per_s)
        for i, (_, eng) in enumerate(engines):
            s = eng.generate(ids, cfg)
            if args.dtype in ("float32", "fp32"):
                assert s.token_ids == r.token_ids, "lossless check failed in fp32"
            equal[i] += s.token_ids == r.token_ids  # bf16: tree and one-token forwards round differently
            tps[i].append(s.stats.tokens_per_s)
            taus[i].append(s.stats.mean_accept_len)
            nodes[i].extend(s.stats.tree_sizes)
    b = sum(base) / len(base)
    print(f"plain: {b:.2f} tok/s over {len(prompts)} prompts, {args.dtype}")
    print("| tree | tok/s | speedup | tau | nodes verified per step | equal to plain |\n|---|---|---|---|---|---|")
    for i, (tc, _) in enumerate(engines):
        shape = tc.static_tree if tc.kind == "static" else f"top_k {tc.top_k}, depth {tc.depth}, total {tc.total_tokens}"
        shape += f", min_prob {tc.min_prob}" if tc.min_prob else ""
        shape += f" + lookup {lookups[i]}" if lookups[i] else ""
        m = sum(tps[i]) / len(tps[i])
        print(f"| {tc.kind} {shape} | {m:.2f} | {m / b:.2f}x | {sum(taus[i]) / len(taus[i]):.2f} | {sum(nodes[i]) / len(nodes[i]):.1f} | {equal[i]}/{len(prompts)} |")


if __name__ == "__main__":
    main()
