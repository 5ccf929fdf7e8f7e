"""Dump the target's top features over training rows, in resumable shards.

Shard i holds rows [i * rows_per_shard, (i+1) * rows_per_shard) of the input file, so a killed
run restarted with the same arguments skips the complete shards and produces the same files as
an uninterrupted one. Each shard is written to a temporary name and renamed when complete.
Rows appended to the input since (a regeneration that went on) extend the dump: full shards are
kept, the old last shard is redone if it was short, and the new rows follow.

Shard layout (safetensors): input_ids int32 [T], loss_mask uint8 [T], features bf16 [T, H],
offsets int64 [rows + 1] (row r spans offsets[r]:offsets[r+1]).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
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
            "source": str(rows_path), "dtype": str(target.dtype)}
    meta_path = out_dir / "features.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if (old["rows_per_shard"], old["hidden_size"]) != (rows_per_shard, meta["hidden_size"]) or old["rows"] > len(rows):
            raise ValueError(f"{out_dir} holds shards of another run ({old}); use a new --out")
        if old["rows"] < len(rows):
            _extend(out_dir, rows, old["rows"], rows_per_shard)
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


def _extend(out_dir: Path, rows: list[dict], old_rows: int, rows_per_shard: int) -> None:
    """Rows were appended after `old_rows`: check the kept shards still hold the same rows, and
    drop the old last shard if it was short (it is redone with the rows that now complete it)."""
    full = old_rows // rows_per_shard
    last = out_dir / shard_name(full - 1)
    if full and last.is_file():
        t = load_file(str(last))
        ids = [i for r in rows[(full - 1) * rows_per_shard : full * rows_per_shard] for i in r["input_ids"]]
        if t["input_ids"].tolist() != ids:
            raise ValueError(f"{out_dir}: the rows before the appended ones changed; use a new --out")
    if old_rows % rows_per_shard:
        (out_dir / shard_name(full)).unlink(missing_ok=True)
    log.warning("%d rows appended since the last dump: extending it", len(rows) - old_rows)


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
