"""`eaglespec` command line: generate, train, bench.

Every user error ends in one line on stderr (`eaglespec: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from eaglespec.backends import default_tree
from eaglespec.backends.cpu.trees import CPU_BF16_AMX_TREE, CPU_BF16_NO_AMX_TREE, CPU_FP32_TREE
from eaglespec.drafter import TreeConfig

log = logging.getLogger("eaglespec")


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="transformers folder or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto",
                   help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on GPUs and on CPUs with AMX or "
                        "AVX-512 bf16, else float32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--max-len", type=int, default=2048, help="KV cache length: prompt + new tokens + tree")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-pack", action="store_true",
                   help="keep stock nn.Linear weights (bf16 on CPU pre-packs them for oneDNN by default)")


#: default length of the prompt-lookup chain grafted into EAGLE's tree (see the README's bench)
LOOKUP_TOKENS = 8


def add_draft_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("draft")
    g.add_argument("--draft", default=None,
                   help="EAGLE-1/2 or EAGLE-3 head folder (default: the head shipped for the default model)")
    g.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding")
    d = TreeConfig()
    g.add_argument("--tree", choices=["static", "dynamic"], default=d.kind)
    f, amx, b16 = CPU_FP32_TREE, CPU_BF16_AMX_TREE, CPU_BF16_NO_AMX_TREE

    def tree_help(what: str, key: str) -> str:
        return (f"dynamic tree: {what} (default {getattr(d, key)}; on CPU: fp32 {f[key]}, "
                f"bf16 with AMX {amx[key]}, bf16 without AMX {b16[key]})")

    g.add_argument("--top-k-draft", type=int, default=None, help=tree_help("children per node", "top_k"))
    g.add_argument("--depth", type=int, default=None, help=tree_help("deepest guess", "depth"))
    g.add_argument("--total-tokens", type=int, default=None, help=tree_help("nodes verified per step", "total_tokens"))
    g.add_argument("--min-draft-prob", type=float, default=None, metavar="P",
                   help=tree_help("verify only guesses of cumulative draft probability >= P, the best one always; "
                                  "0 = total-tokens nodes every step", "min_prob"))
    g.add_argument("--static-tree", default=d.static_tree, help="static tree preset (cpu_small, mc_sim_7b_63)")
    g.add_argument("--lookup", type=int, default=LOOKUP_TOKENS, metavar="N",
                   help="graft a prompt-lookup chain of up to N tokens into the draft tree (0 = off)")
    g.add_argument("--draft-weights", choices=["auto", "int8", "full"], default="auto",
                   help="store the draft's weights as int8 (auto: on CPU, where a draft step is bound by reading "
                        "them); changes what is proposed, never what is accepted")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def tree_config(args, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> TreeConfig:
    """The tree the flags ask for; unset sizes come from `default_tree` for the target's device and dtype."""
    return default_tree(torch.device(device), dtype, kind=args.tree, top_k=args.top_k_draft, depth=args.depth,
                        total_tokens=args.total_tokens, min_prob=args.min_draft_prob, static_tree=args.static_tree)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eaglespec", description="Lossless speculative decoding with EAGLE draft heads")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream the model's answer to a prompt")
    g.add_argument("prompt", nargs="?", help="user prompt (or use --messages)")
    g.add_argument("--messages", type=Path, help="JSON file: a list of {role, content} chat messages")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template to PROMPT")
    g.add_argument("--json", action="store_true", help="print only one JSON object with text and statistics")
    add_model_args(g)
    add_draft_args(g)
    add_sampling_args(g)

    from eaglespec.train.cli import add_train_parser
    from eaglespec.bench.cli import add_bench_parser

    add_train_parser(sub)
    add_bench_parser(sub)
    return p


def setup_torch(args) -> None:
    import torch

    if getattr(args, "threads", None):
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def load_engine(args, need_tokenizer: bool = True):
    """Target + drafter from the common flags."""
    from eaglespec.backends import draft_setup
    from eaglespec.generate import Generator
    from eaglespec.heads import default_head_path, load_drafter
    from eaglespec.target import load_target

    if args.max_len < 16:
        raise UsageError(f"--max-len must be >= 16, got {args.max_len}")
    tree_config(args)  # bad sizes fail before the model loads
    target = load_target(args.model, dtype=args.dtype, device=args.device, max_len=args.max_len, pack=not args.no_pack)
    tree = tree_config(args, target.device, target.dtype)
    if need_tokenizer and target.tokenizer is None:
        raise UsageError(f"{args.model}: no tokenizer found")
    drafter = None
    if not args.no_draft:
        path = args.draft or (default_head_path() if args.model is None else None)
        if path is not None:
            if args.lookup < 0:
                raise UsageError(f"--lookup must be >= 0, got {args.lookup}")
            setup = draft_setup(target.device, target.dtype, args.draft_weights)
            drafter = load_drafter(path, target, tree, setup, lookup=args.lookup)  # EAGLE-1/2 or EAGLE-3
    return Generator(target, drafter)


def cmd_generate(args) -> int:
    from eaglespec.generate import GenerationConfig

    if args.messages and args.prompt:
        raise UsageError("give a PROMPT or --messages, not both")
    if args.messages:
        try:
            prompt = json.loads(args.messages.read_text())
        except FileNotFoundError:
            raise UsageError(f"messages file not found: {args.messages}") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{args.messages} is not valid JSON: {e}") from None
        if not isinstance(prompt, list):
            raise UsageError(f"{args.messages} must hold a JSON list of messages")
    elif args.prompt is None or not args.prompt.strip():
        raise UsageError("the prompt is empty")
    else:
        prompt = args.prompt
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    engine = load_engine(args)
    ids = engine.encode(prompt, chat=not args.raw)
    if args.json:
        result = engine.generate(ids, config)
        print(json.dumps({"text": result.text, **result.stats.as_dict()}))
        return 0
    for piece in engine.stream(ids, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = engine.last_stats
    print(f"[{s.new_tokens} tokens, {s.target_forwards} target forwards, tau {s.mean_accept_len:.2f}, "
          f"{s.mean_tree_size:.1f} nodes verified per step, {s.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    from eaglespec.draft import DraftHeadError
    from eaglespec.target import TargetLoadError

    handlers = {"generate": cmd_generate}
    from eaglespec.bench.cli import cmd_bench
    from eaglespec.train.cli import cmd_train

    handlers.update(train=cmd_train, bench=cmd_bench)
    try:
        setup_torch(args)
        return handlers[args.command](args)
    except (UsageError, ValueError, DraftHeadError, TargetLoadError, FileNotFoundError) as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"eaglespec: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eaglespec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
