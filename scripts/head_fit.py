"""How well a head fits its training rows against held-out rows: teacher-forced agreement with the
target's greedy token at draft steps 1-3 (steps 2 and 3 fed the head's own features, as the engine
drafts), over every assistant position, and the simulated chain acceptance (`simulate_chains`, as
the trainer's validation reports it). A large train/held-out gap says more data would help. Give
two heads the same --run to compare them on the same rows.

    python scripts/head_fit.py runs/regen3/head --run runs/regen3 --rows 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from eaglespec.draft import DraftHead
from eaglespec.target import load_target
from eaglespec.train.features import load_shards
from eaglespec.train.trainer import FrozenTargetParts, TrainConfig, collate, head_loss, simulate_chains, unseen_prompts


def agreement(head: DraftHead, parts: FrozenTargetParts, rows: list[dict], batch: int = 8) -> dict[str, float]:
    """Mean per-batch metrics of the unrolled loss (no input noise) over `rows`."""
    lm_draft = parts.lm_head[head.draft_token_ids()]
    cfg = TrainConfig(noise=0.0, ttt_steps=3)
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            _, m = head_loss(head, parts, lm_draft, collate(rows[i:i + batch]), cfg)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    return {k: round(v / n, 3) for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("head", type=Path)
    ap.add_argument("--model", default=None,
                    help="the target the run's features came from: transformers folder or .gguf file "
                         "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--run", type=Path, required=True, help="run directory with features/ and val_features/")
    ap.add_argument("--rows", type=int, default=48, help="rows of each set (training rows drawn at random)")
    ap.add_argument("--also-features", type=Path, nargs="+", default=[], metavar="DIR",
                    help="the feature folders the head's stage also trained on (as `train head --also-features`): "
                         "held-out prompts they train on are left out too, so the rows are the trainer's")
    args = ap.parse_args()
    parts = FrozenTargetParts.from_target(load_target(args.model, dtype="float32", pack=False))
    head = DraftHead.from_pretrained(args.head)
    train = load_shards(args.run / "features")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.rows].tolist()
    seen = train + [r for d in args.also_features for r in load_shards(d)]
    held_out = unseen_prompts(load_shards(args.run / "val_features"), seen)[: args.rows]
    sets = {"train": [train[i] for i in pick], "held-out": held_out}
    vocab_ids = head.draft_token_ids()
    print("| rows | step 1 | step 2 | step 3 | CE step 1 | simulated tau |\n|---|---|---|---|---|---|")
    for name, rows in sets.items():
        if not rows:  # e.g. every held-out prompt was also trained on
            print(f"| {name} (0) | - | - | - | - | - |")
            continue
        m = agreement(head, parts, rows)
        with torch.no_grad():
            sim = simulate_chains(head, parts, parts.lm_head[vocab_ids], vocab_ids, rows)
        print(f"| {name} ({len(rows)}) | {m['acc']} | {m['acc1']} | {m['acc2']} | {m['ploss']} | {sim['sim_tau']:.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
