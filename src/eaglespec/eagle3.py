"""The EAGLE-3 draft head and its checkpoint format (the layout vLLM, SGLang and llama.cpp load).

    input    fused target feature: inputs of layers (2, L//2, L-3)   [q, 3Ht]  (aux_features.py)
    fc       Linear(3Ht -> H, no bias)                                [q, H]    first step only
    midlayer one Llama decoder layer whose attention reads 2H:
                 a = cat(input_layernorm(embed(token)), hidden_norm(h))         [q, 2H]
                 h = h + o_proj(attn(q_proj(a), k_proj(a), v_proj(a)))          RoPE on q, k
                 h = h + mlp(post_attention_layernorm(h))
    output   h (pre-norm): the hidden input of the next draft step             [q, H]
    logits   lm_head(norm(h)) over the draft vocabulary                         [q, K]

`embed` is the target's token embedding (not stored). Draft id i stands for target id
i + d2t[i]; t2d[v] marks the target ids in the draft vocabulary. See docs/design.md, "EAGLE-3 head".

Checkpoint: `config.json` (`architectures: ["LlamaForCausalLMEagle3"]`, `num_hidden_layers: 1`,
`draft_vocab_size`, `target_hidden_size`, the aux layer ids, Llama fields) and `model.safetensors`
with `fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t` (int64), `t2d` (bool).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eaglespec.aux_features import aux_layer_ids
from eaglespec.draft import DraftHeadError, DraftVocabulary, sorted_vocab_ids, unrolled_attention
from eaglespec.layers import (DraftKVCache, GatedMLP, HeadConfig, HeadConfigError, RMSNorm, StackedLinear,
                              attention_qkv, cached_attention, rotary)

ARCHITECTURE = "LlamaForCausalLMEagle3"
#: config key of the aux layers. Its top-level value counts the decoder layer whose *input* is taken
#: (vLLM, llama.cpp); the copy inside `eagle_config` counts the layer whose *output* is taken, one
#: less (SGLang adds 1 to it). docs/design.md, "EAGLE-3 head", has the survey.
AUX_KEY = "eagle_aux_hidden_state_layer_ids"


class Eagle3Error(DraftHeadError):
    """An EAGLE-3 head is missing, malformed, or does not fit the target (a `DraftHeadError`, as
    for any head)."""


def head_kind(path: str | Path) -> Literal["eagle", "eagle3"]:
    """Which head a folder holds, from its config.json: "eagle3" for the EAGLE-3 layout (its
    architecture names Eagle3, or it carries `target_hidden_size` / aux layer ids / an `eagle_config`
    with them), "eagle" otherwise (EAGLE-1/2, draft.py), also for a config.json that is not a JSON
    object, whose error DraftHead's loader words."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise Eagle3Error(f"no draft head at {path}: expected config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        return "eagle"
    if not isinstance(config, dict):
        return "eagle"
    archs = " ".join(config.get("architectures") or []).lower()
    if "eagle3" in archs or AUX_KEY in config or AUX_KEY in (config.get("eagle_config") or {}):
        return "eagle3"
    if "target_hidden_size" in config and config.get("num_hidden_layers", 1) == 1 and "bias" not in config:
        return "eagle3"
    return "eagle"


def eagle3_config(target_config, draft_vocab_size: int, layer_ids: tuple[int, ...] | None = None) -> HeadConfig:
    """A head config for a target: its width, heads and RoPE, one layer, K draft tokens."""
    tc = target_config.to_dict() if hasattr(target_config, "to_dict") else dict(target_config)
    ids = list(layer_ids if layer_ids is not None else aux_layer_ids(tc["num_hidden_layers"]))
    config = HeadConfig.from_target(tc, num_hidden_layers=1, draft_vocab_size=int(draft_vocab_size),
                                    target_hidden_size=tc["hidden_size"])
    config.extra.update({"architectures": [ARCHITECTURE], "tie_word_embeddings": False, AUX_KEY: ids,
                         "eagle_config": eagle_config_entry(ids)})
    return config


