"""`eaglespec bench`: methods side by side on a prompt set; results.json, results.md, plots."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path


def add_bench_parser(sub) -> None:
    from eaglespec.bench.run import BUILTIN_SETS, METHODS
    from eaglespec.cli import add_draft_args, add_model_args

    p = sub.add_parser("bench", help="benchmark decoding methods side by side on a prompt set")
    p.add_argument("--questions", default=None,
                   help=f"MT-bench/Spec-Bench question file (JSONL), or a built-in set: {', '.join(BUILTIN_SETS)} "
                        "(default: sharegpt, the held-out slice)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--limit", type=int, default=None, help="questions per category")
    p.add_argument("--categories", default=None, help="comma-separated categories to keep")
    p.add_argument("--turns", type=int, default=None, help="ask only the first N turns of each question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per method")
    p.add_argument("--fixed-order", action="store_true",
                   help="run the methods in the same order on every question (default: the order rotates by one "
                        "method per question, so that none always runs first)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--compare-draft", nargs="+", default=[], metavar="HEAD",
                   help="more draft heads (EAGLE-1/2 or EAGLE-3): their eagle methods run in the same loop, "
                        "labelled METHOD@NAME "
                        "(NAME: the head's folder, or its parent's when the folder is called 'head'), so heads "
                        "are compared side by side rather than across noisy runs")
    add_model_args(p)
    add_draft_args(p)


def cmd_bench(args) -> int:
    from eaglespec.bench.run import (BUILTIN_SETS, BenchError, builtin_questions, build_runners, load_questions,
                                     head_pairs, head_pairs_markdown, markdown, plots, run_bench, select,
                                     summarize)
    from eaglespec.cli import tree_config
    from eaglespec.generate import GenerationConfig
    from eaglespec.eagle3 import head_kind
    from eaglespec.heads import default_head_path, load_head
    from eaglespec.target import load_model, load_target

    if args.limit is not None and args.limit < 1:
        raise BenchError(f"--limit must be >= 1, got {args.limit}")
    # validate everything cheap before loading anything or touching --out
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                           top_p=1.0, top_k=0)
    source = args.questions or "sharegpt"
    if source in BUILTIN_SETS:
        questions = builtin_questions(source, None if cats else args.limit)
    else:
        questions = load_questions(source)
    questions = select(questions, cats, args.limit)
    if args.turns is not None:
        if args.turns < 1:
            raise BenchError(f"--turns must be >= 1, got {args.turns}")
        questions = [replace(q, turns=q.turns[: args.turns]) for q in questions]
    head_path = args.draft or (default_head_path() if args.model is None else None)
    head_path = head_path if head_path and not args.no_draft else None
    if head_path is not None:
        head_kind(head_path)  # a missing or unreadable head fails before the target loads
    from eaglespec.bench.run import METHODS

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BenchError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if head_path is None and any(m.startswith("eagle") for m in methods):
        raise BenchError("eagle methods need a draft head: pass --draft PATH (none ships for this model)")

    extra_paths = compared_heads(args.compare_draft)
    if extra_paths and not any(m.startswith("eagle") for m in methods):
        raise BenchError("--compare-draft needs an eagle method in --methods")
    target = load_target(args.model, dtype=args.dtype, device=args.device, max_len=args.max_len, pack=not args.no_pack)
    # heads of either kind; an EAGLE-3 config without feature layers takes the target's default ones
    layers = target.config.num_hidden_layers
    head = load_head(head_path, layers) if head_path is not None else None
    extra_heads = {name: load_head(path, layers) for name, path in extra_paths.items()}
    if args.lookup < 0:
        raise BenchError(f"--lookup must be >= 0, got {args.lookup}")
    # eagle-lookup grafts a chain of --lookup tokens (8 when the flag is left at 0)
    tree = tree_config(args, target.device, target.dtype)
    # transformers' generate() runs a model of its own, stock: no packed weights, sdpa attention
    stock = (load_model(args.model, dtype=target.dtype, device=args.device, attn_implementation="sdpa")[0]
             if any(m.startswith("hf-") for m in methods) else None)
    runners = build_runners(target, methods, head, tree, lookup=args.lookup or 8,
                            draft_weights=args.draft_weights, stock_model=stock)
    eagle_methods = [m for m in methods if m.startswith("eagle")]
    for name, other in extra_heads.items():
        more = build_runners(target, eagle_methods, other, tree, lookup=args.lookup or 8,
                             draft_weights=args.draft_weights)
        runners.update({f"{m}@{name}": run for m, run in more.items() if m in eagle_methods})
    records = [vars(r) for r in run_bench(target, runners, questions, cfg, warmup=args.warmup,
                                                rotate=not args.fixed_order)]
    table = summarize(records)
    pairs = head_pairs(records)
    import torch

    machine = (f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
               f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"## eaglespec bench: {source}, {len(questions)} questions, {str(target.dtype).removeprefix('torch.')}, temperature {args.temperature}, "
              f"max_new_tokens {args.max_new_tokens}, turns {args.turns or 'all'}\n\nMachine: {machine}. Tree: {tree}. "
              f"Draft weights: {args.draft_weights}.")
    mismatches = [r for r in records if r["equal_to_baseline"] is False]
    # write into a fresh folder and swap it in, so a failed run never leaves a half-written --out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}-"))
    (tmp / "results.json").write_text(json.dumps({"settings": {**{k: str(v) for k, v in vars(args).items() if k != "func"},
                                                             "dtype": str(target.dtype).removeprefix("torch.")},
                                                  "machine": machine, "summary": table, "head_pairs": pairs, "runs": records}, indent=1))
    md = markdown(table, header)
    if pairs:
        md += "\nHeads side by side, per turn (the --draft head's tau minus the compared head's):\n\n" + head_pairs_markdown(pairs)
    if mismatches:
        md += "\nOutputs that differ from plain decoding:\n" + "".join(
            f"- question {r['question_id']} turn {r['turn']} {r['method']}\n" for r in mismatches)
    (tmp / "results.md").write_text(md)
    plots(records, table, tmp)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.replace(args.out)
    print(md)
    return 0


def compared_heads(paths: list[str]) -> dict[str, Path]:
    """Label -> head folder (EAGLE-1/2 or EAGLE-3) for --compare-draft; labels are folder names, made
    unique."""
    from eaglespec.bench.run import BenchError
    from eaglespec.eagle3 import head_kind

    heads = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise BenchError(f"--compare-draft {p}: not found")
        name = path.resolve().parent.name if path.name == "head" else path.name
        label, n = name, 2
        while label in heads:
            label, n = f"{name}-{n}", n + 1
        head_kind(path)  # a folder without a head fails before the target loads
        heads[label] = path
    return heads

