"""`eaglespec generate`: stream the model's answer to a prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from eaglespec.cli.common import UsageError, add_draft_args, add_model_args, add_sampling_args, load_engine


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream the model's answer to a prompt")
    p.add_argument("prompt", nargs="?", help="user prompt (or use --messages)")
    p.add_argument("--messages", type=Path, help="JSON file: a list of {role, content} chat messages")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to PROMPT")
    p.add_argument("--json", action="store_true", help="print only one JSON object with text and statistics")
    add_model_args(p)
    add_draft_args(p)
    add_sampling_args(p)
    # nothing is left to write once the answer is out: skip the interpreter's ~1 s teardown
    p.set_defaults(func=run, exit_at_once=True)


def read_prompt(args) -> str | list:
    """PROMPT, or the message list of --messages."""
    if args.messages and args.prompt:
        raise UsageError("give a PROMPT or --messages, not both")
    if args.messages:
        try:
            messages = json.loads(args.messages.read_text())
        except FileNotFoundError:
            raise UsageError(f"messages file not found: {args.messages}") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{args.messages} is not valid JSON: {e}") from None
        if not isinstance(messages, list):
            raise UsageError(f"{args.messages} must hold a JSON list of messages")
        return messages
    if args.prompt is None or not args.prompt.strip():
        raise UsageError("the prompt is empty")
    return args.prompt


def run(args) -> int:
    from eaglespec.generate import GenerationConfig

    prompt = read_prompt(args)
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
