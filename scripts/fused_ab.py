"""Does the head draft better when it also sees lower layers of the target? (EAGLE-3's fused features)

An A/B from one starting head, before any engine work. Both arms fine-tune the same head on the same
rows, in the same order, with the same noise, for the same steps (the EAGLE-1 loss, one draft step):

    A  input at position i: feature f_i (the target's top feature), as now
    B  input at position i: f_i + P(cat(n(h_a), n(h_b), n(h_c))) where h_l is the target's residual
       stream after layer l, n() scales it to unit RMS, and P (3H -> H, no bias) starts at zero,
       so B starts as exactly A's head and can only gain by using the layers

In the engine the target would hand those layers over for every verified token, so the committed
positions (prompt and accepted tokens) have them; a drafted token does not, since the target has
not run there. B therefore drops the extra term at a random half of the training positions and
`simulate_chains` feeds it only at committed positions: later draft steps get the head's own
predicted feature alone, as they would in the engine.

The layers are computed here (sdpa, bf16, like `eaglespec train features`) for the rows used and
cached in OUT/layers.safetensors, so a rerun skips that (and `--arms B` reruns one arm with other settings). Reported: simulated tau and per-step
agreement on held-out rows whose prompt is no training prompt, A against B.

    python scripts/fused_ab.py runs/regen6/head --run runs/regen6 --rows 1200 --steps 150 --out runs/fused_ab
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from eaglespec.draft import DraftHead
from eaglespec.target import Target, load_target
from eaglespec.train.features import load_shards
from eaglespec.train.trainer import FrozenTargetParts, TrainConfig, collate, head_loss, simulate_chains, unseen_prompts


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """x / RMS(x) over the last dim, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@torch.inference_mode()
def layer_states(target: Target, rows: list[dict], layers: list[int], desc: str) -> tuple[list[torch.Tensor], float]:
    """Per row [T, len(layers) * H] bf16: the unit-RMS residual stream after each of `layers`, and
    the mean |difference| between the recomputed top feature and the stored one (a sanity check)."""
    out, diffs = [], []
    for r in tqdm(rows, desc=desc, unit="row"):
        res = target.decoder(input_ids=r["input_ids"][None], use_cache=False, output_hidden_states=True)
        out.append(torch.cat([unit_rms(res.hidden_states[l][0]) for l in layers], -1).to(torch.bfloat16))
        diffs.append((res.last_hidden_state[0].float() - r["features"].float()).abs().mean().item())
    return out, sum(diffs) / max(1, len(diffs))


def cached_layers(path: Path, target_fn, rows: list[dict], layers: list[int], desc: str) -> list[torch.Tensor]:
    """Layer states of `rows`, read from `path` when it holds them for these rows and layers."""
    key = {"layers": layers, "tokens": [int(r["input_ids"].shape[0]) for r in rows]}
    if path.is_file():
        t = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta == key:
            return [t[f"r{i}"] for i in range(len(rows))]
    states, diff = layer_states(target_fn(), rows, layers, desc)
    print(f"{desc}: recomputed top feature vs stored, mean |diff| {diff:.4f}")
    save_file({f"r{i}": s.contiguous() for i, s in enumerate(states)}, str(path))
    path.with_suffix(".json").write_text(json.dumps(key))
    return states


