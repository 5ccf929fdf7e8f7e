"""Draft linears with fp16 weights and fp32 arithmetic, for fp32 drafts on x86 CPUs.

Between two draft steps the target's verification streams its weights through the caches, so a
draft step reads the head's weights again from DRAM: 17 MB in fp32 for SmolLM2's head and 19 MB
for its 8,192 LM-head rows. fp16 weights halve those bytes. `Fp16Linear` runs fbgemm's fp16 GEMM
(`torch.ops.quantized.linear_dynamic_fp16`): the weights are stored in half precision, the
activations stay fp32, and each product is widened and accumulated in fp32. So it rounds each
weight once (about 5e-4 of its size) and nothing else: unlike the int8 layout it does not round
the activations, whose outlier channels (|x| up to 31 in the default head) cost the 7-bit kernel
its early guesses.

As with int8, the draft only proposes: fp16 weights change what is proposed, never what is
accepted. The target is never converted.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def fp16_kernel_available() -> bool:
    """fbgemm's fp16-weight linear runs in this torch build and gives a product (x86 CPUs)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 16), None)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(2, 16), packed)
    except (AttributeError, NotImplementedError, RuntimeError) as e:
        log.info("fbgemm's fp16 linear is not available here: %s", e)
        return False
    return bool(torch.equal(out, torch.full((2, 8), 16.0)))


def fp16_pays() -> bool:
    """fp16 draft weights are the faster layout for fp32 drafts here: fbgemm runs and has its
    vector kernels for this CPU (AVX2 or AVX-512; elsewhere it falls back to scalar code). On a
    Zen 3 EPYC (AVX2) its product was as fast as packed fp32 or faster from 1 to 300 rows, and the
    default over an F32 GGUF gained 3-6% (docs/benchmarks.md)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith(("AVX2", "AVX512")) and fp16_kernel_available()


class Fp16Linear(nn.Module):
    """An inference-only `nn.Linear` (fp32 in, fp32 out) whose weight is stored in fp16, packed
    for fbgemm; the bias stays fp32."""

    def __init__(self, linear: nn.Module) -> None:
        """linear: an `nn.Linear` or anything with its `weight`, `bias`, `in_features` and
        `out_features` (a `PackedLinear`)."""
        super().__init__()
        if not fp16_kernel_available():
            raise RuntimeError("fp16 draft weights need fbgemm's fp16 linear, which this torch build lacks")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # [out, in]
        bias = None if linear.bias is None else linear.bias.detach().float()  # [out]
        self.has_bias = bias is not None
        # an opaque fbgemm handle: kept out of the state dict and of .to() on purpose
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] float32 -> [..., out] float32
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()  # [N, in]
        out = torch.ops.quantized.linear_dynamic_fp16.default(flat, self._packed)  # [N, out]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, fp16 weights"
