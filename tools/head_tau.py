"""What limits the shipped head's tau on the llama.cpp backend: its tau with a fixed dynamic tree
(every step drafts, so tau reflects the head, not the sizer), with the draft vocabulary chosen
otherwise or a prompt's hidden states cut to its last positions. Every answer is checked
against the first variant's, which must match (greedy; only the drafts differ).

    PYTHONPATH=src python tools/head_tau.py --questions ../shared/data/mt_bench/question.jsonl
    PYTHONPATH=src python tools/head_tau.py --gguf F32.gguf --questions ...
    PYTHONPATH=src python tools/head_tau.py --questions ... --vocab shipped answers:8192 answers:16384 full
    PYTHONPATH=src python tools/head_tau.py --questions ... --prompt-features all 64 16

answers:K drafts over the K tokens most frequent in the stored target-written answers
(data/answers); full over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def answer_counts(vocab_size: int) -> np.ndarray:
    """[V] how often each token occurs in the stored answers."""
    from eaglespec.train.answers import SHIPPED_STORE, store_chunks

    counts = np.zeros(vocab_size, dtype=np.int64)
    for f in store_chunks(SHIPPED_STORE):
        counts += np.bincount(np.load(f)["tokens"], minlength=vocab_size)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF target (default: the shipped SmolLM2 Q4_1 file)")
    parser.add_argument("--questions", required=True, help="MT-bench-style question.jsonl")
    parser.add_argument("--n", type=int, default=8, help="prompts: every 10th question, first turns")
    parser.add_argument("--categories", default=None, help="comma-separated categories to take questions from")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree", default="4,5,12", help="top_k,depth,nodes of the fixed dynamic tree")
    parser.add_argument("--vocab", nargs="+", default=["shipped"], help="shipped, answers:K or full")
    parser.add_argument("--prompt-features", nargs="+", default=["all"], help="all, or the last m prompt positions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from eaglespec.backends import draft_setup
    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
    from eaglespec.bench.run import load_questions, select
    from eaglespec.drafter import EagleDrafter, TreeConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_head
    from eaglespec.paths import default_gguf_path

    torch.set_num_threads(args.threads)
    target = LlamaCppTarget(args.gguf or default_gguf_path(), LlamaCppTargetConfig(threads=args.threads))
    top_k, depth, nodes = (int(x) for x in args.tree.split(","))
    tree = TreeConfig(kind="dynamic", top_k=top_k, depth=depth, total_tokens=nodes)
    rows = select(load_questions(args.questions), args.categories.split(",") if args.categories else None, None)
    prompts = [q.turns[0] for q in rows[::10][: args.n]]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    print(f"{target.gguf.name}, tree {args.tree}, {len(prompts)} prompts x {args.max_new_tokens} tokens")
    counts = answer_counts(target.vocab_size)
    reference = None
    for vocab in args.vocab:
        for window in args.prompt_features:
            head = load_head(default_head_path(), target.num_layers)
            if vocab == "full":
                head.set_vocab(torch.arange(target.vocab_size))
            elif vocab.startswith("answers:"):
                k = int(vocab.split(":")[1])
                head.set_vocab(torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:k])).long())
            covered = counts[head.draft_token_ids().numpy()].sum() / max(1, counts.sum())

            class Windowed(EagleDrafter):
                prompt_features = None if window == "all" else int(window)

            drafter = Windowed.from_head(head, target, tree, draft_setup("cpu", torch.float32))
            gen = Generator(target, drafter)
            accepted, answers, start = [], [], time.perf_counter()
            for p in prompts:
                answers.append(gen.generate(gen.encode(p), cfg).token_ids)
                accepted += gen.last_stats.accept_lengths
            reference = reference or answers
            print(f"vocab {vocab} ({head.draft_token_ids().shape[0]} tokens, {covered:.1%} of the answers' tokens), "
                  f"prompt features {window}: "
                  f"tau {sum(accepted) / len(accepted):.3f}, {time.perf_counter() - start:.1f} s, "
                  f"answers {'equal' if answers == reference else 'DIFFERENT'}", flush=True)
    target.close()


if __name__ == "__main__":
    main()
