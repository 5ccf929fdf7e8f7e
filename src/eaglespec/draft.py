"""The EAGLE draft head (EAGLE-1/2 architecture) and its checkpoint format.

    input   cat(embed(token t+1), feature t)            [q, 2H]
    fc      Linear(2H -> H, bias)                       [q, H]
    layer   Llama decoder layer without input_layernorm (attention + post-attention RMSNorm + MLP);
            a head may stack more layers, each with its input_layernorm, as the official code reads them
    output  predicted feature t+1 (no final norm)       [q, H]  -> the target's LM head -> logits

The target's embedding and LM head are reused frozen and are not stored here. A head may carry a
reduced draft vocabulary (EAGLE-3's `d2t`/`t2d`): it then scores only K target tokens, which
changes what is proposed, never what verification accepts.

Checkpoint (official EAGLE format): `config.json` with LlamaConfig fields (`num_hidden_layers`, 1
by default, `bias: true`) and `model.safetensors` (or `pytorch_model.bin`) with `fc.weight`, `fc.bias`,
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
`layers.0.post_attention_layernorm.weight`; plus `d2t` [K] (target id minus draft id) and `t2d`
[V] (bool) when the vocabulary is reduced.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eaglespec.layers import (DraftKVCache, GatedMLP, HeadConfig, HeadConfigError, RMSNorm, StackedLinear,
                              attention_qkv, cached_attention, rotary)

log = logging.getLogger(__name__)

# Keys an official EAGLE checkpoint may carry that this head does not use (it reuses the target's).
IGNORED_KEYS = ("embed_tokens.weight", "lm_head.weight", "norm.weight")


class DraftHeadError(ValueError):
    """A draft head is missing, malformed, or does not fit the target."""


def head_config_from_target(target_config, draft_vocab_size: int | None = None, num_layers: int = 1) -> HeadConfig:
    """A head config of `num_layers` decoder layers (EAGLE's default: 1) with the target's width,
    heads and RoPE."""
    config = HeadConfig.from_target(target_config, num_hidden_layers=num_layers)
    config.extra.update(architectures=["LlamaForCausalLM"], bias=True)
    config.draft_vocab_size = draft_vocab_size or config.vocab_size
    return config


def empty_vocab_maps(k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [K] long, t2d [vocab] bool) before a vocabulary is set: draft id i stands for target id
    i + d2t[i], t2d marks the target ids in the draft vocabulary (all of them when K == vocab)."""
    return torch.zeros(k, dtype=torch.long), torch.full((vocab,), k == vocab, dtype=torch.bool)


def vocab_maps(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) of sorted distinct target ids: ids [3, 5, 9] -> d2t [3, 4, 7]."""
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(ids.numel()), t2d


def draft_token_ids(d2t: torch.Tensor) -> torch.Tensor:
    """[K] the target token id of each draft-vocabulary entry."""
    return torch.arange(d2t.shape[0], device=d2t.device) + d2t


class DraftVocabulary:
    """The d2t/t2d buffers of a head module with a `config` (EAGLE-1/2 and EAGLE-3 heads alike):
    draft id i stands for target id i + d2t[i]; t2d marks the target ids drafted."""

    d2t: torch.Tensor
    t2d: torch.Tensor

    def _init_vocab(self, k: int) -> None:
        d2t, t2d = empty_vocab_maps(k, self.config.vocab_size)
        self.register_buffer("d2t", d2t)
        self.register_buffer("t2d", t2d)

    def draft_token_ids(self) -> torch.Tensor:
        """[K] the target token id of each draft-vocabulary entry."""
        return draft_token_ids(self.d2t)

    def _store_vocab(self, ids: torch.Tensor) -> None:
        """Keep the maps of `ids` ([K] sorted distinct target ids, checked by the caller), on the
        buffers' device."""
        d2t, t2d = vocab_maps(ids, self.config.vocab_size)
        self.d2t, self.t2d = d2t.to(self.d2t.device), t2d.to(self.t2d.device)


def sorted_vocab_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """[K] distinct target ids in ascending order, on the CPU, from any order or container."""
    return torch.unique(torch.as_tensor(token_ids, dtype=torch.long).cpu())


def unrolled_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor,
                       earlier: list[tuple[torch.Tensor, torch.Tensor]], groups: int, head_dim: int) -> torch.Tensor:
    """Attention of unrolled draft step s = len(earlier) at every anchor at once (training-time
    test), for EAGLE-1/2 and EAGLE-3 heads alike: step 0 is causal over the anchors; at step s > 0
    anchor i's query sees step 0's keys at anchors <= i and the keys of steps 1..s at anchor i
    alone, as the engine's cache holds them. qs [B, nh, N, d]; ks, vs [B, nkv, N, d]; appends this
    step's (repeated) keys and values to `earlier`; returns [B, nh, N, d]."""
    n = qs.shape[2]
    ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)  # [B, nh, N, d]
    earlier.append((ks, vs))
    if len(earlier) == 1:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    scale = head_dim**-0.5
    k0, v0 = earlier[0]
    scores = (qs @ k0.transpose(-1, -2)) * scale  # [B, nh, N, N]
    causal = torch.ones(n, n, dtype=torch.bool, device=qs.device).tril_()
    scores = scores.masked_fill(~causal, float("-inf"))
    chain = torch.stack([(qs * k).sum(-1) for k, _ in earlier[1:]], dim=-1) * scale  # [B, nh, N, s]
    probs = torch.cat([scores, chain], dim=-1).float().softmax(-1).to(qs.dtype)  # [B, nh, N, N + s]
    out = probs[..., :n] @ v0
    for j, (_, v) in enumerate(earlier[1:]):
        out = out + probs[..., n + j, None] * v
    return out


