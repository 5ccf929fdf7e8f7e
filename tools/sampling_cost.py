"""What sampling costs over greedy decoding: plain decoding of a GGUF on the llama.cpp backend,
greedy, at temperature 1 and at temperature 0.7 with top-p 0.9, the same prompts each way, and
tokens per second of each. A large vocabulary (Gemma 3's 262k tokens) makes any per-token work
over the whole vocabulary show.

    PYTHONPATH=src python tools/sampling_cost.py --questions ../shared/data/mt_bench/question.jsonl
    PYTHONPATH=src python tools/sampling_cost.py --gguf gemma-3-270m-q4_k_m.gguf --questions ...

It uses only the generation API, so it also measures an older checkout: PYTHONPATH=OLD/src.
Keep other jobs off the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

WAYS = {"greedy": {}, "temperature 1": {"temperature": 1.0}, "temperature 0.7, top-p 0.9": {"temperature": 0.7, "top_p": 0.9}}


def main() -> None:
    from eaglespec.bench.run import add_tool_arguments, spread_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_arguments(parser, n=4, max_new_tokens=128, spread=2)
    args = parser.parse_args()

    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.paths import default_gguf_path

    torch.set_num_threads(args.threads)
    # no head: llama.cpp runs as it does alone, so the sampling is what differs
    target = LlamaCppTarget(args.gguf or default_gguf_path(),
                            LlamaCppTargetConfig(threads=args.threads, exact=False, features=False))
    gen = Generator(target)
    prompts = spread_prompts(args.questions, args.n, spread=2)
    ids = [gen.encode(p) for p in prompts]
    print(f"{target.gguf.name}: vocabulary {target.vocab_size}, {len(ids)} prompts x {args.max_new_tokens} tokens")
    for name, params in WAYS.items():
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True, seed=1, **params)
        gen.generate(ids[0], cfg)  # warm-up
        start, tokens = time.perf_counter(), 0
        for i in ids:
            tokens += len(gen.generate(i, cfg).token_ids)
        print(f"{name}: {tokens / (time.perf_counter() - start):.1f} tok/s")
    target.close()


if __name__ == "__main__":
    main()
