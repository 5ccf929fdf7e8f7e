"""Dump the target's top features over training rows, in resumable shards.

Shard i holds rows [i * rows_per_shard, (i+1) * rows_per_shard) of the input file, so a killed
run restarted with the same arguments skips the complete shards and produces the same files as
an uninterrupted one. Each shard is written to a temporary name and renamed when complete.
A rerun over a changed input keeps only the shards whose token ids still match the rows they
cover: rows appended since (a regeneration that went on) redo the short last shard and add the
rest; rows dropped or rewritten (a repaired regeneration) redo every shard from the first change.

Shard layout (safetensors): input_ids int32 [T], loss_mask uint8 [T], features bf16 [T, H],
offsets int64 [rows + 1] (row r spans offsets[r]:offsets[r+1]).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eaglespec.target import Target
from eaglespec.train.data import load_jsonl

log = logging.getLogger(__name__)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


@torch.inference_mode()
def row_features(target: Target, ids: list[int]) -> torch.Tensor:
    """[T, H] features of one row, computed like a prefill (one causal forward, no cache kept)."""
    tokens = torch.tensor(ids, dtype=torch.long, device=target.device)
    out = target.decoder(input_ids=tokens[None], use_cache=False)
    return out.last_hidden_state[0]


def dump_features(
    target: Target, rows_path: Path, out_dir: Path, rows_per_shard: int = 64, max_shards: int | None = None
) -> int:
    """Write the shards that are missing; return how many shards exist in all."""
    from tqdm import tqdm

    rows = load_jsonl(rows_path)
    n_shards = (len(rows) + rows_per_shard - 1) // rows_per_shard
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"rows": len(rows), "rows_per_shard": rows_per_shard, "hidden_size": target.hidden_size,
            "source": str(rows_path), "dtype": str(target.dtype),
            "attention": getattr(target.config, "_attn_implementation", None)}
    meta_path = out_dir / "features.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if (old["rows_per_shard"], old["hidden_size"]) != (rows_per_shard, meta["hidden_size"]):
            raise ValueError(f"{out_dir} holds shards of another run ({old}); use a new --out")
        _drop_stale_shards(out_dir, rows, rows_per_shard)
    meta_path.write_text(json.dumps(meta, indent=2))
    todo = [i for i in range(n_shards) if not (out_dir / shard_name(i)).is_file()]
    if max_shards is not None:
        todo = todo[:max_shards]
    total_tokens = sum(len(rows[r]["input_ids"]) for i in todo for r in range(i * rows_per_shard, min((i + 1) * rows_per_shard, len(rows))))
    if len(todo) < n_shards:
        log.warning("resuming: %d of %d shards already complete", n_shards - len(todo), n_shards)
    bar = tqdm(total=total_tokens, desc="features", unit="tok", unit_scale=True)
    for i in todo:
        chunk = rows[i * rows_per_shard : (i + 1) * rows_per_shard]
        feats, ids, masks, offsets = [], [], [], [0]
        for row in chunk:
            feats.append(row_features(target, row["input_ids"]).to(torch.bfloat16).cpu())
            ids.extend(row["input_ids"])
            masks.extend(row["loss_mask"])
            offsets.append(len(ids))
            bar.update(len(row["input_ids"]))
        tensors = {
            "input_ids": torch.tensor(ids, dtype=torch.int32),
            "loss_mask": torch.tensor(masks, dtype=torch.uint8),
            "features": torch.cat(feats).contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        tmp = out_dir / (shard_name(i) + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out_dir / shard_name(i))
    bar.close()
    return sum(1 for i in range(n_shards) if (out_dir / shard_name(i)).is_file())


def _drop_stale_shards(out_dir: Path, rows: list[dict], rows_per_shard: int) -> None:
    """Delete the shards whose token ids are not those of the rows they cover now, so they are
    redone: rows appended since the last dump (the short last shard), rows rewritten or dropped,
    as a repaired `--regenerate` run does. Shards past the last row are deleted too."""
    n_shards = (len(rows) + rows_per_shard - 1) // rows_per_shard
    stale = []
    for path in sorted(out_dir.glob("shard_*.safetensors")):
        i = int(path.stem.split("_")[1])
        chunk = rows[i * rows_per_shard : (i + 1) * rows_per_shard]
        if i < n_shards:
            with safe_open(str(path), framework="pt") as f:
                ids, offsets = f.get_tensor("input_ids"), f.get_tensor("offsets")
            same = (offsets.numel() == len(chunk) + 1 and ids.tolist() == [t for r in chunk for t in r["input_ids"]])
            if same:
                continue
        stale.append(i)
        path.unlink()
    if stale:
        log.warning("%d shard(s) no longer match the rows (rows appended or changed): redoing them", len(stale))


def load_shards(feature_dir: Path) -> list[dict[str, torch.Tensor]]:
    """All complete shards, in order, as rows: {input_ids [T] long, loss_mask [T], features [T, H]}."""
    meta_path = feature_dir / "features.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no features at {feature_dir}: run `eaglespec train features` first")
    meta = json.loads(meta_path.read_text())
    n_shards = (meta["rows"] + meta["rows_per_shard"] - 1) // meta["rows_per_shard"]
    rows = []
    for i in range(n_shards):
        path = feature_dir / shard_name(i)
        if not path.is_file():
            log.warning("%s missing: training on the %d complete shards before it", path.name, i)
            break
        t = load_file(str(path))
        off = t["offsets"].tolist()
        for a, b in zip(off[:-1], off[1:]):
            rows.append({"input_ids": t["input_ids"][a:b].long(), "loss_mask": t["loss_mask"][a:b],
                         "features": t["features"][a:b]})
    return rows