def eagle_config_entry(input_ids: list[int]) -> dict:
    """The nested `eagle_config` for aux layers given as layer inputs: SGLang reads its ids as layer
    outputs (it captures the input of id + 1), so they are written one less: inputs [2, 15, 27] ->
    [1, 14, 26]."""
    return {"use_aux_hidden_state": True, AUX_KEY: [i - 1 for i in input_ids]}


def read_aux_ids(config: dict) -> list[int] | None:
    """Aux layers of a head's config.json as layer inputs: the top-level ids (vLLM's and
    llama.cpp's reading), else the `eagle_config` ones plus 1 (SGLang's), else None."""
    if config.get(AUX_KEY):
        return list(config[AUX_KEY])
    nested = (config.get("eagle_config") or {}).get(AUX_KEY)
    return [i + 1 for i in nested] if nested else None


class Eagle3Attention(nn.Module):
    """Llama attention whose q, k, v read the 2H-wide cat(embedding, hidden)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(2 * h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.qkv: StackedLinear | None = None  # q, k, v as one product (`fuse_projections`)

    def _qkv(self, x, cos_sin):
        """x [B, q, 2H] -> queries [B, nh, q, d], keys and values [B, nkv, q, d], RoPE applied."""
        return attention_qkv(self, x, cos_sin, self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x, cos_sin, mask: torch.Tensor | None, cache: DraftKVCache | None) -> torch.Tensor:
        """mask: [B or 1, 1, q, kv] bool (True = attend); None = causal over x, no cache."""
        b, q, _ = x.shape
        qs, ks, vs = self._qkv(x, cos_sin)
        if cache is not None:
            ks, vs = cache.write(0, ks, vs)  # [1, nkv, kv, d]
        out = cached_attention(qs, ks, vs, self.num_heads // self.num_kv_heads, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))

    def forward_unrolled(self, x, cos_sin, earlier: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Training-time test, step s = len(earlier) at every anchor at once.

        The official trainer's pattern: step 0 is causal over the anchors; at step s > 0 anchor i's
        query sees step 0's keys at anchors <= i (the committed pairs) and the keys of steps 1..s at
        anchor i alone (its own draft chain), as the engine's cache holds them. Appends this step's
        keys and values to `earlier`."""
        b, n, _ = x.shape
        qs, ks, vs = self._qkv(x, cos_sin)
        out = unrolled_attention(qs, ks, vs, earlier, self.num_heads // self.num_kv_heads, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Eagle3Layer(nn.Module):
    """The head's one decoder layer (official name: `midlayer`)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps=eps)  # on the token embedding
        self.hidden_norm = RMSNorm(h, eps=eps)  # on the hidden input
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)
        self.mlp = GatedMLP(config)

    def _attn_in(self, hidden, embeds):
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [B, q, 2H]

    def forward(self, hidden, embeds, cos_sin, mask, cache):
        h = hidden + self.self_attn(self._attn_in(hidden, embeds), cos_sin, mask, cache)  # residual: un-normed hidden
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_unrolled(self, hidden, embeds, cos_sin, earlier):
        h = hidden + self.self_attn.forward_unrolled(self._attn_in(hidden, embeds), cos_sin, earlier)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(DraftVocabulary, nn.Module):
    """EAGLE-3 head: fused target features (first step) or its own outputs (later steps) plus the
    next token's embedding -> hidden output -> draft-vocabulary logits."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        target_h = config.target_hidden_size or h
        vocab = config.vocab_size
        k = config.draft_vocab_size or vocab
        self.fc = nn.Linear(3 * target_h, h, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, k, bias=False)
        # Not a registered submodule: a dtype cast of the head must not round inv_freq to bf16.
        object.__setattr__(self, "rotary", rotary(config))
        self._init_vocab(k)

    # -- shape and vocabulary --------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.fc.out_features

    @property
    def target_hidden_size(self) -> int:
        return self.fc.in_features // 3

    @property
    def draft_vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.config.extra[AUX_KEY])

    def set_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft over these target ids ([K] long, any order; stored sorted). K must be lm_head's size."""
        ids = sorted_vocab_ids(token_ids)
        if ids.numel() != self.draft_vocab_size or ids[0] < 0 or ids[-1] >= self.config.vocab_size:
            raise Eagle3Error(f"the draft vocabulary must be {self.draft_vocab_size} distinct ids in "
                              f"[0, {self.config.vocab_size}), got {ids.numel()}")
        self._store_vocab(ids)

    def new_cache(self, max_len: int, device: torch.device | str, dtype: torch.dtype) -> DraftKVCache:
        """An empty KV cache of `max_len` pairs."""
        attn = self.midlayer.self_attn
        return DraftKVCache(max_len, attn.num_kv_heads, attn.head_dim, torch.device(device), dtype, 1)

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor):
        if self.rotary.inv_freq.device != x.device:
            self.rotary.to(x.device)  # device only: inv_freq stays float32
        return self.rotary(x, positions)

    # -- what the engine calls -------------------------------------------------------------------

    def forward(
        self,
        hidden: torch.Tensor,  # [B, q, H] fc(fused features) or the head's own outputs
        token_embeds: torch.Tensor,  # [B, q, H] target embeddings of the next tokens
        positions: torch.Tensor,  # [B, q]
        mask: torch.Tensor | None = None,  # [B or 1, 1, q, kv] bool; None = causal without cache
        cache: DraftKVCache | None = None,
        commit: bool = False,
    ) -> torch.Tensor:
        """One pass of the decoder layer; returns the hidden outputs [B, q, H] (pre-norm)."""
        hidden = hidden.to(token_embeds.dtype)
        out = self.midlayer(hidden, token_embeds, self._cos_sin(hidden, positions), mask, cache)
        if cache is not None:
            cache.advance(out.shape[1], commit)
        return out

    def commit(self, features: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None = None, cache: DraftKVCache | None = None) -> torch.Tensor:
        """Run committed pairs (fused target feature t [B, q, 3Ht], embedding of token t+1) into the
        cache as context; returns their hidden outputs [B, q, H]; the last one drafts step 1."""
        return self(self.fc(features.to(self.fc.weight.dtype)), token_embeds, positions, mask, cache,
                    commit=cache is not None)

    def step(self, hidden: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None = None, cache: DraftKVCache | None = None) -> torch.Tensor:
        """A draft step from the head's own outputs (tree nodes: held in the cache until `drop_tree`)."""
        return self(hidden, token_embeds, positions, mask, cache, commit=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., K] draft-vocabulary logits (map an index with `draft_token_ids()`)."""
        return self.lm_head(self.norm(hidden))

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., K] float32 draft log-probabilities."""
        return self.logits(hidden).float().log_softmax(dim=-1)

    # -- training ----------------------------------------------------------------------------------

    def forward_unrolled(self, features: torch.Tensor, token_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Training-time test: draft len(token_embeds) steps from every anchor at once.

        features [B, N, 3Ht]: fused target features f_i at anchors i; token_embeds[s] [B, N, H]:
        the embedding of token x_{i+1+s}. Step s at anchor i sits at position i + s, is fed the
        head's own output of step s-1 (step 0: fc(f_i)), and predicts x_{i+2+s}. Returns the hidden
        outputs [B, N, H] of each step; step s equals `commit` over anchors 0..i followed by s
        `step`s along anchor i's chain (tests/test_eagle3.py checks it)."""
        b, n, _ = features.shape
        anchors = torch.arange(n, device=features.device).expand(b, -1)  # [B, N]
        earlier: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = self.fc(features.to(self.fc.weight.dtype))
        outs = []
        for s, emb in enumerate(token_embeds):
            hidden = self.midlayer.forward_unrolled(hidden.to(emb.dtype), emb, self._cos_sin(hidden, anchors + s), earlier)
            outs.append(hidden)
        return outs

    # -- checkpoint format -------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """config.json and model.safetensors in the EAGLE-3 layout; `dtype` casts the floating weights."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        ids = list(self.aux_layer_ids)
        config.update(architectures=[ARCHITECTURE], num_hidden_layers=1, tie_word_embeddings=False,
                      draft_vocab_size=self.draft_vocab_size, target_hidden_size=self.target_hidden_size,
                      head_dim=self.midlayer.self_attn.head_dim)
        config[AUX_KEY] = ids
        config["eagle_config"] = {**(config.get("eagle_config") or {}), **eagle_config_entry(ids)}
        if dtype is not None:
            config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                        num_target_layers: int | None = None) -> "Eagle3Head":
        """Load a head in the EAGLE-3 layout (ours or an official one). An embedding in the file is
        ignored (the target's is used); without `d2t`/`t2d` the draft vocabulary is the target's.
        A config without aux layer ids gets the default of a `num_target_layers`-layer target."""
        path = Path(path)
        if head_kind(path) != "eagle3":
            raise Eagle3Error(f"{path} does not hold an EAGLE-3 head (config.json)")
        raw = json.loads((path / "config.json").read_text())
        try:
            config = HeadConfig.from_dict(raw)
        except (HeadConfigError, TypeError) as e:
            raise Eagle3Error(f"{path / 'config.json'} is not a valid EAGLE-3 head config: {e}") from None
        state = _read_state_dict(path)
        state.pop("embed_tokens.weight", None)
        if "lm_head.weight" not in state:
            raise Eagle3Error(f"{path}: no lm_head.weight")
        config.draft_vocab_size = state["lm_head.weight"].shape[0]
        if "fc.weight" in state:
            config.target_hidden_size = state["fc.weight"].shape[1] // 3
        ids = read_aux_ids(raw)
        if ids is None:
            if num_target_layers is None:
                raise Eagle3Error(f"{path}: config.json names no aux layers ({AUX_KEY}); pass num_target_layers")
            ids = list(aux_layer_ids(num_target_layers))
        config.extra[AUX_KEY] = list(ids)
        head = cls(config)
        own = head.state_dict()
        if "d2t" not in state:
            if config.draft_vocab_size != config.vocab_size:
                raise Eagle3Error(f"{path}: a draft vocabulary of {config.draft_vocab_size} without d2t")
            state["d2t"], state["t2d"] = own["d2t"], own["t2d"]
        elif "t2d" not in state:
            t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
            t2d[torch.arange(state["d2t"].shape[0]) + state["d2t"].long()] = True
            state["t2d"] = t2d
        state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise Eagle3Error(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise Eagle3Error(f"{path}: {key} has shape {list(tensor.shape)}, config.json implies {list(own[key].shape)}")
        head.load_state_dict(state)
        check_vocab_maps(head)
        return head.to(device=device, dtype=dtype)


def check_vocab_maps(head: Eagle3Head) -> None:
    """d2t and t2d must describe the same K distinct target ids."""
    ids = head.draft_token_ids().cpu()
    t2d = head.t2d.cpu()
    if ids.min() < 0 or ids.max() >= t2d.shape[0]:
        raise Eagle3Error("d2t maps a draft id outside the target vocabulary")
    if ids.unique().numel() != ids.numel() or int(t2d.sum()) != ids.numel() or not bool(t2d[ids].all()):
        raise Eagle3Error("d2t and t2d disagree: t2d must mark exactly the target ids i + d2t[i]")


def check_fits(head: Eagle3Head, hidden_size: int, vocab_size: int, num_layers: int) -> None:
    """Refuse a head whose shapes or aux layers do not fit the target, naming both."""
    if head.target_hidden_size != hidden_size:
        raise Eagle3Error(f"EAGLE-3 head reads 3 x {head.target_hidden_size} features, the target has hidden size {hidden_size}")
    if head.config.vocab_size != vocab_size:
        raise Eagle3Error(f"EAGLE-3 head vocabulary {head.config.vocab_size}, target vocabulary {vocab_size}")
    if max(head.aux_layer_ids) >= num_layers:
        raise Eagle3Error(f"EAGLE-3 head reads layers {head.aux_layer_ids}, the target has {num_layers}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise Eagle3Error(f"no weights at {path}: expected model.safetensors or pytorch_model.bin")
