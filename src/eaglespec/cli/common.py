"""What the subcommands share: their argument groups, the error that every bad input ends in, torch
set-up, and loading the target and the engine from the flags.

Nothing heavy is imported at module level: `eaglespec --help` builds every parser and must not
pay for torch or transformers. Help texts therefore describe defaults that depend on the machine
in words. This module imports no other part of eaglespec.cli, and only eaglespec.cli imports it.
"""

from __future__ import annotations

import argparse
import logging

from eaglespec.engine import BACKENDS, DRAFT_WEIGHTS, LOOKUP_TOKENS  # light: no torch

log = logging.getLogger("eaglespec")


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


# -- argument groups ------------------------------------------------------------------------------

def add_model_arg(g) -> None:
    g.add_argument("--model", default=None, help="transformers folder or .gguf file (default: SmolLM2-135M-Instruct)")


def add_model_args(p: argparse.ArgumentParser, backend: bool = True) -> None:
    """The model flags; backend=False for subcommands that need the torch target (training)."""
    g = p.add_argument_group("model")
    add_model_arg(g)
    g.add_argument("--dtype", default="auto",
                   help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on GPUs and on CPUs with AMX or "
                        "AVX-512 bf16, else float32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--max-len", type=int, default=2048, help="KV cache length: prompt + new tokens + tree")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-pack", action="store_true",
                   help="keep stock nn.Linear weights (bf16 on CPU pre-packs them for oneDNN by default)")
    if backend:
        add_backend_args(g)