class Fuse(nn.Module):
    """P: the extra layers (3H) -> an additive term on the head's input feature (H); starts at zero."""

    def __init__(self, extra: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(extra, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, feats: torch.Tensor, extra: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        add = self.proj(extra.float())  # [..., T, H]
        if keep is not None:
            add = add * keep[..., None]
        return feats.float() + add


def padded(states: list[torch.Tensor], t: int) -> torch.Tensor:
    out = torch.zeros(len(states), t, states[0].shape[-1], dtype=states[0].dtype)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
    return out


def train_arm(head: DraftHead, fuse: Fuse | None, parts: FrozenTargetParts, rows: list[dict],
              extra: list[torch.Tensor], args) -> dict:
    """Fine-tune `head` (and `fuse`) for args.steps; the same order, noise and dropout in both arms."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=10)
    lm_draft = parts.lm_head[head.draft_token_ids()]
    params = list(head.parameters()) + (list(fuse.parameters()) if fuse else [])
    opt = torch.optim.AdamW([{"params": list(head.parameters())},
                             {"params": list(fuse.parameters()) if fuse else [], "lr": args.fuse_lr}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(1)
    t0, last = time.perf_counter(), {}
    bar = tqdm(range(cfg.steps), desc="B (layers)" if fuse else "A (top feature)", unit="step")
    for step in bar:
        idx = [order[(step * cfg.batch_size + j) % len(rows)] for j in range(cfg.batch_size)]
        batch = collate([rows[i] for i in idx])
        keep = (torch.rand(batch["input_ids"].shape, generator=g) >= args.drop).float()  # drawn in both arms
        scale = min(1.0, (step + 1) / cfg.warmup_steps) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fuse is not None:
                batch["inputs"] = fuse(batch["features"], padded([extra[i] for i in idx], batch["input_ids"].shape[1]), keep)
            loss, last = head_loss(head, parts, lm_draft, batch, cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.3f}")
    return {"seconds": round(time.perf_counter() - t0, 1), "last_batch": {k: round(v, 4) for k, v in last.items()}}


@torch.no_grad()
def evaluate(head: DraftHead, fuse: Fuse | None, parts: FrozenTargetParts, rows: list[dict],
             extra: list[torch.Tensor]) -> dict:
    if fuse is not None:
        rows = [{**r, "inputs": fuse(r["features"], e)} for r, e in zip(rows, extra)]
    vocab_ids = head.draft_token_ids()
    return simulate_chains(head, parts, parts.lm_head[vocab_ids], vocab_ids, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("head", type=Path, help="the head both arms start from")
    ap.add_argument("--run", type=Path, required=True, help="run folder with features/ and val_features/")
    ap.add_argument("--out", type=Path, default=Path("runs/fused_ab"))
    ap.add_argument("--layers", type=int, nargs=3, default=[3, 15, 27],
                    help="hidden_states indices (i = after decoder layer i), EAGLE-3's low, middle, high")
    ap.add_argument("--rows", type=int, default=1200, help="training rows (the first ones of features/)")
    ap.add_argument("--val-rows", type=int, default=48)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--fuse-lr", type=float, default=1e-3, help="learning rate of P, which starts at zero")
    ap.add_argument("--drop", type=float, default=0.5, help="share of positions trained without the extra term")
    ap.add_argument("--tag", default="ab", help="results go to OUT/results-TAG.json")
    ap.add_argument("--arms", nargs="+", default=["A", "B"], choices=["A", "B"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    all_train = load_shards(args.run / "features")
    train = all_train[: args.rows]
    val = unseen_prompts(load_shards(args.run / "val_features"), all_train)[: args.val_rows]
    holder: dict[str, Target] = {}

    def target() -> Target:
        if "t" not in holder:
            holder["t"] = load_target(dtype="bfloat16", attn_implementation="sdpa")
        return holder["t"]

    extra_train = cached_layers(args.out / "layers_train.safetensors", target, train, args.layers, "layers (train)")
    extra_val = cached_layers(args.out / "layers_val.safetensors", target, val, args.layers, "layers (val)")
    holder.clear()
    parts = FrozenTargetParts.from_target(load_target(dtype="float32", pack=False))

    h = parts.embed.shape[1]
    results = {"settings": {k: str(v) for k, v in vars(args).items()}}
    start = DraftHead.from_pretrained(args.head)
    results["start"] = evaluate(start, None, parts, val, extra_val)
    print("start:", results["start"])
    for arm in args.arms:
        head = DraftHead.from_pretrained(args.head)
        fuse = Fuse(len(args.layers) * h, h) if arm == "B" else None
        results[arm] = train_arm(head, fuse, parts, train, extra_train, args)
        results[arm]["val"] = evaluate(head, fuse, parts, val, extra_val)
        print(arm, results[arm])
        (args.out / f"results-{args.tag}.json").write_text(json.dumps(results, indent=1))
    print("| arm | simulated tau | per-step agreement |\n|---|---|---|")
    for arm, label in (("start", "start head"), ("A", "A: top feature"), ("B", "B: + layers " + ",".join(map(str, args.layers)))):
        if arm not in results:
            continue
        v = results[arm] if arm == "start" else results[arm]["val"]
        print(f"| {label} | {v['sim_tau']:.3f} | {v['step_acc']} |")


if __name__ == "__main__":
    main()
