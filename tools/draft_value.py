"""What the head's drafts are worth beside the prompt-lookup chain, by the length of the chain's
match: the default drafter (the head's cost-sized tree with the chain grafted in) run three ways
over the same prompts on the llama.cpp backend, and plain decoding between them.

    PYTHONPATH=src python tools/draft_value.py --gguf F32.gguf --questions ../shared/data/mt_bench/question.jsonl
    PYTHONPATH=src python tools/draft_value.py --questions ...   # the shipped Q4_1 file

The three ways: `default` (the head rests where its drafts have paid less than the chain alone),
`always` (the head drafts every step, the sizer still choosing how many of its nodes to verify),
`never` (the chain alone, weighed by the sizer, as on a resting step). Each step is put in the
class of the match that found its chain (0: none, n: the last n tokens occurred before) and timed
from the proposal to the end of `observe` (the target's forward, acceptance, the drafter's
bookkeeping); the runs' wall times are printed too. Per class: steps, tokens a step, ms a step (the
head's catch-up and proposal among them) and tokens per second, and `always` as if the head's runs
took no time (what a cheaper head with the same guesses and tree sizes would reach at most). So
whether drafting pays where the chain found nothing, and where it found a long match, is read off
measured steps rather than a cost model. The last line combines, per class, the faster of `always`
and `never` (rates weighted by the tokens of the `never` run): what a drafter that rested per
class, rather than all at once, could reach at most on these prompts.
Keep other jobs off the machine.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

MODES = ("default", "always", "never")


@dataclass
class ClassSums:
    """Steps, tokens committed and seconds of one match class; of those seconds, the head's
    (its catch-up and proposal, as the sizer timed them)."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    head_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class StepLog:
    """Per-class sums of a drafter's steps: wrappers around its propose and observe, put in place
    for one mode's runs."""

    classes: dict[int, ClassSums] = field(default_factory=lambda: defaultdict(ClassSums))
    _start: float | None = None
    _matched: int = 0
    _head_s: float = 0.0

    def attach(self, drafter, mode: str) -> None:
        sizer, inner_propose, inner_observe = drafter.sizer, drafter.propose, drafter.observe
        should_draft = type(sizer).should_draft.__get__(sizer)

        def forced() -> bool:  # rest every step (never), or none (always); should_draft keeps the books
            sizer._rest_left = max(sizer._rest_left, 1) if mode == "never" else 0
            return should_draft()

        def propose(root: torch.Tensor):
            self._start = time.perf_counter()
            tree = inner_propose(root)
            self._matched = drafter.lookup.matched
            self._head_s = sizer.last_draft_s + sizer._catch_up_s if sizer.pending is not None else 0.0
            return tree

        def observe(tokens: torch.Tensor, features: torch.Tensor) -> None:
            inner_observe(tokens, features)
            if self._start is not None:
                sums = self.classes[self._matched]
                sums.steps += 1
                sums.tokens += tokens.shape[0]
                sums.seconds += time.perf_counter() - self._start
                sums.head_s += self._head_s
                self._start = None

        if mode != "default":
            sizer.should_draft = forced
        drafter.propose, drafter.observe = propose, observe


def main() -> None:
    from eaglespec.bench.run import add_tool_arguments, spread_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_arguments(parser)
    parser.add_argument("--lookup", type=int, default=8, help="lookup chain length (8: the generate default)")
    args = parser.parse_args()

    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter
    from eaglespec.lookup import HybridDrafter
    from eaglespec.paths import default_gguf_path

    torch.set_num_threads(args.threads)
    target = LlamaCppTarget(args.gguf or default_gguf_path(), LlamaCppTargetConfig(threads=args.threads))
    plain = Generator(target)
    runs, logs = {}, {}
    for mode in MODES:
        drafter = load_drafter(default_head_path(), target, default_tree("cpu", torch.float32),
                               draft_setup("cpu", torch.float32, "auto"), lookup=args.lookup, remember=False)
        if not isinstance(drafter, HybridDrafter) or drafter.sizer is None:
            raise SystemExit("the default drafter here is not a cost-sized tree with a lookup chain")
        logs[mode] = StepLog()
        runs[mode] = Generator(target, drafter)
    prompts = spread_prompts(args.questions, args.n)
    ids = [plain.encode(p) for p in prompts]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for run in (plain, *runs.values()):  # warm-up: llama.cpp's graphs, the head's first runs
        run.generate(ids[0], cfg)
    for mode, run in runs.items():
        logs[mode].attach(run.drafter, mode)
    wall = dict.fromkeys(("plain", *MODES), 0.0)
    tokens = dict.fromkeys(wall, 0)
    for i in ids:  # interleaved, so load elsewhere hits every way alike
        for name, run in (("plain", plain), *runs.items()):
            start = time.perf_counter()
            run.generate(i, cfg)
            wall[name] += time.perf_counter() - start
            tokens[name] += run.last_stats.new_tokens
    rate = {k: tokens[k] / wall[k] for k in wall}
    print(f"{len(ids)} prompts x {args.max_new_tokens} tokens, wall tokens/s: "
          + ", ".join(f"{k} {rate[k]:.1f} ({rate[k] / rate['plain']:.3f}x)" for k in wall))
    print("by the chain's match (0: none): steps, tokens a step, ms a step (of them the head's), tokens/s")
    for m in sorted(set().union(*(log.classes for log in logs.values()))):
        cells = []
        for mode in MODES:
            s = logs[mode].classes.get(m, ClassSums())
            n = max(s.steps, 1)
            cells.append(f"{mode} {s.steps:4d} {s.tokens / n:5.2f} {1000 * s.seconds / n:6.2f} "
                         f"({1000 * s.head_s / n:4.2f}) {s.rate:6.1f}")
        a = logs["always"].classes.get(m, ClassSums())
        free = a.tokens / (a.seconds - a.head_s) if a.seconds > a.head_s else 0.0
        print(f"  match {m}: " + " | ".join(cells) + f" | always, the head's time left out: {free:6.1f}")
    # the faster way per class, for the tokens the chain alone committed in that class
    never, always = logs["never"].classes, logs["always"].classes
    tokens_never = sum(s.tokens for s in never.values())
    seconds_never = sum(s.seconds for s in never.values())
    seconds_best = sum(s.tokens / max(s.rate, always.get(m, ClassSums()).rate) for m, s in never.items())
    if seconds_best:
        print(f"in the steps, tokens/s: the chain alone {tokens_never / seconds_never:.1f}, the faster way per "
              f"class {tokens_never / seconds_best:.1f} ({seconds_never / seconds_best:.3f}x)")


if __name__ == "__main__":
    main()
