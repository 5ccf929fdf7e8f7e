"""Time the regeneration's batching with and without early release (`--release 1.0` keeps every
batch running until its longest answer ends), on prompts taken from a regenerated file.

    python scripts/regen_release.py runs/regen2/data/train.regen.jsonl --rows 96 --turn 2

The rows' own answers are not used, only their prompts; both runs answer the same prompts, in
bf16 with sdpa as `eaglespec train data --regenerate` does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from eaglespec import load_target
from eaglespec.train.data import RELEASE_SHARE, _answer_batched, _turn_of, load_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", type=Path, help="a {split}.regen.jsonl file")
    ap.add_argument("--rows", dest="n", type=int, default=96, help="how many prompts (the file's last ones of --turn)")
    ap.add_argument("--turn", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=48)
    ap.add_argument("--release", type=float, nargs="+", default=[1.0, RELEASE_SHARE])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for r in load_jsonl(args.rows) if _turn_of(r["id"]) == args.turn][-args.n:]
    prompts = {r["id"]: r["input_ids"][: r["loss_mask"].index(1)] for r in rows}
    target = load_target(dtype="bfloat16", attn_implementation="sdpa")
    answers = {}
    for release in args.release:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "answers.jsonl"
            start = time.perf_counter()
            put_back = _answer_batched(target, prompts, out, args.gen_tokens, args.gen_batch, desc=f"release {release}",
                                       release=release)
            seconds = time.perf_counter() - start
            got = {r["id"]: r["input_ids"] for r in load_jsonl(out)}
        tokens = sum(len(got[k]) - len(prompts[k]) for k in got)
        answers[release] = got
        print(f"release {release}: {len(got)} answers, {tokens} tokens in {seconds:.0f} s = {tokens / seconds:.1f} "
              f"answer tok/s; rows put back {put_back}")
    first = answers[args.release[0]]
    for release in args.release[1:]:
        same = sum(answers[release][k] == first[k] for k in first)
        print(f"release {release}: {same}/{len(first)} answers identical to release {args.release[0]}'s")


if __name__ == "__main__":
    main()
