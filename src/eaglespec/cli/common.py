"""What the subcommands share: their argument groups, the error that every bad input ends in, torch
set-up, and loading the target and the engine from the flags.

Nothing heavy is imported at module level: `eaglespec --help` builds every parser and must not
pay for torch or transformers. Help texts therefore describe defaults that depend on the machine
in words. This module imports no other part of eaglespec.cli, and only eaglespec.cli imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("eaglespec")

#: length of the prompt-lookup chain grafted into EAGLE's tree unless --lookup says otherwise
#: (the README's bench: the chain recovers what the tree misses on copy-heavy prompts)
LOOKUP_TOKENS = 8

DRAFT_WEIGHTS = ("auto", "int8", "full")


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


BACKENDS = ("auto", "torch", "llamacpp")


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
                        "0 = off, the tree alone)")


def add_draft_weights_arg(g, several: bool = False) -> None:
    kw = dict(nargs="+", default=["auto"]) if several else dict(default="auto")
    g.add_argument("--draft-weights", choices=DRAFT_WEIGHTS, **kw,
                   help="store the draft's weights as int8 (auto: on CPU, where a draft step is bound by reading "
                        "them); changes what is proposed, never what is accepted"
                        + ("; several are run in turn on each prompt, side by side" if several else ""))


def add_draft_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("draft")
    add_draft_path_arg(g)
    g.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding")
    add_tree_args(g)
    add_lookup_arg(g)
    add_draft_weights_arg(g)


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

    return default_tree(torch.device(device), dtype or torch.bfloat16, kind=args.tree, top_k=args.top_k_draft,
                        depth=args.depth, total_tokens=args.total_tokens, min_prob=args.min_draft_prob,
                        sizing=args.tree_sizing, static_tree=args.static_tree)


def chosen_backend(args) -> str:
    """"torch" or "llamacpp", from --backend (auto: llamacpp for a GGUF model on a CPU when
    llama-cpp-python is installed)."""
    from eaglespec.backends.llamacpp import INSTALL_HINT, llamacpp_available

    backend = getattr(args, "backend", "torch")
    if backend == "torch":
        return "torch"
    gguf = args.model is None or str(args.model).endswith(".gguf")
    cpu = str(args.device) == "cpu"
    if backend == "llamacpp":
        if not llamacpp_available():
            raise UsageError(f"--backend llamacpp needs llama-cpp-python: {INSTALL_HINT}")
        if not gguf:
            raise UsageError(f"--backend llamacpp runs GGUF files; {args.model} is not one (use --backend torch)")
        if not cpu:
            raise UsageError(f"--backend llamacpp runs on the CPU, not {args.device} (use --backend torch)")
        return "llamacpp"
    return "llamacpp" if gguf and cpu and llamacpp_available() else "torch"


def load_target_from(args, dtype: str | None = None, attn_implementation: str | None = None, drafts: bool = True):
    """The target of the model flags, on the backend --backend picks; `dtype` overrides --dtype
    (torch backend). drafts False: no draft head exists for this model, so on llama.cpp exactness
    between speculative and plain decoding is moot and the target runs as llama.cpp itself runs it
    (f16 cache, no padding rows, no hidden states: `LlamaCppTargetConfig(exact=False, features=False)`)."""
    if args.max_len < 16:
        raise UsageError(f"--max-len must be >= 16, got {args.max_len}")
    quiet_transformers(args)
    if chosen_backend(args) == "llamacpp":
        from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
        from eaglespec.paths import default_gguf_path

        gguf = default_gguf_path() if args.model is None else args.model
        config = LlamaCppTargetConfig(threads=args.threads, max_len=args.max_len,
                                      exact=drafts and not args.llamacpp_fast, features=drafts)
        return LlamaCppTarget(gguf, config)
    from eaglespec.target import load_target

    return load_target(args.model, dtype=dtype or args.dtype, device=args.device, max_len=args.max_len,
                       pack=not args.no_pack, attn_implementation=attn_implementation)


def head_path(args):
    """--draft, else the head shipped for the default model (None for another --model)."""
    from eaglespec.heads import default_head_path

    return args.draft or (default_head_path() if args.model is None else None)


def load_engine(args, need_tokenizer: bool = True):
    """Target + drafter from the common flags."""
    from eaglespec.backends import draft_setup
    from eaglespec.generate import Generator
    from eaglespec.heads import load_drafter

    check_lookup(args)
    tree_config(args)  # bad sizes fail before the model loads
    has_head = head_path(args) is not None  # --no-draft still decodes as the drafting engine would
    target = load_target_from(args, drafts=has_head)
    if need_tokenizer and target.tokenizer is None:
        raise UsageError(f"{args.model}: no tokenizer found")
    path = None if args.no_draft else head_path(args)
    if path is None:
        return Generator(target, None)

    def drafter_on(target):  # EAGLE-1/2 or EAGLE-3
        tree = tree_config(args, target.device, target.dtype)
        return load_drafter(path, target, tree, draft_setup(target.device, target.dtype, args.draft_weights),
                            lookup=args.lookup)

    from eaglespec.backends.llamacpp import LlamaCppError

    try:
        return Generator(target, drafter_on(target))
    except LlamaCppError as e:  # this head or this file cannot draft on llama.cpp
        if getattr(args, "backend", "torch") != "auto":
            raise UsageError(str(e)) from None
        print(f"eaglespec: {e.reason}; running the target on PyTorch instead (--backend auto)", file=sys.stderr)
        getattr(target, "close", lambda: None)()
        args.backend = "torch"
        target = load_target_from(args)
        return Generator(target, drafter_on(target))
