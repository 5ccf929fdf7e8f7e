"""Where a speculative step's time goes: drafting (the head over the newly committed tokens, then
one head run per tree depth), the target's verification forward, and the rest (acceptance, cache
compaction, bookkeeping). Plain decoding's one-token forward is timed in the same run, so the
overhead per step can be set against what a step saves. `eaglespec bench profile` runs it:

    eaglespec bench profile --questions ../shared/data/mt_bench/question.jsonl --limit 2 \
        --draft-weights int8 full --forward-scan 200
    eaglespec bench profile --prefill-scan 100 500 1000     # prompt prefill only

Timing wraps the drafter's and the target's methods (the engine's loop is not changed); on CUDA
it synchronizes around each phase, which a real run would not.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

from eaglespec.backends import draft_setup
from eaglespec.bench.run import Question
from eaglespec.draft import DraftHead
from eaglespec.drafter import EagleDrafter, NoDrafter, TreeConfig, tree_sizer
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.head_runner import EagleHeadRunner


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


class Tally:
    """Totals over one method's answers."""

    def __init__(self) -> None:
        self.seconds, self.tokens, self.steps, self.equal = 0.0, 0, 0, 0

    def add(self, result, baseline) -> None:
        self.seconds += result.stats.elapsed_s
        self.tokens += result.stats.new_tokens
        self.steps += len(result.stats.accept_lengths) or result.stats.new_tokens
        self.equal += result.token_ids == baseline.token_ids


def forward_s(total: dict[str, float], calls: dict[str, int], prefix: str, steps: int) -> float:
    """Seconds per decode-loop target forward (the prompt's prefill set apart)."""
    n = calls[prefix + "target forward (prefill included)"] - calls[prefix + "target prefill"]
    return (total[prefix + "target forward (prefill included)"] - total[prefix + "target prefill"]) / max(n, 1)


