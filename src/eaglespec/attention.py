"""Attention that gives a token the same output whether it is verified alone or inside a tree.

Losslessness is a promise about bits: greedy speculative output must equal plain greedy output.
In float32 the sdpa kernels differ across query counts by ~1e-6, far below what flips an argmax.
In bfloat16 they do not: one token decoded alone and the same token verified inside a 16-token
tree take different sdpa code paths (masked vs unmasked, other blockings) that round
differently, by up to 0.5 in the final features, and greedy answers part ways within a few dozen
tokens. Linear layers are not the problem: a bf16 row's product is the same bits whatever the
number of rows on the CPUs we test on (tests/test_attention.py checks the whole forward bitwise).

`fp32_attention` rounds once, at the end, to the model's dtype. The scores q.k are dot products
over head_dim computed in float64 and rounded to float32: a product of two bf16 values is exact in
float64, so the score's bits cannot depend on how the matmul kernel groups its sum, which changes
with the number of query rows. (In float32 it did on an AVX2 EPYC: plain decoding and prompt lookup
parted at the 8th token of a bf16 answer. On a Xeon with AVX-512 the float32 kernel happened to
agree.) The exp(score - max) are float32, elementwise. The normalising sum and the weighted sum
run in float64: they sum over the keys, and a tree node's ancestors sit at other cache slots
(another summation grouping) than the same tokens do after compaction; in float32 that
regrouping changed bf16 results now and then, in float64 it is ~1e-16, far below the final
rounding. Measured on SmolLM2 in bf16 with the
shipped head (MT-bench first turns, 128 tokens, dynamic tree): with sdpa 1 of 8 answers equaled
plain decoding; on 6 of those prompts a float32 softmax left 3 of 6 equal, float32 exponentials
with float64 sums all 6.

It is registered with transformers' `AttentionInterface` (no modeling file is forked), and
`load_target` picks it for half-precision targets.

A prompt's prefill needs none of this: plain and speculative decoding prefill the same prompt the
same way, so only the steps after it have to agree. Inside `sdpa_prefill()` (`Target.prefill`
uses it) a forward whose queries are all of its keys runs sdpa in the model's dtype instead, 2.1x
faster on 500-token prompts here; the cache still stores the same widened bf16 keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: the name under which transformers finds `fp32_attention`
FP32_ATTENTION = "eaglespec_fp32"


def fp32_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, q, d]
    key: torch.Tensor,  # [b, kv_heads, L, d]
    value: torch.Tensor,  # [b, kv_heads, L, d]
    attention_mask: torch.Tensor | None,  # [b, 1, q, >= L] bool (True = visible) or additive, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scores summed in float64 and rounded to float32, exponentials in float32, sums in float64,
    one rounding at the end; returns ([b, q, heads, d], None)."""
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise NotImplementedError("eaglespec's fp32 attention does not support logit soft-capping or attention sinks")
    if dropout and module.training:
        raise NotImplementedError("eaglespec's fp32 attention is for inference (no dropout)")
    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads  # query heads sharing one key/value head (GQA)
    scale = scaling if scaling is not None else d**-0.5
    if _prefill_depth and q == length:
        return _sdpa(query, key, value, attention_mask, scale, group), None
    # [b, kv, group*q, d] @ [b, kv, d, L] in float64, rounded to float32: query head h reads kv
    # head h // group, as repeat_kv does
    scores = query.double().reshape(b, kv_heads, group * q, d) @ key.double().transpose(-1, -2)
    scores = scores.float().reshape(b, heads, q, length).mul_(scale)
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.float())
    elif q > 1:  # no mask given: causal, the q new tokens being the last of the L
        future = torch.ones(q, length, dtype=torch.bool, device=query.device).triu_(length - q + 1)
        scores.masked_fill_(future, float("-inf"))
    # exp(s - max) elementwise in float32: the same bits for a key wherever it sits (the max is
    # over the same visible scores); then sums in float64, where regrouping costs ~1e-16.
    # A query that sees no key (a left-padding slot in a batch) has max -inf; shifting by 0 instead
    # gives it all-zero weights and a zero output, where -inf - -inf would give NaN, which the
    # next layer's values would spread to every real token of the row (0 * NaN is NaN).
    top = scores.amax(dim=-1, keepdim=True)
    top.masked_fill_(top == float("-inf"), 0.0)
    weights = scores.sub_(top).exp_().reshape(b, kv_heads, group * q, length).double()
    # a visible row's sum is >= 1 (its max contributes exp(0)), so the clamp changes no bits
    total = weights.sum(dim=-1, keepdim=True).clamp_(min=1.0)
    out = (weights @ value.double()).div_(total).reshape(b, heads, q, d)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


_prefill_depth = 0  # > 0 inside sdpa_prefill()


@contextmanager
def sdpa_prefill() -> Iterator[None]:
    """Within, `fp32_attention` hands a forward over an empty cache (as many queries as keys: a
    prompt) to sdpa in the query's dtype. Not thread-safe: it is a module-level switch."""
    global _prefill_depth
    _prefill_depth += 1
    try:
        yield
    finally:
        _prefill_depth -= 1


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
          scale: float, group: int) -> torch.Tensor:
    """sdpa in the query's dtype; returns [b, q, heads, d]. The cache's widened keys and values
    are exact bf16 values, so narrowing them back loses nothing."""
    key = key.to(query.dtype).repeat_interleave(group, dim=1)  # [b, heads, L, d]
    value = value.to(query.dtype).repeat_interleave(group, dim=1)
    q, length = query.shape[2], key.shape[2]
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q > 1, scale=scale)
    else:
        mask = attention_mask[..., :length]
        mask = mask if mask.dtype == torch.bool else mask.to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


def register() -> str:
    """Make `fp32_attention` known to transformers (idempotent); returns its name."""
    AttentionInterface.register(FP32_ATTENTION, fp32_attention)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    return FP32_ATTENTION


def default_implementation(dtype: torch.dtype) -> str:
    """sdpa for float32 (exact enough, and transformers' own path); fp32 attention for half types."""
    return "sdpa" if dtype == torch.float32 else register()
