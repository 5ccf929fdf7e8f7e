"""Where a speculative step's time goes, on the default model: drafting (the head over the newly
committed tokens, then one head run per tree depth), the target's verification forward, and the
rest (acceptance, cache compaction, bookkeeping). Plain decoding's one-token forward is timed in
the same run, so the overhead per step can be set against what a step saves.

    python scripts/step_profile.py --questions ../shared/data/mt_bench/question.jsonl --limit 1

Timing wraps the drafter's and the target's methods (the engine's loop is not changed); on CUDA
it synchronizes around each phase, which a real run would not.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

from eaglespec import DraftHead, EagleDrafter, GenerationConfig, Generator, NoDrafter, TreeConfig, load_target
from eaglespec.bench.run import builtin_questions, load_questions, select
from eaglespec.heads import default_head_path


class Clock:
    """Accumulates wall time per phase name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False  # tally only while set
        self.prefix = ""  # prepended to phase names (which run is being timed)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.total[self.prefix + name] += time.perf_counter() - t0
            self.calls[self.prefix + name] += 1

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


def instrument(clock: Clock, drafter: EagleDrafter, target) -> None:
    """Wrap the methods whose time we want, on these instances only."""

    def wrap(obj, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            with clock.phase(label):
                return inner(*args, **kwargs)

        setattr(obj, name, timed)

    wrap(drafter, "propose", "draft: whole proposal")
    wrap(drafter, "_commit_pending", "draft: head over committed tokens")
    wrap(drafter, "_tree_step", "draft: head per tree depth")
    wrap(drafter, "_logprobs", "draft: LM head + log-softmax")
    wrap(target, "forward", "target forward (prefill included)")
    wrap(target, "prefill", "target prefill")
    wrap(target.cache, "compact", "cache compaction")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="sharegpt", help="a question file (MT-bench / Spec-Bench JSONL) or 'sharegpt'")
    ap.add_argument("--limit", type=int, default=1, help="questions per category")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft", default=None, help="head folder (default: the shipped head)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=TreeConfig.top_k)
    ap.add_argument("--depth", type=int, default=TreeConfig.depth)
    ap.add_argument("--total-tokens", type=int, default=TreeConfig.total_tokens)
    ap.add_argument("--draft-weights", default="auto", choices=["auto", "int8", "full"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.questions == "sharegpt":
        questions = builtin_questions("sharegpt", args.limit)
    else:
        questions = select(load_questions(args.questions), None, args.limit)
    target = load_target(dtype=args.dtype)
    head = DraftHead.from_pretrained(args.draft or default_head_path())
    tree = TreeConfig(kind="dynamic", top_k=args.top_k, depth=args.depth, total_tokens=args.total_tokens)
    drafter = EagleDrafter(head, target, tree, weights=args.draft_weights)
    plain, eagle = Generator(target, NoDrafter()), Generator(target, drafter)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)

    clock = Clock(target.device)
    instrument(clock, drafter, target)
    plain.generate("Hi", GenerationConfig(max_new_tokens=8))  # warm-up
    eagle.generate("Hi", GenerationConfig(max_new_tokens=8))
    clock.reset()

    plain_s = plain_tokens = eagle_s = 0.0
    steps = accepted = equal = 0
    for q in questions:
        ids = plain.encode(q.turns[0])
        clock.active, clock.prefix = True, "plain: "
        r = plain.generate(ids, cfg)
        clock.prefix = ""
        e = eagle.generate(ids, cfg)
        clock.active = False
        plain_s += r.stats.elapsed_s
        plain_tokens += r.stats.new_tokens
        eagle_s += e.stats.elapsed_s
        steps += len(e.stats.accept_lengths)
        accepted += sum(e.stats.accept_lengths)
        equal += e.token_ids == r.token_ids

    per_token = plain_s / plain_tokens
    step_s = eagle_s / steps
    print(f"{len(questions)} prompts, {args.max_new_tokens} new tokens, {args.dtype}, {args.threads} threads, "
          f"tree top_k {args.top_k} depth {args.depth} total {args.total_tokens}, "
          f"{'int8' if drafter.int8 else 'full'} draft weights; {equal}/{len(questions)} equal to plain")
    print(f"plain: {1000 * per_token:.1f} ms/token ({1 / per_token:.2f} tok/s)")
    print(f"eagle: {1000 * step_s:.1f} ms/step, tau {accepted / steps:.2f}, {accepted / eagle_s:.2f} tok/s, "
          f"speedup {per_token * accepted / eagle_s:.2f}x; break-even tau {step_s / per_token:.2f}")
    tot, calls = clock.total, clock.calls
    plain_fwd = (tot["plain: target forward (prefill included)"] - tot["plain: target prefill"]) / (
        calls["plain: target forward (prefill included)"] - calls["plain: target prefill"])
    verify = (tot["target forward (prefill included)"] - tot["target prefill"]) / steps
    print(f"target forward over 1 token (plain decoding): {1000 * plain_fwd:.1f} ms; "
          f"over the tree (verification): {1000 * verify:.1f} ms")
    print("| phase | ms per step | calls per step |\n|---|---|---|")
    names = ["draft: whole proposal", "draft: head over committed tokens", "draft: head per tree depth",
             "draft: LM head + log-softmax", "cache compaction", "target prefill"]
    print(f"| verification forward | {1000 * verify:.1f} | 1.00 |")
    for name in names:
        print(f"| {name} | {1000 * tot[name] / steps:.1f} | {calls[name] / steps:.2f} |")
    rest = step_s - verify - (tot["draft: whole proposal"] + tot["cache compaction"] + tot["target prefill"]) / steps
    print(f"| rest of the loop (acceptance, observe, bookkeeping) | {1000 * rest:.1f} | |")


if __name__ == "__main__":
    main()