class DraftAttention(nn.Module):
    def __init__(self, config: HeadConfig, index: int = 0) -> None:
        super().__init__()
        self.index = index  # the layer's slot in the draft KV cache
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.qkv: StackedLinear | None = None  # q, k, v as one product (`fuse_projections`)

    def _qkv(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, q, H] -> queries [B, nh, q, d] and keys, values [B, nkv, q, d], RoPE applied."""
        return attention_qkv(self, x, cos_sin, self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, q, H]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,  # [B or 1, 1, q, kv] bool, True = attend; None = causal, no cache
        cache: DraftKVCache | None,
    ) -> torch.Tensor:
        b, q, _ = x.shape
        qs, ks, vs = self._qkv(x, cos_sin)
        if cache is not None:
            ks, vs = cache.write(self.index, ks, vs)  # [1, nkv, kv, d]
        out = cached_attention(qs, ks, vs, self.num_heads // self.num_kv_heads, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))

    def forward_unrolled(
        self,
        x: torch.Tensor,  # [B, N, H] step s's inputs, one per anchor
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        earlier: list[tuple[torch.Tensor, torch.Tensor]],  # keys/values of steps 0..s-1, each [B, nh, N, d]
    ) -> torch.Tensor:
        """Training-time test: step s of drafting at every anchor at once (see DraftHead.forward_unrolled).

        Step 0 is causal over the anchors. At step s > 0, anchor i's query sees what the engine's
        would: step 0's keys at anchors <= i (the committed real pairs) and its own chain, the keys
        of steps 1..s at anchor i. Appends this step's keys/values to `earlier`."""
        b, n, _ = x.shape
        qs, ks, vs = self._qkv(x, cos_sin)
        out = unrolled_attention(qs, ks, vs, earlier, self.num_heads // self.num_kv_heads, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DraftLayer(nn.Module):
    """A Llama decoder layer. The first has no input_layernorm (the fc output goes straight to
    attention); later ones have it, as in the official EAGLE code."""

    def __init__(self, config: HeadConfig, index: int = 0) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config, index)
        self.mlp = GatedMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if index > 0:
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(x) if self.self_attn.index > 0 else x

    def forward(self, x, cos_sin, mask, cache):
        x = x + self.self_attn(self._norm_in(x), cos_sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_unrolled(self, x, cos_sin, earlier):
        x = x + self.self_attn.forward_unrolled(self._norm_in(x), cos_sin, earlier)
        return x + self.mlp(self.post_attention_layernorm(x))


class DraftHead(DraftVocabulary, nn.Module):
    """Predicts the target's next top feature from (feature t, token t+1)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        n_layers = config.num_hidden_layers
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([DraftLayer(config, i) for i in range(n_layers)])
        # Not a registered submodule: a dtype cast of the head must not round inv_freq to bf16.
        object.__setattr__(self, "rotary", rotary(config))
        self._init_vocab(config.draft_vocab_size or config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return self.fc.out_features

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def new_cache(self, max_len: int, device: torch.device | str, dtype: torch.dtype) -> DraftKVCache:
        """An empty KV cache for this head: `max_len` pairs in every layer."""
        attn = self.layers[0].self_attn
        return DraftKVCache(max_len, attn.num_kv_heads, attn.head_dim, torch.device(device), dtype, self.num_layers)

    @property
    def reduced_vocab(self) -> bool:
        return self.d2t.shape[0] != self.config.vocab_size

    def set_vocab(self, token_ids: torch.Tensor) -> None:
        """Restrict drafting to these target token ids ([K] long, any order; stored sorted)."""
        ids = sorted_vocab_ids(token_ids)
        if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= self.config.vocab_size:
            raise DraftHeadError(f"draft vocabulary ids must lie in [0, {self.config.vocab_size})")
        self._store_vocab(ids)
        self.config.draft_vocab_size = ids.numel()

    def forward(
        self,
        features: torch.Tensor,  # [B, q, H] target (or predicted) features at step t
        token_embeds: torch.Tensor,  # [B, q, H] embeddings of the tokens at step t+1
        positions: torch.Tensor,  # [B, q] position of each pair (that of feature t)
        mask: torch.Tensor | None = None,  # [B or 1, 1, q, kv] bool; None = causal without cache
        cache: DraftKVCache | None = None,
        commit: bool = False,
    ) -> torch.Tensor:
        x = self.fc(torch.cat([token_embeds, features.to(token_embeds.dtype)], dim=-1))
        if self.rotary.inv_freq.device != x.device:
            self.rotary.to(x.device)  # device only: inv_freq stays float32
        cos_sin = self.rotary(x, positions)
        for layer in self.layers:
            x = layer(x, cos_sin, mask, cache)
        if cache is not None:
            cache.advance(x.shape[1], commit)
        return x  # [B, q, H]

    def forward_unrolled(
        self,
        features: torch.Tensor,  # [B, N, H] real features f_i at anchors i = 0..N-1
        token_embeds: list[torch.Tensor],  # steps x [B, N, H]: step s gets the embedding of token t_{i+1+s}
    ) -> list[torch.Tensor]:
        """Training-time test (HASS / EAGLE-3): draft `len(token_embeds)` steps ahead from every anchor
        at once, each step fed the head's own prediction of the step before, as the engine drafts.

        Step s at anchor i sits at position i + s and predicts f_{i+1+s}; its attention sees the real
        pairs up to anchor i and its own chain (DraftAttention.forward_unrolled). Returns one
        prediction [B, N, H] per step. Step 0 equals `forward` with a causal mask."""
        b, n, _ = features.shape
        anchors = torch.arange(n, device=features.device).expand(b, -1)  # [B, N]
        if self.rotary.inv_freq.device != features.device:
            self.rotary.to(features.device)
        earlier: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]  # per layer
        preds, feat = [], features
        for s, emb in enumerate(token_embeds):
            x = self.fc(torch.cat([emb, feat.to(emb.dtype)], dim=-1))
            cos_sin = self.rotary(x, anchors + s)
            for layer, seen in zip(self.layers, earlier):
                x = layer.forward_unrolled(x, cos_sin, seen)
            feat = x  # [B, N, H]
            preds.append(feat)
        return preds

    # -- checkpoint format ------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, extra_config: dict | None = None, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors; `dtype` casts the floating weights (e.g. bf16 to ship)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.update(num_hidden_layers=len(self.layers), bias=True, architectures=["LlamaForCausalLM"],
                      draft_vocab_size=int(self.d2t.shape[0]))
        config.update(extra_config or {})
        (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        if not self.reduced_vocab:  # the official EAGLE-1/2 format has no vocabulary map
            state.pop("d2t")
            state.pop("t2d")
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> "DraftHead":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise DraftHeadError(f"no draft head at {path}: expected config.json and model.safetensors")
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise DraftHeadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise DraftHeadError(f"{path / 'config.json'} must hold a JSON object of LlamaConfig fields")
        try:
            config = HeadConfig.from_dict(raw)
        except (HeadConfigError, TypeError) as e:  # a wrong type, or a field of a wrong size
            raise DraftHeadError(f"{path / 'config.json'} is not a valid draft head config: {_reason(e)}") from None
        state = _read_state_dict(path)
        if "d2t" in state:
            config.draft_vocab_size = state["d2t"].shape[0]
        else:
            config.draft_vocab_size = config.vocab_size
        try:
            head = cls(config)
        except DraftHeadError:
            raise
        except (TypeError, ValueError, RuntimeError) as e:  # sizes that no layer can be built with
            raise DraftHeadError(f"{path / 'config.json'} is not a valid draft head config: {_reason(e)}") from None
        for key in IGNORED_KEYS:
            state.pop(key, None)
        own = head.state_dict()
        if "d2t" not in state:
            state["d2t"], state["t2d"] = own["d2t"], own["t2d"]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise DraftHeadError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise DraftHeadError(
                    f"{path}: {key} has shape {list(tensor.shape)} but config.json implies {list(own[key].shape)}"
                )
        head.load_state_dict(state)
        return head.to(device=device, dtype=dtype)


def _reason(e: Exception) -> str:
    """An error's message on one line: its last non-empty line (validation errors put the reason last)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise DraftHeadError(f"no weights at {path}: expected model.safetensors or pytorch_model.bin")


def check_fits(head: DraftHead, hidden_size: int, vocab_size: int) -> None:
    """Refuse a head whose shapes do not fit the target, naming both."""
    want = [hidden_size, 2 * hidden_size]
    got = list(head.fc.weight.shape)
    if got != want:
        raise DraftHeadError(
            f"draft head does not fit the target: fc.weight is {got}, the target (hidden {hidden_size}) needs {want}"
        )
    if head.config.vocab_size != vocab_size:
        raise DraftHeadError(
            f"draft head does not fit the target: head vocabulary {head.config.vocab_size}, target vocabulary {vocab_size}"
        )
