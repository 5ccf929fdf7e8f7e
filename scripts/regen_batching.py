"""Time the regeneration's two batchers side by side on the same prompts: `_answer_batched` (fixed
batches that stop once half their rows have ended and put the rest back) against
`_answer_continuous` (rows leave as they end, newcomers join the running batch).

    python scripts/regen_batching.py runs/regen16/data/train.regen.jsonl --rows 96 --rounds 2

Prompts are taken from a regenerated file (its answers are not used), the `--rows` before its last
`--skip` rows of `--turn`. The arms alternate A B B A ..., so drift in the machine's speed falls on
both. Both run in bf16 with sdpa, as `eaglespec train data --regenerate` does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from eaglespec import load_target
from eaglespec.train.data import _answer_batched, _answer_continuous, _turn_of, load_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", type=Path, help="a {split}.regen.jsonl file")
    ap.add_argument("--rows", dest="n", type=int, default=96)
    ap.add_argument("--skip", type=int, default=0, help="leave out the file's last N rows of --turn")
    ap.add_argument("--turn", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1, help="A B rounds, the order flipping each round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for r in load_jsonl(args.rows) if _turn_of(r["id"]) == args.turn]
    rows = rows[len(rows) - args.skip - args.n: len(rows) - args.skip]
    prompts = {r["id"]: r["input_ids"][: r["loss_mask"].index(1)] for r in rows}
    print(f"{len(prompts)} prompts, {sum(map(len, prompts.values())) / len(prompts):.0f} tokens on average")
    target = load_target(dtype="bfloat16", attn_implementation="sdpa")
    arms = {"batched": _answer_batched, "continuous": _answer_continuous}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    answers: dict[str, dict[str, list[int]]] = {}
    for r in range(args.rounds):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "answers.jsonl"
                start = time.perf_counter()
                arms[name](target, prompts, out, args.gen_tokens, args.gen_batch, desc=name)
                seconds = time.perf_counter() - start
                got = {x["id"]: x["input_ids"][len(prompts[x["id"]]):] for x in load_jsonl(out)}
            tokens = sum(map(len, got.values()))
            rates[name].append(tokens / seconds)
            answers[name] = got
            print(f"{name}: {len(got)} answers, {tokens} tokens in {seconds:.0f} s = {tokens / seconds:.1f} answer tok/s",
                  flush=True)
    for name, rs in rates.items():
        print(f"{name}: mean {sum(rs) / len(rs):.1f} answer tok/s over {len(rs)} runs")
    same = sum(answers["batched"][k] == answers["continuous"][k] for k in prompts)
    print(f"answers identical in both arms: {same}/{len(prompts)} (bf16 rounding may flip near-ties)")


if __name__ == "__main__":
    main()
