"""Linear layers with their weights pre-packed for oneDNN, for bf16 and fp32 targets on CPU.

A stock `nn.Linear` on CPU hands its plain row-major weight to the matmul library, which
repacks it into its blocked layout on every call. For a 135M model decoding one token, that costs
more than the product. `PackedLinear` reorders once, at load, with
`torch.ops.mkldnn._reorder_linear_weight`, and runs `mkldnn._linear_pointwise` (the pair
torch.compile's CPU backend uses for frozen linears). Measured on the two CPUs this project runs on:

- bf16 on a Xeon with AMX: a [1, 576] x [576, 1536] product took ~4x longer stock than packed, a
  16-row product ~3x.
- fp32 on an AVX2 EPYC: the 49152-row LM head took 10.5 ms stock and 4.5 ms packed for one row,
  26 and 11 ms for 16 rows. A 16-token forward went from 2.22x a one-token forward to 1.79x, a
  2-token one from 1.79x to 1.09x (`scripts/step_profile.py --dtype float32 --forward-scan 200`),
  which is what lets a small tree pay there.

Packing must not make a row's bits depend on how many rows share the product, or speculative
decoding would stop being lossless: `pack_linears` checks on each distinct weight shape that a
block of rows gives each row the bits it gets alone, and leaves the model alone when it does not.
In bf16 it also asks for the stock product's bits. In fp32 oneDNN's packed kernel rounds
differently from the stock one (by ~1e-6); only the row invariance matters there.

The original modules stay referenced (code reads `lm_head.weight`; `unpack_linears` restores them
for a stock baseline), so a packed model holds its linear weights twice.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

#: the batch size oneDNN's blocked layout is chosen for: a tree's node count, give or take
PACK_BATCH_HINT = 16


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing pays (and is implemented) for bf16 and fp32 on CPUs whose oneDNN has the linear ops
    for that dtype (its bf16 path needs AVX-512 or AVX-NE-CONVERT: an AVX2 EPYC has neither)."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and _packs(dtype)
    )


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    """oneDNN reorders and multiplies a small weight of this dtype on this CPU."""
    try:
        with torch.inference_mode():
            w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), 1)
            torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), w, None, "none", [], "")
    except RuntimeError as e:
        log.info("oneDNN cannot pack %s linear weights on this CPU: %s", dtype, e)
        return False
    return True


class PackedLinear(nn.Module):
    """`nn.Linear` with a weight reordered once for oneDNN; inference only.

    It registers the original's `weight` and `bias` Parameters under the same names (state dicts
    and parameter names do not change) and keeps the original module, unregistered, as
    `.linear` for `unpacked`."""

    def __init__(self, linear: nn.Linear, batch_hint: int = PACK_BATCH_HINT) -> None:
        super().__init__()
        self.weight = linear.weight  # [out, in]
        self.bias = linear.bias  # [out] or None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.__dict__["linear"] = linear  # not a submodule: its parameters are ours already
        with torch.inference_mode():
            # an opaque oneDNN tensor: kept out of the state dict and of .to() on purpose
            self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self._packed_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return self.linear(x)  # the packed op has no backward
        if self.weight.dtype != self._packed_dtype or x.dtype != self._packed_dtype:
            return self.linear(x)  # the model was cast after packing: its weight now lives in the stock module
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def same_bits(linear: nn.Linear, packed: PackedLinear, rows: int = 32, seed: int = 0) -> bool:
    """A block of `rows` rows through the packed weight gives each row the bits it gets alone
    (that is what makes trees lossless); for half precision, also the stock `nn.Linear`'s bits.
    For fp32 the stock product must only be close (the kernels round differently)."""
    g = torch.Generator().manual_seed(seed)
    w = linear.weight
    x = (torch.randn(rows, w.shape[1], generator=g) * w.float().std().clamp(min=1e-3)).to(w.dtype)
    with torch.inference_mode():
        block = packed(x)
        if not torch.equal(block, torch.cat([packed(x[i : i + 1]) for i in range(rows)])):
            return False
        stock = torch.cat([linear(x[i : i + 1]) for i in range(rows)])
        if w.dtype == torch.float32:
            return torch.allclose(block, stock, rtol=1e-4, atol=1e-5)
        return torch.equal(block, stock)


def pack_linears(model: nn.Module, batch_hint: int = PACK_BATCH_HINT) -> int:
    """Swap every bf16 or fp32 `nn.Linear` of `model` (on CPU) for a `PackedLinear`; returns how many.

    Does nothing (returns 0) if packing is unavailable or a probe on any weight shape finds a bit
    difference. Shared modules (tied weights) are packed once."""
    # parent._modules, not named_children(): the latter lists a module shared by two slots once
    found = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if type(child) is nn.Linear]
    if not found:
        return 0
    w = found[0][2].weight
    if not packing_available(w.device, w.dtype):
        return 0
    packed: dict[int, PackedLinear] = {}
    checked: set[tuple] = set()
    for _, _, lin in found:
        if id(lin) in packed:
            continue
        shape = (tuple(lin.weight.shape), lin.bias is not None)
        try:
            p = packed[id(lin)] = PackedLinear(lin, batch_hint)
            exact = shape in checked or same_bits(lin, p)
        except RuntimeError as e:  # a torch build whose private oneDNN ops differ
            log.warning("cannot pack linear weights with this torch (%s); not packing", e)
            return 0
        if not exact:
            log.warning("packed %s linears give a row other bits inside a block, or differ from nn.Linear, on "
                        "this CPU; not packing", w.dtype)
            return 0
        checked.add(shape)
    for parent, name, lin in found:
        setattr(parent, name, packed[id(lin)])
    return len(found)


def unpack_linears(model: nn.Module) -> int:
    """Put the original `nn.Linear`s back; returns how many."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, PackedLinear)]
    for parent, name, p in found:
        setattr(parent, name, p.linear)
    return len(found)


@contextmanager
def unpacked(model: nn.Module) -> Iterator[None]:
    """Run a block on the stock modules (e.g. a transformers generate() baseline); the packed
    ones are put back afterwards, without packing again."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, PackedLinear)]
    for parent, name, p in found:
        setattr(parent, name, p.linear)
    try:
        yield
    finally:
        for parent, name, p in found:
            setattr(parent, name, p)
