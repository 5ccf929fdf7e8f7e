"""The target LLM: load it, and run it over a prefix or a token tree, exposing its features.

The model is an unmodified transformers `*ForCausalLM`. A tree forward passes a 4D additive
attention mask and explicit `position_ids`, which every decoder-only model in transformers accepts.
The features a forward returns are what the draft head reads: by default the decoder's last hidden
state (after the final norm: the LM head's input), as EAGLE-1/2 heads consume it; after
`set_feature_layers(ids)`, the inputs of those decoder layers side by side, EAGLE-3's fused
feature (aux_features.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from eaglespec.attention import FP32_ATTENTION, default_implementation, sdpa_prefill
from eaglespec.aux_features import capture_aux
from eaglespec.backends import auto_dtype, exact_rows, optimize_target, weights_fingerprint
from eaglespec.backends.base import TargetCache, TargetModel, TargetOutput  # noqa: F401 (their home before)
from eaglespec.kv_cache import TargetKVCache
from eaglespec.paths import (CONVERTED_LAYOUT, CONVERTED_MARKER, TargetLoadError, converted_dir,  # noqa: F401
                             default_gguf_path, find_converted, write_folder)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype from its name; "auto" is the fastest exact-enough one for the device."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto_dtype(torch.device(device))
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def checkpoint_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's tensors under a transformers checkpoint's names, each stored once: an output
    embedding tied to the input embedding is stored as the input embedding only (as
    `save_pretrained` does)."""
    state = model.state_dict()
    embed = model.get_input_embeddings()
    embed_key = next(name for name, m in model.named_modules() if m is embed) + ".weight"
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is embed.weight and name != embed_key:
            state.pop(name, None)
    return {k: v.contiguous() for k, v in state.items()}


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a standard transformers folder (fp32 safetensors) and
    return it.

    transformers refuses `save_pretrained` on a GGUF-loaded model and leaves a
    `quantization_config` in its config, so the weights are written with safetensors directly
    (`write_converted`). fp32 holds the dequantized values exactly.
    """
    found = find_converted(gguf)
    if found is not None:
        return found
    out = converted_dir(gguf)

    def convert(tmp: Path) -> None:
        log.warning("converting %s to %s (once; about 30 s)", gguf.name, out)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        write_converted(model, tokenizer, tmp, source=gguf.name)

    return write_folder(out, convert, prefix=".convert-")


def write_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: str) -> None:
    """Write a model and its tokenizer as a converted folder: a standard transformers folder (fp32
    safetensors, `checkpoint_state` names, a config without `quantization_config` that names the
    architecture) plus CONVERTED_MARKER."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    save_file(checkpoint_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / CONVERTED_MARKER).write_text(json.dumps({"layout": CONVERTED_LAYOUT, "source": source}))


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_pretrained`, with the added tokens listed in tokenizer_config.json as transformers
    writes them for other tokenizers. transformers leaves them out for a tokenizers-backed one,
    and then reads them back at every load by parsing all of tokenizer.json in Python (about
    0.2 s for SmolLM2's 3.5 MB); with them listed it skips that parse and builds the same
    tokenizer (tests/test_startup.py)."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in tokenizer.added_tokens_decoder.items()}
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_converted(folder: Path, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    """A converted folder (`write_converted`), loaded the short way: the model built from its
    config without random initialization, its one safetensors file cast to `dtype` and assigned in
    place, the tied weights tied again. `from_pretrained` builds the same model (tests/test_startup.py)
    but first plans a generic load (a conversion mapping of every architecture, ~0.15 s of regular
    expressions at each start). Raises TargetLoadError if the file lacks a weight the model has."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(folder))
    with no_init_weights():  # every weight is assigned below; buffers (RoPE) are computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    # copy=True: tensors of their own, not views of the file's read-only mapping
    state = {k: v.to(dtype=dtype, copy=True) for k, v in load_file(str(folder / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    loaded = {t.data_ptr() for t in state.values()}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise TargetLoadError(f"{folder}: weights missing {untied}, unexpected {unexpected}; delete the folder "
                              "to convert the model again")
    model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def resolve_model_path(model: str | None) -> Path:
    """None -> the default model's converted folder; *.gguf -> converted folder; a folder -> itself."""
    if model is None:
        return convert_gguf(default_gguf_path())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TargetLoadError(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise TargetLoadError(f"not a transformers model folder (no config.json): {path}")
    return path


def cache_dtypes(config) -> tuple[torch.dtype | None, torch.dtype | None]:
    """KV storage dtypes: float64 keys and values for eaglespec's fp32 attention (what its sums
    run in, so no per-step conversion of the whole cache), the model's dtype otherwise."""
    if getattr(config, "_attn_implementation", None) == FP32_ATTENTION:
        return torch.float64, torch.float64
    return None, None


class Target:
    """A causal LM with a preallocated KV cache and a forward over token trees.

    The constructor leaves the model's modules as they are: making them fast on the hardware
    (pre-packed weights on a CPU) is the explicit step `eaglespec.backends.optimize_target`, which
    `load_target` takes by default."""

    prompt_hidden_costs_logits = False  # a prompt's hidden states come with its forward

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, max_len: int = 2048) -> None:
        config = model.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise TargetLoadError(f"{config.model_type}: logits post-processed after the LM head are not supported")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.decoder = model.get_decoder()
        #: the decoder's keyword for a KV cache: `cache` since transformers deprecated
        #: `past_key_values` (read from its signature, so older transformers keep working)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        self.embed = model.get_input_embeddings()
        self.config = config
        self.max_len = max_len
        #: largest tree verified in one forward (None: no limit); bigger trees run in blocks
        self.exact_rows: int | None = exact_rows(self.device, self.dtype)
        self.cache = TargetKVCache(config.num_hidden_layers, max_len, *cache_dtypes(config))
        #: prefill with sdpa under eaglespec's exact attention (attention.sdpa_prefill): every
        #: decoding path prefills a prompt alike, so only later steps need batch-invariant bits
        self.sdpa_prefill = True
        self._feature_layers: tuple[int, ...] | None = None

    @property
    def feature_layers(self) -> tuple[int, ...] | None:
        """The decoder layers whose inputs `forward` returns as features; None: the last hidden state."""
        return self._feature_layers

    def set_feature_layers(self, layer_ids: Sequence[int] | None) -> None:
        """Make `prefill` and `forward` return as features the inputs of these decoder layers side
        by side ([q, len(ids) x hidden]: EAGLE-3's fused feature, e.g. layers (2, 15, 27) of a
        30-layer target), or, with None, the last hidden state. Whoever builds the engine calls it
        for the head it drafts with (`eaglespec.heads.load_drafter` does); the logits never change."""
        if layer_ids is None:
            self._feature_layers = None
            return
        ids = tuple(int(i) for i in layer_ids)
        n = self.config.num_hidden_layers
        if not ids or any(not 0 <= i < n for i in ids):
            raise ValueError(f"feature layers {list(ids)} must be a non-empty list of layers in [0, {n})")
        self._feature_layers = ids

    @property
    def lm_head(self) -> torch.nn.Module:
        """The LM head, read from the model each time (`optimize_target` may swap it for a packed one)."""
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """End-of-sequence ids of the model's generation config (the tokenizer's are added by the caller)."""
        e = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if e is None:
            return frozenset()
        return frozenset({e}) if isinstance(e, int) else frozenset(int(i) for i in e)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def reset(self) -> None:
        self.cache.reset()

    def cost_key(self) -> str:
        """What the time of a forward depends on besides the machine, to key a measured cost curve
        (`eaglespec.cost.probe_cost_curve`): the weights (their files' fingerprint, and the
        architecture's shapes), dtype, device, threads, attention, how the linears are stored
        (packed, int8 or stock) and the block size of big trees."""
        config = json.dumps(self.config.to_diff_dict(), sort_keys=True, default=str)
        # leaf module kinds and counts, e.g. "PackedLinear 211, LlamaRMSNorm 61, ...": packing shows here
        kinds: dict[str, int] = {}
        for m in self.model.modules():
            if next(m.children(), None) is None:
                kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
        device = str(self.device) + (f" {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else "")
        parts = [f"weights {weights_fingerprint(self.model, self.dtype)}",
                 f"config {hashlib.sha256(config.encode()).hexdigest()[:16]}", f"dtype {self.dtype}",
                 f"device {device}", f"threads {torch.get_num_threads()}",
                 f"attention {getattr(self.config, '_attn_implementation', None)}",
                 f"modules {sorted(kinds.items())}", f"exact rows {self.exact_rows}"]
        return "; ".join(parts)

    @property
    def sliding_window(self) -> int | None:
        """The window of the model's sliding-window layers, when it mixes them with full-attention
        ones (Gemma 3: 5 of every 6 layers see only the last 512 positions); else None."""
        if "sliding_attention" not in (getattr(self.config, "layer_types", None) or ()):
            return None
        return getattr(self.config, "sliding_window", None)

    def attention_mask(self, tree_mask: torch.Tensor, q: int, positions: torch.Tensor | None = None
                       ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive mask [1, 1, q, length + q]: the committed prefix is visible to all; among the
        new tokens, row i sees column j iff tree_mask[i, j]. positions: [q] the new tokens' absolute
        positions (default: length + arange(q)).

        A model with sliding-window layers gets one mask per layer type, as transformers takes
        them: in the sliding layers a node also sees only keys less than a window behind its own
        position (its depth in the tree, not its row)."""
        past = self.cache.length
        if positions is None:
            positions = torch.arange(past, past + q, device=self.device)
        return self._block_mask(tree_mask, positions, past, 0)

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """[q, k] bool -> [1, 1, q, k] additive mask in the model's dtype."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[None, None]

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
        last_logits_only: bool = False,
    ) -> TargetOutput:
        """Run q new tokens after the committed prefix; their keys land in the cache slots
        [length, length + q) while `length` stays put (the caller commits with `cache.compact`).

        tokens: [q] long; positions: [q] absolute positions (default: length + arange(q));
        tree_mask: [q, q] bool ancestor-or-self mask (default: causal); last_logits_only: run the
        LM head on the last row alone (logits [1, vocab]), as a prompt needs.
        """
        q = tokens.shape[0]
        if self.cache.length + q > self.max_len:
            raise ValueError(f"sequence of {self.cache.length + q} tokens exceeds the cache of {self.max_len}")
        if positions is None:
            positions = torch.arange(self.cache.length, self.cache.length + q, device=self.device)
        if q == 1:
            # a lone token (plain decoding's step, a tree of only its root) is a causal step: with no
            # mask transformers builds its own, which keeps sliding-window layers' windows and lets
            # sdpa fold GQA heads (with a mask Gemma 3 decoded 3x slower than generate() on a busy CPU;
            # docs/gemma3-270m-decode-profile.md)
            tree_mask = None
        # the feature layers' inputs are recorded by hooks that live for this call only; blocks of
        # a tree are concatenated in order, so row i is node i's either way
        layers = self._feature_layers
        with nullcontext() if layers is None else capture_aux(self.decoder, layers) as aux:
            if tree_mask is not None and self.exact_rows is not None and q > self.exact_rows:
                last = self._tree_in_blocks(tokens, positions, tree_mask, self.exact_rows)
            else:
                # A plain causal step passes no mask: transformers then takes the same unmasked sdpa path
                # as its own generate() (faster, and the same rounding); trees pass the 4D ancestor mask.
                mask = None if tree_mask is None else self.attention_mask(tree_mask, q, positions)
                out = self.decoder(
                    input_ids=tokens[None],
                    position_ids=positions[None],
                    attention_mask=mask,
                    use_cache=True,
                    **{self.cache_arg: self.cache},
                )
                last = out.last_hidden_state[0]  # [q, hidden]
        features = last if aux is None else aux.fused()[0]  # [q, hidden] or [q, len(layers) * hidden]
        rows = last[-1:] if last_logits_only else last
        return TargetOutput(logits=self.lm_head(rows).float(), features=features)

    def _tree_in_blocks(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
                        block: int) -> torch.Tensor:
        """A tree forward run `block` nodes at a time (nodes are in topological order, so a block's
        ancestors sit in earlier blocks, whose keys are already in the cache); returns [q, hidden].
        Each node's bits are then those of a matmul of at most `block` rows."""
        base, q = self.cache.length, tokens.shape[0]
        parts = []
        try:
            for s in range(0, q, block):
                e = min(q, s + block)
                self.cache.length = base + s  # this block's keys land at [base + s, base + e)
                mask = self._block_mask(tree_mask[s:e, :e], positions, base, s)
                out = self.decoder(input_ids=tokens[None, s:e], position_ids=positions[None, s:e],
                                   attention_mask=mask, use_cache=True, **{self.cache_arg: self.cache})
                parts.append(out.last_hidden_state[0])
        finally:
            self.cache.length = base
        return torch.cat(parts)

    def _block_mask(self, rows: torch.Tensor, positions: torch.Tensor, base: int, s: int
                    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask of tree rows [s, e) against the prefix and nodes [0, e) (rows: [e - s, e] of the
        tree mask), per layer type as `attention_mask` builds it."""
        q, e = rows.shape
        visible = torch.cat([torch.ones(q, base, dtype=torch.bool, device=self.device), rows], 1)  # [q, base + e]
        window = self.sliding_window
        if window is None:
            return self._additive(visible)
        key_pos = torch.cat([torch.arange(base, device=self.device), positions[:e]])
        near = positions[s:e, None] - key_pos[None, :] < window
        return {"full_attention": self._additive(visible), "sliding_attention": self._additive(visible & near)}

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, feature_rows: int | None = None) -> TargetOutput:
        """Process a prompt from an empty cache and commit it; logits of the last token only
        ([1, vocab]: the 49k-wide LM head over a whole prompt is wasted work), features of the
        last `feature_rows` tokens (None: all; [n, F], as `forward`)."""
        self.cache.reset()
        self.cache.set_storage(*cache_dtypes(self.config))  # the attention may have been switched since
        if self.sdpa_prefill:
            with sdpa_prefill():
                out = self.forward(tokens, last_logits_only=True)
        else:
            out = self.forward(tokens, last_logits_only=True)
        self.cache.length = tokens.shape[0]
        return out.last_features(feature_rows)


def load_model(
    model: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The stock transformers model and tokenizer of a target: a transformers folder, a GGUF file,
    or (None) SmolLM2-135M-Instruct.

    attn_implementation: None picks sdpa in float32 and, in half precision, eaglespec's float32
    attention, whose outputs do not depend on how many tokens are verified at once (see
    eaglespec/attention.py): without it bf16 speculative output drifts from plain decoding.
    """
    path = resolve_model_path(model)
    torch_dtype = parse_dtype(dtype, device)
    if attn_implementation is None:
        attn_implementation = default_implementation(torch_dtype)
    try:
        if (path / CONVERTED_MARKER).is_file():
            hf_model = load_converted(path, torch_dtype, attn_implementation)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                            attn_implementation=attn_implementation)
        hf_model = hf_model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TargetLoadError(f"could not load {path}: {e}") from e
    return hf_model, tokenizer


def load_target(
    model: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    max_len: int = 2048,
    attn_implementation: str | None = None,
    pack: bool = True,
) -> Target:
    """`load_model`, wrapped in a `Target`, then `backends.optimize_target(target, pack=pack)`:
    pack=False keeps stock linear weights (and checks their bits). For a target without the
    optimization step, build `Target(*load_model(...))`."""
    target = Target(*load_model(model, dtype, device, attn_implementation), max_len=max_len)
    optimize_target(target, pack=pack)
    return target
