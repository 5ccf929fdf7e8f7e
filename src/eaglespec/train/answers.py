"""A folder of target-written answers that outlives run folders.

`--regenerate` costs hours on a CPU (the target writes every answer), features minutes, so the
answers are what is worth keeping: a run folder may be lost, a folder kept in version control is
not. The store holds only the answers, keyed by row id; the prompts are rendered again from the
source, by the same code, when a run restores them. It is written in immutable chunk files of
compressed token ids (a few MB per 1M tokens), so adding answers adds files and never rewrites
one, which suits git.

    STORE/store.json            what wrote the answers (model shape, chat template, token budget)
    STORE/answers-00000.npz     ids (row ids), offsets [n+1], tokens (uint16 where the vocabulary fits)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

#: answers per chunk file; a killed run loses at most this many from the store (they stay in its
#: run folder's *.regen.jsonl, and the next run over that folder adds them)
CHUNK_ROWS = 500
#: the default target's answers, kept in the repository (found from a checkout, not from a wheel)
SHIPPED_STORE = Path(__file__).resolve().parents[3] / "data" / "answers" / "smollm2-135m-instruct"


class StoreMismatch(ValueError):
    """The store's answers were written by another target, template or token budget."""


def fingerprint(target, max_new_tokens: int) -> dict:
    """What decides an answer's tokens, beyond the prompt: the target's shape, its tokenizer and
    chat template, and the answer budget. Not the dtype: bf16 and fp32 answers are both the
    target's greedy text, parting only where a rounding flips a near-tie."""
    cfg = target.model.config
    template = getattr(target.tokenizer, "chat_template", None) or ""
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
            "chat_template_sha1": hashlib.sha1(template.encode()).hexdigest(),
            "max_new_tokens": max_new_tokens}


class AnswerStore:
    """Answers (row id -> answer token ids) read from and added to a store folder."""

    def __init__(self, root: Path, meta: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "store.json"
        if meta_path.is_file():
            have = json.loads(meta_path.read_text())
            differ = {k: (have.get(k), v) for k, v in meta.items() if have.get(k) != v}
            if differ:
                raise StoreMismatch(f"answer store {self.root} was written with other settings (stored, now): "
                                    f"{differ}; use another store folder")
        else:
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        self.answers: dict[str, list[int]] = {}
        for path in self._chunks():
            self.answers.update(read_chunk(path))
        self._pending: list[tuple[str, list[int]]] = []

    def _chunks(self) -> list[Path]:
        return store_chunks(self.root)

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, row_id: str) -> bool:
        return row_id in self.answers

    def add(self, rows: Iterable[tuple[str, list[int]]]) -> int:
        """Queue answers the store lacks; they are written once a chunk fills (or on flush).
        Returns how many were new."""
        new = 0
        for row_id, answer in rows:
            if row_id not in self.answers:
                self.answers[row_id] = list(answer)
                self._pending.append((row_id, list(answer)))
                new += 1
        self.flush(force=False)
        return new

    def flush(self, force: bool = True) -> None:
        """Write the queued answers in chunks of CHUNK_ROWS (all of them with `force`)."""
        while len(self._pending) >= CHUNK_ROWS or (force and self._pending):
            part, self._pending = self._pending[:CHUNK_ROWS], self._pending[CHUNK_ROWS:]
            chunks = self._chunks()
            index = int(chunks[-1].stem.split("-")[1]) + 1 if chunks else 0
            write_chunk(self.root / f"answers-{index:05d}.npz", part)


def store_chunks(root: Path) -> list[Path]:
    """A store folder's chunk files, oldest first."""
    return sorted(Path(root).glob("answers-*.npz"))


def write_chunk(path: Path, rows: list[tuple[str, list[int]]]) -> None:
    """One immutable chunk file, written atomically (a kill leaves no half file)."""
    tokens = [t for _, answer in rows for t in answer]
    offsets = np.cumsum([0] + [len(answer) for _, answer in rows]).astype(np.int64)
    dtype = np.uint16 if not tokens or max(tokens) < 2**16 else np.uint32
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, ids=np.array([r for r, _ in rows], dtype=str), offsets=offsets,
                        tokens=np.array(tokens, dtype=dtype))
    os.replace(tmp, path)


def read_chunk(path: Path) -> dict[str, list[int]]:
    with np.load(path, allow_pickle=False) as z:
        ids, offsets, tokens = z["ids"].tolist(), z["offsets"], z["tokens"].astype(np.int64)
    return {row_id: tokens[offsets[i]:offsets[i + 1]].tolist() for i, row_id in enumerate(ids)}


def answer_of(row: dict) -> list[int]:
    """The answer of a regenerated row: its trailing loss-masked tokens."""
    n = sum(row["loss_mask"])
    return list(row["input_ids"][len(row["input_ids"]) - n:])
