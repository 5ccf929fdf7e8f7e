"""How well a head fits its training rows against held-out rows: teacher-forced agreement with the
target's greedy token at draft steps 1-3 (steps 2 and 3 fed the head's own features, as the engine
drafts), over every assistant position, and the simulated chain acceptance (`simulate_chains`, as
the trainer's validation reports it). A large train/held-out gap says more data would help. Give
two heads the same --run to compare them on the same rows. `eaglespec train eval` runs it:

    eaglespec train eval runs/regen3/head --run runs/regen3 --rows 48
"""

from __future__ import annotations

from pathlib import Path

import torch

from eaglespec.draft import DraftHead
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


def fit_table(head: DraftHead, parts: FrozenTargetParts, run: Path, rows: int = 48,
              also_features: list[Path] = ()) -> str:
    """A markdown table of `agreement` and simulated tau on `rows` training rows of `run` (drawn at
    random, seed 0) and its first `rows` held-out rows whose prompt no training row has.

    also_features: the feature folders the head's stage also trained on (as `train head
    --also-features`): held-out prompts they train on are left out too, so the rows are the trainer's."""
    if not (run / "features").is_dir() or not (run / "val_features").is_dir():
        raise FileNotFoundError(f"{run}: needs features/ and val_features/ (`eaglespec train features --out {run}`)")
    train = load_shards(run / "features")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:rows].tolist()
    seen = train + [r for d in also_features for r in load_shards(d)]
    held_out = unseen_prompts(load_shards(run / "val_features"), seen)[:rows]
    sets = {"train": [train[i] for i in pick], "held-out": held_out}
    vocab_ids = head.draft_token_ids()
    lines = ["| rows | step 1 | step 2 | step 3 | CE step 1 | simulated tau |", "|---|---|---|---|---|---|"]
    for name, chosen in sets.items():
        if not chosen:  # e.g. every held-out prompt was also trained on
            lines.append(f"| {name} (0) | - | - | - | - | - |")
            continue
        m = agreement(head, parts, chosen)
        with torch.no_grad():
            sim = simulate_chains(head, parts, parts.lm_head[vocab_ids], vocab_ids, chosen)
        lines.append(f"| {name} ({len(chosen)}) | {m['acc']} | {m['acc1']} | {m['acc2']} | {m['ploss']} | {sim['sim_tau']:.3f} |")
    return "\n".join(lines)
