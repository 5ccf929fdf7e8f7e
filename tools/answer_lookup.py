"""Could the target's own stored answers draft for it? Retrieval drafting (as REST does) guesses
the next token as the most frequent continuation of the longest suffix of the text so far found in
a datastore; here the datastore is data/answers (6.1M tokens the default target wrote). The tool
writes the target's plain greedy answers to MT-bench first turns on the llama.cpp backend and, at
every answer position, looks up that guess and checks it against the token the target wrote.

    PYTHONPATH=src python tools/answer_lookup.py --questions ../shared/data/mt_bench/question.jsonl

Prints, for guesses kept by how unanimous the stored continuations are (share of the top one)
and how often the suffix occurred, the fraction of positions that have such a guess and how often
it is right. A guess pays only where it is right more often than a verified row costs in
forwards (`tools/llamacpp_decode_cost.py`: about 0.8 for Q4_1 and 0.3 for F32 on an AVX2 EPYC).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

MULT = np.uint64(1_000_003)


def datastore() -> np.ndarray:
    """The stored answers as one int64 array, each followed by -1 (no n-gram spans two)."""
    from eaglespec.train.answers import SHIPPED_STORE, read_chunk, store_chunks

    answers = [a for chunk in store_chunks(SHIPPED_STORE) for a in read_chunk(chunk).values()]
    return np.fromiter((t for a in answers for t in (*a, -1)), dtype=np.int64)


def ngram_index(store: np.ndarray, max_n: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """n -> (sorted hashes of every n-gram followed by a token, those tokens in the same order).
    The hash of t[i-n+1..i] is sum over k of (t[i-k] + 2) * MULT^k, wrapping at 64 bits."""
    index, h = {}, np.zeros(len(store), dtype=np.uint64)
    broken = np.zeros(len(store), dtype=bool)
    followed = np.r_[store[1:] >= 0, False]
    with np.errstate(over="ignore"):
        for n in range(1, max_n + 1):
            back = np.r_[np.full(n - 1, -1), store][: len(store)]  # the token n - 1 before
            h = h + (back + 2).astype(np.uint64) * MULT ** np.uint64(n - 1)
            broken |= back < 0
            pos = np.nonzero(~broken & followed)[0]
            order = np.argsort(h[pos], kind="stable")
            index[n] = (h[pos][order], store[pos[order] + 1])
    return index


def guess(index, context: list[int], max_n: int) -> tuple[int, int, float, int] | None:
    """(token, suffix length, share of the top continuation, occurrences) for the longest suffix
    of `context` in the index, or None."""
    with np.errstate(over="ignore"):
        for n in range(min(max_n, len(context)), 0, -1):
            key = sum(np.uint64(t + 2) * MULT ** np.uint64(k) for k, t in enumerate(reversed(context[-n:])))
            keys, nxt = index[n]
            a, b = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
            if b > a:
                vals, counts = np.unique(nxt[a:b], return_counts=True)
                j = int(counts.argmax())
                return int(vals[j]), n, float(counts[j] / (b - a)), int(b - a)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True, help="MT-bench-style question.jsonl (first turns)")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-n", type=int, default=8, help="longest suffix looked up")
    args = parser.parse_args()

    from eaglespec import EngineConfig, GenerationConfig, load_engine
    from eaglespec.bench.run import load_questions

    start = time.perf_counter()
    store = datastore()
    index = ngram_index(store, args.max_n)
    print(f"datastore: {int((store >= 0).sum()):,} tokens, indexed in {time.perf_counter() - start:.1f} s")
    gen = load_engine(EngineConfig(speculate=False))
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    rows = []  # per answer position: (suffix length, share, occurrences, right)
    questions = load_questions(args.questions)[: args.limit]
    for i, q in enumerate(questions):
        ids = gen.encode(q.turns[0])  # [n]
        prompt, answer = ids.tolist(), [t for chunk in gen.generate_ids(ids, cfg) for t in chunk]
        for t in range(len(answer)):
            g = guess(index, prompt + answer[:t], args.max_n)
            rows.append((0, 0.0, 0, False) if g is None else (g[1], g[2], g[3], g[0] == answer[t]))
        print(f"\r{i + 1}/{len(questions)} questions, {len(rows):,} positions", end="", flush=True)
    print()
    r = np.array(rows, dtype=float)  # [positions, 4]
    print("| top continuation's share | occurrences | positions with a guess | guess right |")
    print("|---|---|---|---|")
    for share in (0.0, 0.5, 0.7, 0.9, 0.99):
        for least in (1, 3, 10):
            kept = (r[:, 0] > 0) & (r[:, 1] >= share) & (r[:, 2] >= least)
            right = r[kept, 3].mean() if kept.any() else float("nan")
            print(f"| >= {share:.2f} | >= {least} | {kept.mean():.1%} | {right:.1%} |")
    print("\n| longest suffix found | positions | guess right |\n|---|---|---|")
    for n in range(args.max_n + 1):
        kept = r[:, 0] == n
        if kept.any():
            print(f"| {n} | {kept.mean():.1%} | {r[kept, 3].mean() if n else 0.0:.1%} |")


if __name__ == "__main__":
    main()
