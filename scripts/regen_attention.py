"""Time batched, left-padded bf16 `generate()` on the default model with transformers' sdpa and with
eaglespec's exact fp32 attention: the choice `eaglespec train data --regenerate` makes (sdpa).

    python scripts/regen_attention.py --batch 24 --prompt-len 400 --new-tokens 24

With --features ROWS.jsonl it times the feature dump's forward instead (`eaglespec train features
--feature-attention`), one row at a time over the first --rows rows of at least --min-len tokens,
and reports how far the two attentions' bf16 features lie apart:

    python scripts/regen_attention.py --features runs/regen2/data/train.regen.jsonl --rows 6 --min-len 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from eaglespec import load_target
from eaglespec.attention import register


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features", type=str, default=None, metavar="ROWS", help="time the feature dump on these rows")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--min-len", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.features:
        time_features(args.features, args.rows, args.min_len)
        return
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


def time_features(path: str, n_rows: int, min_len: int) -> None:
    from eaglespec.train.data import load_jsonl
    from eaglespec.train.features import row_features

    rows = [r["input_ids"] for r in load_jsonl(Path(path)) if len(r["input_ids"]) >= min_len][:n_rows]
    if not rows:
        raise SystemExit(f"no row of {min_len}+ tokens in {path}")
    tokens = sum(len(r) for r in rows)
    feats, rates = {}, {}
    for impl in ("sdpa", register()):
        target = load_target(dtype="bfloat16", attn_implementation=impl)
        row_features(target, rows[0][:64])  # warm-up
        start = time.perf_counter()
        feats[impl] = [row_features(target, r).float() for r in rows]
        rates[impl] = tokens / (time.perf_counter() - start)
        print(f"{impl}: {rates[impl]:.0f} tok/s over {len(rows)} rows, {tokens} tokens", flush=True)
    a, b = torch.cat(feats["sdpa"]), torch.cat(feats[register()])
    print(f"sdpa is {rates['sdpa'] / rates[register()]:.2f}x faster; mean |difference| "
          f"{(a - b).abs().mean():.4f} against mean |feature| {b.abs().mean():.4f}")


if __name__ == "__main__":
    main()
