"""`eaglespec bench`: methods, heads or tree shapes side by side on a prompt set (results.json,
results.md, plots); `eaglespec bench profile`: where a speculative step's time goes."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from eaglespec.bench import llamacpp
from eaglespec.bench.methods import BASELINE, BUILTIN_SETS, CHAIN_METHODS, METHODS, SWEEP_TREES
from eaglespec.cli.common import (UsageError, add_draft_args, add_draft_path_arg, add_draft_weights_arg, add_model_args,
                                  add_tree_args, check_lookup, head_path, load_target_from, tree_config)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark decoding methods side by side on a prompt set",
        description="Decoding methods, draft heads (--compare-draft) or tree shapes (--trees) side by side on a "
                    "prompt set, interleaved per question; writes results.json, results.md and plots to --out. "
                    "`eaglespec bench profile` times the phases of a speculative step instead.")
    p.add_argument("--questions", default=None,
                   help=f"MT-bench/Spec-Bench question file (JSONL), or a built-in set: {', '.join(BUILTIN_SETS)} "
                        "(default: sharegpt, the held-out slice)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ", ".join(METHODS + llamacpp.METHODS) + " (default: all of them, eagle-lookup "
                        "and weighed-lookup only with --lookup >= 1; with --trees: plain). eagle-lookup is the dynamic "
                        "tree with the --lookup chain grafted in; weighed-lookup the chain alone, as many of its tokens "
                        "a step as pay by the measured cost (what generate runs for a model without a head); "
                        "prompt-lookup the whole chain every step")
    p.add_argument("--trees", nargs="*", default=None, metavar="SHAPE",
                   help="also run EAGLE with each of these tree shapes, labelled tree:SHAPE: static:NAME (a preset) "
                        "or K,D,N[,L[,P]], a dynamic tree of top_k K, depth D and N nodes (N = auto: as many as "
                        "pay by the cost of a node measured on this machine), optionally with a "
                        "prompt-lookup chain of L tokens (default 0) and a confidence floor P (default 0). "
                        f"With no shape: {' '.join(SWEEP_TREES)}")
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
                   help="more draft heads: their eagle methods run in the same loop, labelled METHOD@NAME "
                        "(NAME: the head's folder, or its parent's when the folder is called 'head'), so heads "
                        "are compared side by side rather than across noisy runs")
    add_model_args(p)
    add_draft_args(p, several_weights=True)
    llamacpp.add_llamacpp_args(p)
    p.set_defaults(func=run)
    register_profile(p.add_subparsers(dest="bench_command", metavar="{profile}"))


def register_profile(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="where a speculative step's time goes: drafting, verification, the rest",
        description="Plain decoding and EAGLE (one run per --draft-weights) in turn on the first turn of each "
                    "question, each phase of a step timed: drafting, the verification forward, cache compaction "
                    "and the rest of the loop.")
    p.add_argument("--questions", default="sharegpt",
                   help=f"a question file (MT-bench / Spec-Bench JSONL) or a built-in set: {', '.join(BUILTIN_SETS)} "
                        "(default: sharegpt)")
    p.add_argument("--limit", type=int, default=1, help="questions per category (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default 128)")
    p.add_argument("--forward-scan", type=int, default=0, metavar="CTX",
                   help="also time one target forward over q = 1..32 new tokens after a CTX-token context")
    p.add_argument("--prefill-scan", type=int, nargs="+", default=None, metavar="LEN",
                   help="only time the prompt prefill at these lengths, with and without its sdpa")
    add_model_args(p, backend=False)  # profiles the torch target's phases
    g = p.add_argument_group("draft")
    add_draft_path_arg(g)
    add_tree_args(g)
    add_draft_weights_arg(g, several=True)
    p.set_defaults(func=run_profile)


def bench_questions(source: str, categories: list[str] | None, limit: int | None, turns: int | None = None) -> list:
    """The questions of a file or built-in set, kept by category and per-category limit."""
    from eaglespec.bench.run import BenchError, builtin_questions, load_questions, select

    if limit is not None and limit < 1:
        raise BenchError(f"--limit must be >= 1, got {limit}")
    if source in BUILTIN_SETS:
        questions = builtin_questions(source, None if categories else limit)
    else:
        questions = load_questions(source)
    questions = select(questions, categories, limit)
    if turns is not None:
        if turns < 1:
            raise BenchError(f"--turns must be >= 1, got {turns}")
        questions = [replace(q, turns=q.turns[:turns]) for q in questions]
    return questions


def chosen_methods(args) -> list[str]:
    """--methods, or its default: every method (eagle-lookup and weighed-lookup only with a chain), or with --trees
    the baseline alone."""
    if args.methods is not None:
        return [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.trees is not None:
        return [BASELINE]
    return [m for m in METHODS if m not in CHAIN_METHODS or args.lookup > 0]


def run(args) -> int:
    from eaglespec.bench.run import (BenchError, build_runners, head_pairs, head_pairs_markdown, markdown, parse_tree,
                                     plots, run_bench, summarize, tree_runners)
    from eaglespec.eagle3 import head_kind
    from eaglespec.generate import GenerationConfig
    from eaglespec.heads import load_head
    from eaglespec.target import load_model

    # validate everything cheap before loading anything or touching --out
    check_lookup(args)
    methods, llama_methods = llamacpp.split_methods(chosen_methods(args))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BenchError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    for m in CHAIN_METHODS:
        if m in methods and args.lookup < 1:
            raise BenchError(f"{m} drafts with the --lookup chain: it needs --lookup >= 1")
    trees = None if args.trees is None else list(args.trees or SWEEP_TREES)
    for spec in trees or []:
        parse_tree(spec)
    tree_config(args)  # bad sizes fail before the model loads
    cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                           top_p=1.0, top_k=0)
    source = args.questions or "sharegpt"
    questions = bench_questions(source, cats, args.limit, args.turns)
    path = head_path(args)
    path = path if path and not args.no_draft else None
    if path is not None:
        head_kind(path)  # a missing or unreadable head fails before the target loads
    if path is None and (trees or any(m.startswith("eagle") for m in methods)):
        raise BenchError("eagle methods and --trees need a draft head: pass --draft PATH (none ships for this model)")

    extra_heads = compared_heads(args.compare_draft)
    if extra_heads and not trees and not any(m.startswith("eagle") for m in methods):
        raise BenchError("--compare-draft needs an eagle method in --methods, or --trees")
    if len(args.draft_weights) != len(set(args.draft_weights)):
        raise BenchError(f"--draft-weights names a layout twice: {' '.join(args.draft_weights)}")
    if len(args.draft_weights) > 1 and not trees and not any(m.startswith("eagle") for m in methods):
        raise BenchError("several --draft-weights need an eagle method in --methods, or --trees")
    import torch

    llama_cfg = llamacpp.config_from_args(args, llama_methods, torch.get_num_threads(),
                                          cpu=args.device == "cpu") if llama_methods else None
    drafting = bool(trees) or any(m.startswith("eagle") or m in ("prompt-lookup", "weighed-lookup") for m in methods)
    target = load_target_from(args, drafts=drafting)  # as generate: a run that never drafts runs as llama.cpp does
    # heads of either kind (EAGLE-1/2 or EAGLE-3), loaded for this target's depth
    layers = target.num_layers
    head = load_head(path, layers) if path is not None else None
    extra_heads = {name: load_head(p, layers) for name, p in extra_heads.items()}
    tree = tree_config(args, target.device, target.dtype)
    # transformers' generate() runs a model of its own, stock: no packed weights, sdpa attention
    stock = (load_model(args.model, dtype=target.dtype, device=args.device, attn_implementation="sdpa")[0]
             if any(m.startswith("hf-") for m in methods) else None)
    weights, *more_weights = args.draft_weights  # the first for the methods as named, each other as METHOD@WEIGHTS
    runners = build_runners(target, methods, head, tree, lookup=args.lookup, draft_weights=weights, stock_model=stock)
    if trees:
        runners.update(tree_runners(target, head, trees, draft_weights=weights))
    eagle_methods = [m for m in methods if m.startswith("eagle")]
    # labelled METHOD@NAME: each further layout with the --draft head, each --compare-draft head with the first layout
    variants = [(w, head, w) for w in more_weights] + [(name, other, weights) for name, other in extra_heads.items()]
    for name, other, w in variants:
        more = build_runners(target, eagle_methods, other, tree, lookup=args.lookup, draft_weights=w)
        if trees:
            more.update(tree_runners(target, other, trees, draft_weights=w))
        runners.update({f"{m}@{name}": r for m, r in more.items() if m != BASELINE})
    with llamacpp.llamacpp_runners(llama_methods, llama_cfg) as more:  # servers stop on any exit
        runners.update(more)
        records = [vars(r) for r in run_bench(target, runners, questions, cfg, warmup=args.warmup,
                                              rotate=not args.fixed_order)]
    table = summarize(records)
    pairs = head_pairs(records)

    machine = (f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
               f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"## eaglespec bench: {source}, {len(questions)} questions, {str(target.dtype).removeprefix('torch.')}, "
              f"temperature {args.temperature}, max_new_tokens {args.max_new_tokens}, turns {args.turns or 'all'}\n\n"
              f"Machine: {machine}. Tree: {tree}. Draft weights: {', '.join(args.draft_weights)}."
              + (f" Target on llama.cpp: {target.build}." if hasattr(target, "build") else ""))
    mismatches = [r for r in records if r["equal_to_baseline"] is False]
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("func", "bench_command")}
    # write into a fresh folder and swap it in, so a failed run never leaves a half-written --out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}-"))
    (tmp / "results.json").write_text(json.dumps({"settings": {**settings, "dtype": str(target.dtype).removeprefix("torch.")},
                                                  "machine": machine, "summary": table, "head_pairs": pairs,
                                                  "runs": records}, indent=1))
    md = markdown(table, header)
    if pairs:
        md += "\nHeads side by side, per turn (the --draft head's tau minus the compared head's):\n\n" + head_pairs_markdown(pairs)
    if mismatches:
        md += "\nOutputs that differ from plain decoding:\n" + "".join(
            f"- question {r['question_id']} turn {r['turn']} {r['method']}\n" for r in mismatches)
    md += llamacpp.markdown(records)
    (tmp / "results.md").write_text(md)
    plots(records, table, tmp)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.replace(args.out)
    print(md)
    return 0


def compared_heads(paths: list[str]) -> dict:
    """Label -> head folder (EAGLE-1/2 or EAGLE-3) for --compare-draft; labels are folder names,
    made unique. Each folder is checked to hold a head before the target loads."""
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
        head_kind(path)
        heads[label] = path
    return heads


def run_profile(args) -> int:
    from eaglespec.bench.profile import forward_scan, prefill_scan, profile_steps
    from eaglespec.draft import DraftHead
    from eaglespec.eagle3 import head_kind
    from eaglespec.generate import GenerationConfig

    if args.prefill_scan:
        print(prefill_scan(load_target_from(args), args.prefill_scan))
        return 0
    questions = bench_questions(args.questions, None, args.limit)
    path = head_path(args)
    if path is None:
        raise UsageError("bench profile times a draft head: pass --draft PATH (none ships for this model)")
    tree_config(args)  # bad sizes fail before the model loads
    if head_kind(path) != "eagle":
        raise UsageError("bench profile times EAGLE-1/2 heads; time an EAGLE-3 head with plain `eaglespec bench`")
    target = load_target_from(args)
    head = DraftHead.from_pretrained(path)
    tree = tree_config(args, target.device, target.dtype)
    print(profile_steps(target, head, tree, questions, GenerationConfig(max_new_tokens=args.max_new_tokens),
                        args.draft_weights))
    if args.forward_scan:
        print(forward_scan(target, args.forward_scan))
    return 0