def add_backend_args(g) -> None:
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what evaluates the target: torch (transformers) or llamacpp (llama.cpp on the GGUF file, "
                        "CPU only; --dtype and --no-pack do not apply; EAGLE-1/2 heads only). auto: llamacpp when "
                        "llama-cpp-python is installed, the model is a GGUF file and the device a CPU, else torch")
    g.add_argument("--llamacpp-fast", action="store_true",
                   help="llama.cpp backend: decode lone tokens alone and reuse rejected KV cells (faster; greedy "
                        "output may then differ from plain decoding where two tokens nearly tie)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads alone, for subcommands that take no other model flag."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_draft_path_arg(g) -> None:
    g.add_argument("--draft", default=None, help="EAGLE-1/2 or EAGLE-3 head folder (default: the head shipped for the default model)")


def add_tree_args(g) -> None:
    """The tree flags; those left unset come from TreeConfig and `default_tree` once the target's
    device and dtype are known (`tree_config`)."""
    g.add_argument("--tree", choices=["static", "dynamic"], default=None,
                   help="EAGLE-1 static or EAGLE-2 dynamic tree (default: dynamic)")
    g.add_argument("--top-k-draft", type=int, default=None,
                   help="dynamic tree: children per node (default 4)")
    g.add_argument("--depth", type=int, default=None,
                   help="dynamic tree: deepest guess (default: 8 on CPUs, 5 on GPUs)")
    g.add_argument("--total-tokens", type=int, default=None,
                   help="dynamic tree: nodes verified per step, root included; given alone, every step verifies "
                        "this many (default: on CPUs as many as pay on this machine, up to 64, see --tree-sizing; "
                        "16 on GPUs)")
    g.add_argument("--tree-sizing", choices=["cost", "fixed"], default=None,
                   help="dynamic tree: 'cost' sizes each step's tree by the cost of a verified node, measured once "
                        "per machine and model (a few seconds, then cached), up to --total-tokens; 'fixed' "
                        "verifies --total-tokens nodes every step (default: cost on CPUs unless --total-tokens is "
                        "given, fixed on GPUs)")
    g.add_argument("--min-draft-prob", type=float, default=None, metavar="P",
                   help="dynamic tree: verify only guesses of cumulative draft probability >= P, the best one "
                        "always (default 0: no floor)")
    g.add_argument("--static-tree", default=None, help="static tree preset: cpu_small (default) or mc_sim_7b_63")


def add_lookup_arg(g) -> None:
    g.add_argument("--lookup", type=int, default=LOOKUP_TOKENS, metavar="N",
                   help=f"graft a prompt-lookup chain of up to N tokens into the EAGLE tree (default {LOOKUP_TOKENS}; "
                        "0 = off, the tree alone); a model without a head drafts with this chain alone (0: plain "
                        "decoding)")


def add_draft_weights_arg(g, several: bool = False) -> None:
    kw = dict(nargs="+", default=["auto"]) if several else dict(default="auto")
    g.add_argument("--draft-weights", choices=DRAFT_WEIGHTS, **kw,
                   help="how the draft's weights are stored: int8, fp16 (fp32 arithmetic, CPUs), full, or auto (what "
                        "pays here: a draft step on a CPU is bound by reading them); changes what is proposed, never "
                        "what is accepted"
                        + ("; several are run in turn on each prompt, side by side" if several else ""))


def add_draft_args(p: argparse.ArgumentParser, several_weights: bool = False) -> None:
    g = p.add_argument_group("draft")
    add_draft_path_arg(g)
    g.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding")
    add_tree_args(g)
    add_lookup_arg(g)
    add_draft_weights_arg(g, several=several_weights)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


# -- from flags to objects -----------------------------------------------------------------------

def setup_torch(args) -> None:
    """--threads, checked before anything loads."""
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def quiet_transformers(args) -> None:
    """transformers' progress bars and warnings off, unless -v."""
    if getattr(args, "verbose", False):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_lookup(args) -> None:
    if args.lookup < 0:
        raise UsageError(f"--lookup must be >= 0, got {args.lookup}")


def tree_config(args, device="cpu", dtype=None):
    """The tree the flags ask for; unset sizes come from `default_tree` for the target's device and
    dtype (bfloat16 when not given)."""
    import torch

    from eaglespec.backends import default_tree

    return default_tree(torch.device(device), dtype or torch.bfloat16, **tree_options(args))


def tree_options(args) -> dict:
    """The tree flags that were given, as `default_tree` keywords (`EngineConfig.tree`)."""
    given = dict(kind=getattr(args, "tree", None), top_k=getattr(args, "top_k_draft", None),
                 depth=getattr(args, "depth", None), total_tokens=getattr(args, "total_tokens", None),
                 min_prob=getattr(args, "min_draft_prob", None), sizing=getattr(args, "tree_sizing", None),
                 static_tree=getattr(args, "static_tree", None))
    return {k: v for k, v in given.items() if v is not None}


def engine_config(args):
    """The `EngineConfig` of the model, draft and tree flags (those a subcommand lacks keep their
    defaults); bad values end in `UsageError`."""
    from eaglespec.engine import EngineConfig

    if args.max_len < 16:
        raise UsageError(f"--max-len must be >= 16, got {args.max_len}")
    weights = getattr(args, "draft_weights", "auto")
    if not isinstance(weights, str):  # the benches take several layouts and build their drafters themselves
        weights = "auto"
    try:
        return EngineConfig(model=args.model, draft=getattr(args, "draft", None) or "default",
                            speculate=not getattr(args, "no_draft", False), backend=getattr(args, "backend", "torch"),
                            device=args.device, dtype=args.dtype, threads=getattr(args, "threads", None),
                            max_len=args.max_len, lookup=getattr(args, "lookup", LOOKUP_TOKENS), tree=tree_options(args),
                            draft_weights=weights,
                            exact=not getattr(args, "llamacpp_fast", False), pack=not args.no_pack)
    except ValueError as e:
        raise UsageError(str(e)) from None


def chosen_backend(args) -> str:
    """"torch" or "llamacpp", from --backend (`eaglespec.engine.choose_backend`)."""
    from eaglespec.engine import choose_backend

    try:
        return choose_backend(args.model, getattr(args, "backend", "torch"), args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_target_from(args, dtype: str | None = None, attn_implementation: str | None = None, drafts: bool = True):
    """The target of the model flags, on the backend --backend picks (`eaglespec.engine.load_engine_target`);
    `dtype` overrides --dtype (torch backend). drafts False: no draft head exists for this model, so
    on llama.cpp the target runs as llama.cpp itself runs it."""
    from eaglespec.engine import load_engine_target

    config = engine_config(args)
    chosen_backend(args)  # a backend that cannot run is one line, before anything loads
    quiet_transformers(args)
    return load_engine_target(config, drafts=drafts, dtype=dtype, attn_implementation=attn_implementation)


def head_path(args):
    """--draft, else the head shipped for the default model (None for another --model)."""
    from eaglespec.engine import EngineConfig

    return EngineConfig(model=args.model, draft=args.draft or "default").head_path()


def load_engine(args, need_tokenizer: bool = True):
    """Target + drafter from the common flags (`eaglespec.engine.load_engine`)."""
    from eaglespec import engine
    from eaglespec.backends.llamacpp import LlamaCppError

    check_lookup(args)
    tree_config(args)  # bad sizes fail before the model loads
    config = engine_config(args)
    chosen_backend(args)
    quiet_transformers(args)
    try:
        gen = engine.load_engine(config)
    except LlamaCppError as e:  # this head or file cannot draft on llama.cpp, and --backend asked for it
        raise UsageError(str(e)) from None
    if need_tokenizer and gen.tokenizer is None:
        raise UsageError(f"{args.model}: no tokenizer found")
    return gen