def instrument(clock: Clock, drafter: EagleDrafter, target) -> None:
    """Wrap the methods whose time we want, on these instances only (target: None when an earlier
    call wrapped it already)."""

    def wrap(obj, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            with clock.phase(label):
                return inner(*args, **kwargs)

        setattr(obj, name, timed)

    wrap(drafter, "propose", "draft: whole proposal")
    wrap(drafter.runner, "commit", "draft: head over committed tokens")
    wrap(drafter.runner, "step", "draft: head per tree depth")
    wrap(drafter.runner, "logprobs", "draft: LM head + log-softmax")
    if target is not None:
        wrap(target, "forward", "target forward (prefill included)")
        wrap(target, "prefill", "target prefill")
        wrap(target.cache, "compact", "cache compaction")


def first_plain_id(target) -> int:
    """Random prompts draw ids from here up: past the special tokens a vocabulary starts with."""
    return min(100, target.vocab_size // 2)


def forward_scan(target, context: int, reps: int = 12, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32)) -> str:
    """Median time of one target forward over q causal new tokens (a chain: the cost of a tree
    of q nodes), after `context` committed random tokens; sizes interleaved to share the drift."""
    g = torch.Generator().manual_seed(0)
    target.prefill(torch.randint(first_plain_id(target), target.vocab_size, (context,), generator=g).to(target.device))
    times: dict[int, list[float]] = {q: [] for q in sizes}
    for _ in range(reps):
        for q in sizes:
            tokens = torch.randint(first_plain_id(target), target.vocab_size, (q,), generator=g).to(target.device)
            mask = torch.ones(q, q, dtype=torch.bool, device=target.device).tril_() if q > 1 else None
            t0 = time.perf_counter()
            target.forward(tokens, tree_mask=mask)
            times[q].append(time.perf_counter() - t0)
    one = sorted(times[1])[reps // 2]
    return "\n".join([f"target forward after {context} tokens | " + " | ".join(f"q={q}" for q in sizes),
                      "|---" * (len(sizes) + 1) + "|",
                      "| ms | " + " | ".join(f"{1000 * sorted(times[q])[reps // 2]:.1f}" for q in sizes) + " |",
                      "| x one token | " + " | ".join(f"{sorted(times[q])[reps // 2] / one:.2f}" for q in sizes) + " |"])


def prefill_scan(target, lengths: list[int], reps: int = 5) -> str:
    """Median time of `Target.prefill` over random prompts of each length, with the prefill's sdpa
    (the default) and with the exact attention throughout; the two interleaved."""
    g = torch.Generator().manual_seed(0)
    lines = ["prompt tokens | exact attention (ms) | sdpa prefill (ms) | exact / sdpa", "|---|---|---|---|"]
    for n in lengths:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(reps):
            prompt = torch.randint(first_plain_id(target), target.vocab_size, (n,), generator=g).to(target.device)
            for fast in (True, False):
                target.sdpa_prefill = fast
                t0 = time.perf_counter()
                target.prefill(prompt)
                times[fast].append(time.perf_counter() - t0)
        target.sdpa_prefill = True
        exact, fast = (sorted(times[k])[reps // 2] for k in (False, True))
        lines.append(f"| {n} | {1000 * exact:.0f} | {1000 * fast:.0f} | {exact / fast:.2f}x |")
    return "\n".join(lines)


def profile_steps(target, head: DraftHead, tree: TreeConfig, questions: list[Question], cfg: GenerationConfig,
                  draft_weights: list[str]) -> str:
    """Plain decoding and EAGLE with each of `draft_weights` in turn on the first turn of every
    question, timed by phase; a markdown table of where a step's time goes."""
    clock = Clock(target.device)
    plain = Generator(target, NoDrafter())
    variants: dict[str, Generator] = {}
    for w in draft_weights:
        setup = draft_setup(target.device, target.dtype, w)
        drafter = EagleDrafter(EagleHeadRunner(head, target, setup), tree, sizer=tree_sizer(target, tree))
        instrument(clock, drafter, target if not variants else None)
        variants[w if w != "auto" else f"auto ({setup.weights})"] = Generator(target, drafter)
    for gen in (plain, *variants.values()):
        gen.generate("Hi", GenerationConfig(max_new_tokens=8))  # warm-up

    runs = {name: Tally() for name in ["plain", *variants]}
    for i, q in enumerate(questions):
        ids = plain.encode(q.turns[0])
        clock.active = True
        clock.prefix = "plain: "
        base = plain.generate(ids, cfg)
        runs["plain"].add(base, base)
        names = list(variants) if i % 2 == 0 else list(variants)[::-1]  # alternate who goes first
        for name in names:
            clock.prefix = f"{name}: "
            runs[name].add(variants[name].generate(ids, cfg), base)
        clock.active = False

    per_token = runs["plain"].seconds / runs["plain"].tokens
    tot, calls = clock.total, clock.calls
    lines = [f"{len(questions)} prompts, {cfg.max_new_tokens} new tokens, {str(target.dtype).removeprefix('torch.')}, "
             f"{torch.get_num_threads()} threads, tree top_k {tree.top_k} depth {tree.depth} total {tree.total_tokens} ({tree.sizing}) "
             f"min_prob {tree.min_prob}; variants run in turn on each prompt",
             f"plain: {1000 * per_token:.1f} ms/token ({1 / per_token:.2f} tok/s), one-token forward "
             f"{1000 * forward_s(tot, calls, 'plain: ', runs['plain'].steps):.1f} ms"]
    header = ["draft weights", "tok/s", "speedup", "tau", "ms/step (prefill included)", "break-even tau", "verification forward",
              "draft: whole proposal", "draft: head over committed tokens", "draft: head per tree depth",
              "draft: LM head + log-softmax", "cache compaction", "rest of the loop", "equal to plain"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in variants:
        r, pre = runs[name], f"{name}: "
        step_s = r.seconds / r.steps
        verify = forward_s(tot, calls, pre, r.steps)
        ms = lambda phase: 1000 * tot[pre + phase] / r.steps  # noqa: E731
        prefill = tot[pre + "target prefill"] / r.steps
        rest = step_s - verify - prefill - (tot[pre + "draft: whole proposal"] + tot[pre + "cache compaction"]) / r.steps
        cells = [name, f"{r.tokens / r.seconds:.2f}", f"{per_token * r.tokens / r.seconds:.2f}x", f"{r.tokens / r.steps:.2f}",
                 f"{1000 * step_s:.1f}", f"{step_s / per_token:.2f}", f"{1000 * verify:.1f}",
                 *(f"{ms(p):.1f}" for p in header[7:12]), f"{1000 * rest:.1f}", f"{r.equal}/{len(questions)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
