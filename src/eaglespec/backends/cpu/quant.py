"""Int8 linears for the draft model on CPU.

A draft step on a CPU is bound by memory traffic, not arithmetic: between two draft steps the
target's verification forward streams its whole weight set through the caches, so each draft step
reads the head's weights and its LM head rows (about 18 MB in bf16 for SmolLM2's head with an
8,192-token draft vocabulary) from DRAM again. Int8 weights halve those bytes:
`eaglespec bench profile --draft-weights int8 full` measures drafting and speedup side by side.

Quantizing the draft is free of risk for the output: the draft only proposes, and the target
verifies every token, so int8 changes what is proposed (rarely: see the tests), never what is
accepted. The target itself is never quantized.

`Int8Linear` stores symmetric per-output-channel int8 weights (scale = max |w| / 127) and runs
one of two CPU kernels:

- bf16 activations: `torch.ops.aten._weight_int8pack_mm` (the kernel gpt-fast's int8 mode uses on
  CPU), weight-only: the activations stay bf16. It pays on CPUs with AVX-512 and is slow with
  fp32 activations (172 ms a proposal against 36 ms in fp32 on an AVX2 EPYC).
- fp32 activations: fbgemm's dynamic int8 product (`torch.ops.quantized.linear_dynamic`), which
  also rounds each call's activations to 7 bits (one scale per call; 8 would overflow its int16
  pair sums) and multiplies in integers. On a Zen 3 EPYC (AVX2) beside the F32 GGUF it cut a draft
  depth from 4.57 to 2.25 ms against pre-packed fp32 weights (`tools/spec_overhead.py
  --draft-weights`). PyTorch deprecates the quantized tensors it is built on; where they are gone
  (or fail) the weight-only kernel runs instead.

Either way a dequantizing fallback runs where the op is missing or the tensors are not on CPU.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def int8_kernel_available(device: torch.device) -> bool:
    """The fused int8-weight matmul exists for CPU tensors in this torch build."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.cache
def dynamic_int8_available() -> bool:
    """fbgemm's dynamic int8 linear runs in this torch build (x86 CPUs; PyTorch deprecates the
    quantized tensors it takes, so a later build may lack it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engines = torch.backends.quantized.supported_engines
            if not any(e in engines for e in ("x86", "fbgemm")):
                return False
            w = torch.ones(8, 16)
            packed = _prepack(*quantize_weight(w), None)
            out = torch.ops.quantized.linear_dynamic(torch.ones(2, 16), packed, True)
        return bool(torch.allclose(out, torch.full((2, 8), 16.0), rtol=0.05))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _prepack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of int8 weights [out, in] with per-channel scales [out] (and fp32 bias)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized-tensor deprecation: dynamic_int8_available checks
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        w = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(w, bias)


def int8_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Int8 draft weights are worth their rounding: for bf16 drafts on CPUs with AVX-512. On a Xeon
    with AMX they cut drafting from 23 to 18 ms per step against bf16 packed weights, on a Zen 4
    EPYC from 5.9 to 4.5 ms. fp32 drafts keep full weights: on a Zen 3 EPYC (AVX2) fbgemm's kernel
    cut a draft's base from 5.54 to 3.65 ms and a depth from 4.57 to 2.25 ms, yet over the F32 GGUF the
    speed stayed where it was (1.07x and 1.04x plain decoding, tau 1.66 both: the sizer rests on
    most steps there either way, `tools/spec_overhead.py --draft-weights`), and the 8-bit proposals
    accepted fewer tokens in `eaglespec bench` (tau 1.76 against 1.82). With verification cheaper
    (set-up's patch revision 2) int8 made the default 4-5% faster over the F32 GGUF and no faster
    over the shipped Q4_1, but fbgemm rounds each call's activations to 7 bits with one scale, and
    the head's inputs carry outlier channels (|x| up to 31): after a 4-token prompt its first
    guesses turned to other tokens, and sampled drafts were accepted in 0 of 60 draws against 45
    with full weights."""
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
        # fp32 activations: fbgemm's packed weights, bias included (None: the weight-only kernel)
        self.dynamic = None
        if dtype == torch.float32 and q.device.type == "cpu" and dynamic_int8_available():
            self.dynamic = _prepack(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1]).to(self.scales.dtype)
        if self.dynamic is not None and flat.device.type == "cpu":
            # reduce_range: 7-bit activations, since fbgemm's u8 x s8 pair sums saturate int16 with 8
            out = torch.ops.quantized.linear_dynamic(flat.contiguous(), self.dynamic, True)
            return out.reshape(*x.shape[:-1], out.shape[-1])
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
    return swap_linears(model, lambda lin: Int8Linear(lin, dtype))


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Swap every `nn.Linear` of `model` for `make(linear)`, in place; returns how many slots were
    swapped. A module shared by several slots (tied weights) is converted once."""
    # parent._modules, not named_children(): the latter lists a module shared by two slots once
    found = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if type(child) is nn.Linear]
    done: dict[int, nn.Module] = {}
    for parent, name, lin in found:
        if id(lin) not in done:
            done[id(lin)] = make(lin)
        setattr(parent, name, done[id(lin)])
    return len(found)
