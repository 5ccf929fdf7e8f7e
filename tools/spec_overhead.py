"""What speculation costs where it does not pay: plain decoding against the shipped head's default
drafter on the llama.cpp backend, the same prompts one after the other, and cProfile's busiest
functions of the speculative runs. Where every verified row costs nearly a forward (Q4_1 on an
AVX2 CPU) the drafter rests most steps, and this shows what resting and the probes between rests
still cost.

    PYTHONPATH=src python tools/spec_overhead.py --questions ../shared/data/mt_bench/question.jsonl
    PYTHONPATH=src python tools/spec_overhead.py --gguf F32.gguf --lookup 8 --draft-weights int8
    PYTHONPATH=src python tools/spec_overhead.py --lookup 8 --no-profile   # the ratio alone, unprofiled
    PYTHONPATH=src python tools/spec_overhead.py --lookup 8 --no-profile --fresh [--forget]   # as separate processes
    PYTHONPATH=src python tools/spec_overhead.py --gguf F32.gguf --lookup 8 --no-profile --parts   # a step's parts

Prints the seconds of each and their ratio, split into llama.cpp's decodes and the rest (Python,
the head, the tree); the sizer's state (steps rested, the rates it learnt, the draft times) and the
profile. With --parts, also the wall time of each part of the speculative steps (calls, ms per
call: the head's commit and tree steps, the expansion, selection, the chain's graft, acceptance),
timed around the calls themselves, so in place, after each target forward, as users run them.
Keep other jobs off the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def main() -> None:
    from eaglespec.bench.run import add_tool_arguments, spread_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_arguments(parser)
    parser.add_argument("--lookup", type=int, default=0, help="lookup chain length (8: the generate default)")
    parser.add_argument("--draft-weights", choices=("auto", "int8", "fp16", "full"), default="auto",
                        help="the head's weight layout (eaglespec.backends.draft_setup)")
    parser.add_argument("--top", type=int, default=15, help="profile lines to print")
    parser.add_argument("--parts", action="store_true", help="time the parts of the speculative steps")
    parser.add_argument("--no-profile", action="store_true", help="time the speculative runs without cProfile")
    parser.add_argument("--fresh", action="store_true",
                        help="a new drafter for each prompt, as each `eaglespec generate` process starts one")
    parser.add_argument("--forget", action="store_true",
                        help="drafters start afresh instead of from the last one's sizer state (SizerMemory)")
    args = parser.parse_args()

    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter
    from eaglespec.paths import default_gguf_path

    torch.set_num_threads(args.threads)
    target = LlamaCppTarget(args.gguf or default_gguf_path(), LlamaCppTargetConfig(threads=args.threads))
    def new_drafter():
        return load_drafter(default_head_path(), target, default_tree("cpu", torch.float32),
                            draft_setup("cpu", torch.float32, args.draft_weights), lookup=args.lookup,
                            remember=not args.forget)

    drafter = new_drafter()
    plain, spec = Generator(target), Generator(target, drafter)
    decode_s = [0.0]  # seconds inside llama.cpp's decodes (`LlamaCppTarget._decode`), all runs

    def timed_decode(*a, _inner=target._decode, **kw):
        start = time.perf_counter()
        try:
            return _inner(*a, **kw)
        finally:
            decode_s[0] += time.perf_counter() - start

    target._decode = timed_decode
    parts = StepParts() if args.parts else None
    prompts = spread_prompts(args.questions, args.n)
    ids = [plain.encode(p) for p in prompts]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for i in ids[:2]:  # warm-up: the head's first runs, llama.cpp's graphs
        plain.generate(i, cfg)
        spec.generate(i, cfg)
    profile = cProfile.Profile()
    plain_s = spec_s = plain_decode_s = spec_decode_s = 0.0
    forwards = new = 0
    sizer = getattr(drafter, "sizer", None)
    rested = 0  # steps rested in the timed runs (not the warm-up's)
    for i in ids:  # alternating, so load elsewhere hits both alike
        if args.fresh:
            drafter = new_drafter()
            spec = Generator(target, drafter)
            sizer = getattr(drafter, "sizer", None)
        rested_before = sizer.rested if sizer is not None else 0
        start, decoded = time.perf_counter(), decode_s[0]
        plain.generate(i, cfg)
        plain_s += time.perf_counter() - start
        plain_decode_s += decode_s[0] - decoded
        if not args.no_profile:
            profile.enable()
        if parts is not None:
            parts.attach(drafter)
        start, decoded = time.perf_counter(), decode_s[0]
        spec.generate(i, cfg)
        if parts is not None:
            parts.detach()
        spec_s += time.perf_counter() - start
        spec_decode_s += decode_s[0] - decoded
        rested += sizer.rested - rested_before if sizer is not None else 0
        profile.disable()
        forwards += spec.last_stats.target_forwards
        new += spec.last_stats.new_tokens
    print(f"{len(ids)} prompts x {args.max_new_tokens} tokens: plain {plain_s:.3f} s, speculative {spec_s:.3f} s, "
          f"speculative/plain speed {plain_s / spec_s:.3f}x"
          f"{'' if args.no_profile else ' (the speculative runs under cProfile)'}; "
          f"tau {new / forwards:.2f} over {forwards} target forwards")
    print(f"inside llama.cpp's decodes: plain {plain_decode_s:.3f} s (the rest {plain_s - plain_decode_s:.3f} s), "
          f"speculative {spec_decode_s:.3f} s (the rest {spec_s - spec_decode_s:.3f} s)")
    if sizer is not None:
        print(f"sizer: {rested} of those steps rested (the EAGLE tree was the root alone); "
              f"rates (tokens/s) drafted {sizer.spec_rate or 0:.1f}, undrafted {sizer.undrafted_rate:.1f}, "
              f"plain {sizer.plain_rate:.1f}; draft base {1000 * (sizer.base_s or 0):.2f} ms, per depth "
              f"{1000 * (sizer.depth_s or 0):.2f} ms; calibration {sizer.scale:.2f}")
        loss = getattr(sizer, "probe_loss_s", None)  # (sizers before 033c065 have neither)
        if loss is not None:
            print(f"longest rest {sizer.max_rest} steps (a probe that ended in a rest lost {1000 * loss:.1f} ms)")
    if parts is not None:
        parts.report(forwards)
    if not args.no_profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


class StepParts:
    """Wall time of the parts of speculative steps: wrappers around the drafter's, the head
    runner's, the expansion's and acceptance's calls, put in place for the speculative runs only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[tuple[object, str, object]] = []
        self.labels: list[str] = []  # in the order of the report

    def attach(self, drafter) -> None:
        import eaglespec.drafter
        import eaglespec.generate
        import eaglespec.lookup
        from eaglespec import expand

        eagle = getattr(drafter, "eagle", drafter)
        runner = eagle.runner
        for owner, name, label in ((drafter, "propose", "propose"), (eagle, "_catch_up", "  head catch-up"),
                                   (runner, "commit", "  head commits"), (eaglespec.drafter, "expand_dynamic", "  expansion"),
                                   (runner, "step", "    head tree steps"), (runner, "logprobs", "    head LM head"),
                                   (expand, "hopeless", "    stop checks"), (expand, "select_dynamic", "    selection"),
                                   (eaglespec.lookup, "graft_chain", "  chain graft"),
                                   (eaglespec.generate, "verify", "acceptance"), (drafter, "observe", "observe")):
            self._wrap(owner, name, label)
            if label not in self.labels:
                self.labels.append(label)

    def _wrap(self, owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)
        self._undo.append((owner, name, vars(owner).get(name)))  # None: a method of the owner's class

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, name, timed)

    def detach(self) -> None:
        for owner, name, old in reversed(self._undo):
            if old is None:
                delattr(owner, name)  # the wrapper shadowed the class's method
            else:
                setattr(owner, name, old)
        self._undo.clear()

    def report(self, forwards: int) -> None:
        print(f"parts of the speculative steps ({forwards} target forwards; a part's parts indented below it; "
              "head commits include the catch-ups' commits):")
        for label in self.labels:
            if label not in self.calls:
                continue
            seconds, n = self.seconds[label], self.calls[label]
            print(f"  {label:20s} {seconds:8.3f} s  {n:6d} calls  {1000 * seconds / n:7.3f} ms a call")


if __name__ == "__main__":
    main()
