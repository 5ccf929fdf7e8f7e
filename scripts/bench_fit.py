"""Where a head loses acceptance on a benchmark: in its guesses, or in the engine's tree?

For each question's first turn the engine decodes greedily with the head, as `eaglespec bench`
runs it (the dynamic tree with the target's default size and floor; lossless, so the answer is the
target's own), and records its tau. The target then runs over prompt + answer, and
`simulate_chains` drafts a chain of 5 from the same head at every 16th answer position, as the
trainer's validation does on held-out ShareGPT rows. Both per category, plus the same chains with
each extra tree given by --tree.

The chain tau on benchmark answers against the trainer's held-out figure separates "these prompts
are unlike the training data" (both low) from "the engine draws less from the head than its
guesses allow" (chain tau high, engine tau low).

    python scripts/bench_fit.py src/eaglespec/heads/smollm2-135m-instruct \\
        --questions ../shared/data/mt_bench/question.jsonl --limit 4 --tree 4,5,16,0
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from eaglespec.bench.run import BUILTIN_SETS, builtin_questions, load_questions, select
from eaglespec.draft import DraftHead
from eaglespec.drafter import EagleDrafter, default_tree
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.target import load_target
from eaglespec.train.features import row_features
from eaglespec.train.trainer import FrozenTargetParts, simulate_chains


def parse_tree(text: str) -> tuple[int, int, int, float]:
    """'top_k,depth,total,floor' -> the four numbers."""
    k, d, n, f = text.split(",")
    return int(k), int(d), int(n), float(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("head", type=Path)
    ap.add_argument("--model", default=None,
                    help="the head's target: transformers folder or .gguf file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--questions", required=True, help="MT-bench / Spec-Bench question.jsonl, or a built-in set: sharegpt (held-out ShareGPT prompts)")
    ap.add_argument("--limit", type=int, default=4, help="questions per category")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tree", action="append", default=[], metavar="K,DEPTH,TOTAL,FLOOR",
                    help="another dynamic tree to decode with (repeatable), e.g. 4,5,16,0")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-len", type=int, default=4096, help="KV cache length: prompt + new tokens + tree")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="leave out longer prompts (the head's training rows have prompts of at most 512)")
    ap.add_argument("--out", type=Path, help="write the per-question figures here (JSON)")
    args = ap.parse_args()

    target = load_target(args.model, dtype=args.dtype, max_len=args.max_len)
    head = DraftHead.from_pretrained(args.head)  # for the simulation, in float32
    parts = FrozenTargetParts.from_target(target)
    vocab_ids = head.draft_token_ids()
    lm_draft = parts.lm_head[vocab_ids]
    base = default_tree(target.device, target.dtype, kind="dynamic")
    trees = {"default": base}
    for t in args.tree:
        k, d, n, f = parse_tree(t)
        trees[t] = replace(base, top_k=k, depth=d, total_tokens=n, min_prob=f)
    gens = {name: Generator(target, EagleDrafter(DraftHead.from_pretrained(args.head), target, tree)) for name, tree in trees.items()}
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    if args.questions in BUILTIN_SETS:
        questions = builtin_questions(args.questions, args.limit)
    else:
        questions = select(load_questions(args.questions), None, args.limit)

    per_q = []
    t0 = time.time()
    for i, q in enumerate(questions):
        prompt = gens["default"].encode(q.turns[0])
        if args.max_prompt_tokens and prompt.shape[0] > args.max_prompt_tokens:
            print(f"[{i + 1}/{len(questions)}] {q.question_id}: prompt of {prompt.shape[0]} tokens left out", flush=True)
            continue
        rec = {"question_id": q.question_id, "category": q.category}
        answer = None
        for name, gen in gens.items():
            tokens = [t for chunk in gen.generate_ids(prompt, cfg) for t in chunk]
            if answer is not None and tokens != answer:
                raise SystemExit(f"question {q.question_id}: tree {name} decoded other tokens than the default tree")
            answer = tokens
            rec[f"engine {name}"] = gen.last_stats.mean_accept_len
        ids = prompt.tolist() + answer
        with torch.inference_mode():
            feats = row_features(target, ids).to(torch.bfloat16).cpu()
        mask = torch.zeros(len(ids), dtype=torch.long)
        mask[prompt.shape[0]:] = 1
        row = {"input_ids": torch.tensor(ids), "loss_mask": mask, "features": feats}
        with torch.no_grad():
            sim = simulate_chains(head, parts, lm_draft, vocab_ids, [row])
        rec["chain (simulated)"] = sim["sim_tau"]
        rec["step_acc"] = sim["step_acc"]
        per_q.append(rec)
        print(f"[{i + 1}/{len(questions)}, {time.time() - t0:.0f} s] {q.category} {q.question_id}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if isinstance(v, float)), flush=True)

    cols = [k for k in per_q[0] if isinstance(per_q[0][k], float)]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in per_q:
        groups[r["category"]].append(r)
    groups["overall"] = per_q
    print("\n| category | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for cat, rs in groups.items():
        print(f"| {cat} | " + " | ".join(f"{sum(r[c] for r in rs) / len(rs):.2f}" for c in cols) + " |")
    if args.out:
        args.out.write_text(json.dumps({"head": str(args.head), "trees": {k: str(v) for k, v in trees.items()},
                                        "questions": per_q}, indent=1))


if __name__ == "__main__":
    main()
