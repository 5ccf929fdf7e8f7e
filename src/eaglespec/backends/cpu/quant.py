"""Weight-only int8 linears for the draft model on CPU.

A draft step on a CPU is bound by memory traffic, not arithmetic: between two draft steps the
target's verification forward streams its whole weight set through the caches, so each draft step
reads the head's weights and its LM head rows (about 18 MB in bf16 for SmolLM2's head with an
8,192-token draft vocabulary) from DRAM again. Int8 weights halve those bytes:
`eaglespec bench profile --draft-weights int8 full` measures drafting and speedup side by side.

Quantizing the draft is free of risk for the output: the draft only proposes, and the target
verifies every token, so int8 changes what is proposed (rarely: see the tests), never what is
accepted. The target itself is never quantized.

`Int8Linear` stores symmetric per-output-channel int8 weights (scale = max |w| / 127) and runs
`torch.ops.aten._weight_int8pack_mm` (the kernel gpt-fast's int8 mode uses on CPU), or, where that
op is missing or the tensors are not on CPU, a dequantizing fallback.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def int8_kernel_available(device: torch.device) -> bool:
    """The fused int8-weight matmul exists for CPU tensors in this torch build."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """The int8 kernel is faster than full weights: for bf16 drafts on CPUs with AVX-512. On a Xeon
    with AMX it cut drafting from 23 to 18 ms per step against bf16 packed weights, on a Zen 4 EPYC
    from 5.9 to 4.5 ms. With fp32 activations it is slow: a proposal took 32.7 ms against 4.9 ms
    for fp32 packed weights on the Zen 4, 172 against 36 ms on an AVX2 EPYC
    (`eaglespec bench profile --dtype float32 --draft-weights int8 full`)."""
    return (int8_kernel_available(device) and dtype == torch.bfloat16
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> ([out, in] int8, [out] float32 scales) with w ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """An inference-only `nn.Linear` with int8 weights and per-output-channel scales.

    Computes in `dtype` (bf16 or fp32 activations in, the same dtype out)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dtype = dtype or linear.weight.dtype
        q, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)  # [out, in] int8
        self.register_buffer("scales", scale.to(dtype))  # [out]
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)  # [out] or None
        self.fused = int8_kernel_available(q.device) and dtype in (torch.bfloat16, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1]).to(self.scales.dtype)
        if self.fused and flat.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scales)
        else:
            out = F.linear(flat, self.qweight.to(flat.dtype)) * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Swap every `nn.Linear` of `model` for an `Int8Linear`, in place; returns how many slots
    were swapped. A module shared by several slots is quantized once."""
    # parent._modules, not named_children(): the latter lists a module shared by two slots once
    found = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if type(child) is nn.Linear]
    done: dict[int, Int8Linear] = {}
    for parent, name, lin in found:
        if id(lin) not in done:
            done[id(lin)] = Int8Linear(lin, dtype)
        setattr(parent, name, done[id(lin)])
    return len(found)
