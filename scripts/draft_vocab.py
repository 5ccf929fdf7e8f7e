"""How much of a benchmark's text a draft vocabulary can propose, and a head re-targeted to a bigger one.

A draft head with a reduced vocabulary (`d2t`/`t2d`) can never propose a token outside it, so a
benchmark whose answers use rarer tokens loses acceptance there. This counts, per category, the
share of the plain method's output tokens (its text re-tokenized) inside the head's vocabulary and
inside the K most frequent answer tokens of a set of rendered rows, for several K:

    python scripts/draft_vocab.py runs/regen4/head --rows runs/regen2/data/train.regen.jsonl \
        --results bench_out/mtbench5/results.json --k 8192,16384,24576

With --write K DIR it also saves the head with its vocabulary re-picked as the K most frequent
answer tokens of --rows (weights unchanged: the LM head rows it scores are the target's), ready for
`eaglespec bench --draft DIR`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from eaglespec.draft import DraftHead
from eaglespec.target import load_target
from eaglespec.train.data import load_jsonl


def answer_token_counts(rows_path: Path, vocab_size: int) -> torch.Tensor:
    """[V] how often each token id sits on a loss position of the rendered rows."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in load_jsonl(rows_path):
        ids = torch.tensor([t for t, m in zip(r["input_ids"], r["loss_mask"]) if m], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def plain_outputs(results_path: Path, tokenizer) -> dict[str, list[int]]:
    """Category -> the plain method's output tokens over a bench results file."""
    out: dict[str, list[int]] = defaultdict(list)
    for run in json.loads(results_path.read_text())["runs"]:
        if run["method"] == "plain":
            out[run["category"]] += tokenizer.encode(run["text"], add_special_tokens=False)
    return out


def coverage(ids: list[int], allowed: torch.Tensor) -> float:
    return float(allowed[torch.tensor(ids, dtype=torch.long)].float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("head", type=Path)
    ap.add_argument("--rows", type=Path, required=True, help="rendered rows (JSONL) whose answer tokens are counted")
    ap.add_argument("--results", type=Path, nargs="+", required=True, help="eaglespec bench results.json files")
    ap.add_argument("--k", default="8192,16384,24576", help="comma-separated vocabulary sizes to score")
    ap.add_argument("--write", nargs=2, metavar=("K", "DIR"), help="save the head re-targeted to K tokens in DIR")
    args = ap.parse_args()

    tokenizer = load_target(None).tokenizer
    head = DraftHead.from_pretrained(args.head)
    vocab = head.config.vocab_size
    counts = answer_token_counts(args.rows, vocab)
    sets = {f"head ({head.draft_token_ids().numel()})": head.t2d.clone()}
    for k in (int(x) for x in args.k.split(",")):
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[counts.topk(min(k, vocab)).indices] = True
        sets[f"top {k}"] = allowed
    for path in args.results:
        cats = plain_outputs(path, tokenizer)
        every = [t for ids in cats.values() for t in ids]
        print(f"\n{path}: {len(every)} plain output tokens\n")
        print("| vocabulary | all | " + " | ".join(cats) + " |")
        print("|---" * (len(cats) + 2) + "|")
        for name, allowed in sets.items():
            cells = [f"{coverage(every, allowed):.3f}"] + [f"{coverage(ids, allowed):.3f}" for ids in cats.values()]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.write:
        k, out = int(args.write[0]), Path(args.write[1])
        head.set_vocab(counts.topk(min(k, vocab)).indices)
        head.save_pretrained(out, dtype=torch.bfloat16)
        print(f"\nwrote the head with {head.draft_token_ids().numel()} draft tokens to {out}")


if __name__ == "__main__":
    main()
