"""What the draft heads are built from: their config, the Llama pieces (RMSNorm, gated MLP, RoPE)
and their KV cache.

The pieces compute exactly what transformers' Llama modules compute, op for op, so a head gives
the same bits as one built from `modeling_llama` (tests/test_layers.py holds them side by side).
They live here because importing transformers' modeling code costs about a second at every
start, and a head needs none of it. RoPE variants other than the default one (linear, dynamic,
YaRN, llama3 ...) are computed by transformers' own functions, imported only for such a head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


#: sdpa takes grouped keys itself (`enable_gqa`, torch >= 2.5)
SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class HeadConfigError(ValueError):
    """A head's config.json holds a field of the wrong type or size."""


#: the fields that must be positive integers when given (`HeadConfig.__post_init__`)
_INT_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "num_hidden_layers", "max_position_embeddings", "draft_vocab_size", "target_hidden_size")


@dataclass
class HeadConfig:
    """A draft head's shape: the Llama fields of its config.json (defaults as LlamaConfig's).

    Fields the head does not read (`architectures`, token ids, `eagle_config`, ...) stay in `extra`
    and are written back as they were read."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 32000  # the target's
    num_hidden_layers: int = 1
    hidden_act: str = "silu"
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    #: a RoPE variant's parameters (`rope_type` and its fields); None: the default RoPE
    rope_scaling: dict | None = None
    draft_vocab_size: int | None = None  # None: vocab_size
    target_hidden_size: int | None = None  # EAGLE-3: the width of each fused target feature
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise HeadConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise HeadConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                  f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise HeadConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                      f"({self.num_attention_heads}) unless head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise HeadConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise HeadConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise HeadConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not isinstance(self.hidden_act, str):
            raise HeadConfigError(f"hidden_act must be a name, got {self.hidden_act!r}")

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HeadConfig":
        """A config from config.json's fields. RoPE may be given as transformers 4 writes it
        (`rope_theta`, `rope_scaling`) or as transformers 5 does (`rope_parameters`, flat or, for a
        model with several layer types, per type: the full-attention one is taken)."""
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        kwargs = {k: raw.pop(k) for k in list(raw) if k in known and raw[k] is not None}
        theta, scaling = _rope_fields(raw.get("rope_theta"), raw.get("rope_scaling"), raw.get("rope_parameters"))
        if theta is not None:
            kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = scaling
        for key in ("rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "transformers_version"):
            raw.pop(key, None)
        return cls(**kwargs, extra=raw)

    @classmethod
    def from_target(cls, target_config, **fields) -> "HeadConfig":
        """A head's config with a target's width, heads and RoPE (a transformers config or its dict)."""
        tc = target_config.to_dict() if hasattr(target_config, "to_dict") else dict(target_config)
        keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                "rope_parameters", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
        config = cls.from_dict({k: tc[k] for k in keep if tc.get(k) is not None})
        return dataclasses.replace(config, **fields)

    def to_dict(self) -> dict[str, Any]:
        """config.json's fields, as LlamaConfig-reading loaders expect them: `model_type` llama, RoPE
        both as transformers 4 writes it (`rope_theta`, `rope_scaling`) and as 5 does (`rope_parameters`)."""
        out = {"model_type": "llama", **self.extra}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["rope_parameters"] = {"rope_type": self.rope_type, **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if out["draft_vocab_size"] is None:
            out["draft_vocab_size"] = self.vocab_size
        if out["target_hidden_size"] is None:
            out.pop("target_hidden_size")
        return out


def _rope_fields(theta, scaling: dict | None, parameters: dict | None) -> tuple[float | None, dict | None]:
    """(rope_theta, the variant's parameters or None) from either transformers layout."""
    if isinstance(parameters, dict):
        if "rope_theta" not in parameters and "rope_type" not in parameters:  # per layer type
            parameters = parameters.get("full_attention") or next(iter(parameters.values()), {})
        theta = parameters.get("rope_theta", theta)
        scaling = scaling or parameters
    if isinstance(scaling, dict):
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    elif scaling is not None:
        raise HeadConfigError(f"rope_scaling must be an object, got {scaling!r}")
    return theta, scaling


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalized in float32, cast back, then scaled."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def activation(name: str) -> nn.Module:
    """The activation a config names: SiLU directly, others from transformers' table."""
    if name == "silu":
        return nn.SiLU()
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise HeadConfigError(f"unknown hidden_act {name!r}")
    return ACT2FN[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), Llama's MLP."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act_fn = activation(config.hidden_act)
        self.gate_up: StackedLinear | None = None  # gate and up as one product (`fuse_projections`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act_fn(gate) * up)


class Rotary(nn.Module):
    """Default RoPE: cos and sin [B, q, head_dim] of positions [B, q], in x's dtype."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d/2] float32
        self.attention_scaling = 1.0

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # [B, q, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotary(config: HeadConfig) -> nn.Module:
    """The head's RoPE module: `Rotary`, or transformers' for a RoPE variant."""
    if config.rope_type == "default":
        return Rotary(config)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                        rope_parameters={**(config.rope_scaling or {}), "rope_theta": config.rope_theta})
    return LlamaRotaryEmbedding(llama)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, nh, q, d], k [B, nkv, q, d]; cos, sin [B, q, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class DraftKVCache:
    """Keys and values of the draft head's attention layers, preallocated.

    Same discipline as the target cache: `length` counts committed (context) pairs; tree nodes
    drafted during one step are appended after it and dropped by resetting `tree_len` to 0. In one
    head forward every layer writes the same slots (`write`), then the head moves the counters once
    (`advance`).
    """

    def __init__(self, max_len: int, kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 num_layers: int = 1) -> None:
        self.max_len = max_len
        self.keys = torch.zeros(num_layers, 1, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(num_layers, 1, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.length = 0  # committed context pairs
        self.tree_len = 0  # temporary tree pairs after the context

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's k, v ([1, kv_heads, q, head_dim]) after everything held; return that
        layer's keys/values up to them ([1, kv_heads, held + q, head_dim])."""
        start = self.length + self.tree_len
        end = start + k.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"draft KV cache overflow: need {end} slots, have {self.max_len}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, q: int, commit: bool) -> None:
        """Count the q pairs just written: as context (commit) or as tree nodes."""
        if commit:
            if self.tree_len:
                raise RuntimeError("commit to the draft cache while tree nodes are held; drop the tree first")
            self.length += q
        else:
            self.tree_len += q

    def drop_tree(self) -> None:
        self.tree_len = 0

    def reset(self) -> None:
        self.length = 0
        self.tree_len = 0


class StackedLinear(nn.Module):
    """Linears that read the same input, as one product of their stacked weights: one matmul call
    where there were several, each as wide as before. Returns their outputs as views of the one
    result. For inference copies of a head (`fuse_projections`)."""

    def __init__(self, *linears: nn.Linear) -> None:
        super().__init__()
        first = linears[0]
        if any(lin.in_features != first.in_features or (lin.bias is None) != (first.bias is None) for lin in linears):
            raise ValueError("stacked linears must share their input width and whether they have a bias")
        self.sizes = [lin.out_features for lin in linears]
        w = first.weight
        self.proj = nn.Linear(first.in_features, sum(self.sizes), bias=first.bias is not None, device=w.device,
                              dtype=w.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if first.bias is not None:
                self.proj.bias.copy_(torch.cat([lin.bias for lin in linears]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [..., in] -> each [..., out_i]
        return self.proj(x).split(self.sizes, dim=-1)


def fuse_projections(module: nn.Module) -> int:
    """Stack each attention's q, k and v projections (`qkv`) and each gated MLP's gate and up
    (`gate_up`) into one linear, in place, and drop the separate ones: a draft step then makes
    five matmul calls a layer instead of eight, each on weights a CPU has to read again after
    the target's forward. For an inference copy of a head: its state dict changes. Returns how
    many groups were stacked."""
    stacked = 0
    for m in list(module.modules()):
        if getattr(m, "qkv", "absent") is None and all(isinstance(getattr(m, n, None), nn.Linear) for n in QKV):
            m.qkv = StackedLinear(*(getattr(m, n) for n in QKV))
            for n in QKV:
                setattr(m, n, None)
            stacked += 1
        if isinstance(m, GatedMLP) and m.gate_up is None and isinstance(m.gate_proj, nn.Linear):
            m.gate_up = StackedLinear(m.gate_proj, m.up_proj)
            m.gate_proj = m.up_proj = None
            stacked += 1
    return stacked


QKV = ("q_proj", "k_proj", "v_proj")


def attention_qkv(attn: nn.Module, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], num_heads: int,
                  num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, q, in] -> queries [B, nh, q, d] and keys, values [B, nkv, q, d], RoPE applied, from the
    projections of `attn`: its q_proj, k_proj and v_proj, or those stacked as its `qkv`."""
    b, q, _ = x.shape
    qkv = attn.qkv(x) if attn.qkv is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    qs = qkv[0].view(b, q, num_heads, head_dim).transpose(1, 2)
    ks = qkv[1].view(b, q, num_kv_heads, head_dim).transpose(1, 2)
    vs = qkv[2].view(b, q, num_kv_heads, head_dim).transpose(1, 2)
    qs, ks = apply_rotary(qs, ks, *cos_sin)
    return qs, ks, vs


def cached_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, groups: int,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """sdpa over grouped keys: qs [B, nh, q, d], ks, vs [B, nkv, kv, d]; mask [B or 1, 1, q, kv]
    bool (True = attend) or None (causal, no cache) -> [B, nh, q, d]. Query head h reads key head
    h // groups; sdpa's own grouping (torch >= 2.5) spares the copies of repeated keys, about half
    of a one-token draft step's attention time on a CPU."""
    grouped = {}
    if groups > 1 and SDPA_GQA:
        grouped = {"enable_gqa": True}
    elif groups > 1:
        ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, **grouped)
