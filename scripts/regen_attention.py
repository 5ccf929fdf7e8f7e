"""Time batched, left-padded bf16 `generate()` on the default model with transformers' sdpa and with
eaglespec's exact fp32 attention: the choice `eaglespec train data --regenerate` makes (sdpa).

    python scripts/regen_attention.py --batch 24 --prompt-len 400 --new-tokens 24
"""

from __future__ import annotations

import argparse
import time

import torch

from eaglespec import load_target
from eaglespec.attention import register


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[: args.batch // 4, : args.prompt_len // 8] = 0  # a quarter of the rows left-padded
    times = {}
    for impl in ("sdpa", register()):
        target = load_target(dtype="bfloat16", attn_implementation=impl)
        start = time.perf_counter()
        with torch.inference_mode():
            target.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        times[impl] = time.perf_counter() - start
        print(f"{impl}: {times[impl]:.1f} s", flush=True)
    print(f"sdpa is {times[register()] / times['sdpa']:.2f}x faster")


if __name__ == "__main__":
    main()
