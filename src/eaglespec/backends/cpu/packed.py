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
  2-token one from 1.79x to 1.09x (`eaglespec bench profile --dtype float32 --forward-scan 200`),
  which is what lets a small tree pay there.

Packing must not make a row's bits depend on how many rows share the product, or speculative
decoding would stop being lossless: `pack_linears` checks on each distinct weight shape that
blocks of 2 to 32 rows give each row the bits it gets alone. On a Zen 4 EPYC (AVX-512 with bf16,
no AMX) products over inputs wider than 1024 fail that in fp32 and bf16, stock or packed: the
1536-wide down projection gave some rows other bits from 2 to 16 rows on (the stock fp32 product
fails it for every shape). Such a weight is packed in input parts narrow enough to pass, whose
products are summed in float32 in a fixed order; if no split passes, the model is left alone.
In bf16 it also asks for the stock product's bits. In fp32 oneDNN's packed kernel rounds
differently from the stock one (by ~1e-6); only the row invariance matters there.

The original modules stay referenced (code reads `lm_head.weight`, and gradients or a later dtype
cast fall back to them), so a packed model holds its linear weights twice. A model that must stay
stock (a transformers baseline) is simply never packed: packing is the explicit step
`eaglespec.backends.optimize_target`.

The bit checks cost most of the packing time at load; their outcome (the split each weight shape
needs) is a property of the CPU, the torch build and the shapes, so `pack_linears` takes it from a
cached earlier probe when given (`splits`, read back with `packed_splits`).
"""

from __future__ import annotations

import functools
import logging

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
    `.linear`: it runs when gradients are needed or the model was cast after packing."""

    def __init__(self, linear: nn.Linear, batch_hint: int = PACK_BATCH_HINT, k_chunks: int = 1) -> None:
        """k_chunks > 1 splits the input dimension into that many near-equal parts, each packed on its
        own. Each part's product comes out in the weight's dtype (so in bf16 it is rounded once
        more than the whole product); the parts are summed in float32 in a fixed order and rounded
        to that dtype (see `pack_linears` for why)."""
        super().__init__()
        if not 1 <= k_chunks <= linear.in_features:
            raise ValueError(f"k_chunks must be in [1, {linear.in_features}], got {k_chunks}")
        self.weight = linear.weight  # [out, in]
        self.bias = linear.bias  # [out] or None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.__dict__["linear"] = linear  # not a submodule: its parameters are ours already
        bounds = torch.linspace(0, self.in_features, k_chunks + 1).round().long().tolist()
        self.k_slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        with torch.inference_mode():
            w = linear.weight.detach()
            # opaque oneDNN tensors: kept out of the state dict and of .to() on purpose
            self._packed = [torch.ops.mkldnn._reorder_linear_weight(w[:, s].contiguous(), batch_hint)
                            for s in self.k_slices]
        self._packed_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return self.linear(x)  # the packed op has no backward
        if self.weight.dtype != self._packed_dtype or x.dtype != self._packed_dtype:
            return self.linear(x)  # the model was cast after packing: its weight now lives in the stock module
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        if len(self._packed) == 1:
            out = torch.ops.mkldnn._linear_pointwise(flat, self._packed[0], self.bias, "none", [], "")
        else:
            out = None  # [N, out] float32: the chunks' products summed in order
            for s, w in zip(self.k_slices, self._packed):
                part = torch.ops.mkldnn._linear_pointwise(flat[:, s].contiguous(), w, None, "none", [], "").float()
                out = part if out is None else out + part
            if self.bias is not None:
                out = out + self.bias.float()
            out = out.to(x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        chunks = f", k_chunks={len(self._packed)}" if len(self._packed) > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed{chunks}")


#: block sizes at which `same_bits` compares a row with itself alone (up to a tree verified in one
#: forward on CPU; see `Target.exact_rows`): kernels change strategy with the row count
CHECK_BLOCKS = (2, 3, 5, 8, 13, 16, 24, 32)

#: input splits `pack_linears` tries, in order, for a weight shape whose whole product is not
#: row-invariant (a Zen 4 EPYC: only inputs wider than 1024, e.g. Llama's down projection)
K_CHUNK_TRIES = (1, 2, 3, 4, 6, 8)


def same_bits(linear: nn.Linear, packed: PackedLinear, blocks: tuple[int, ...] = CHECK_BLOCKS, seed: int = 0) -> bool:
    """Every block of rows through the packed weight gives each row the bits it gets alone (that is
    what makes trees lossless). Also, for an unsplit half-precision weight, the stock `nn.Linear`'s
    bits; for fp32 or a split weight (which rounds its parts), only a close result."""
    w = linear.weight
    x = _probe_rows(w, max(blocks), seed)
    with torch.inference_mode():
        alone = _rows_alone(packed, x, blocks)
        if alone is None:
            return False
        stock = torch.cat([linear(x[i : i + 1]) for i in range(x.shape[0])])
        if w.dtype == torch.float32:
            return torch.allclose(alone, stock, rtol=1e-4, atol=1e-5)
        if len(packed.k_slices) > 1:  # a few roundings of bf16/fp16 parts: within a few units in the last place
            scale = stock.float().abs().max().item()
            return torch.allclose(alone.float(), stock.float(), rtol=2**-6, atol=2**-7 * scale)
        return torch.equal(alone, stock)


def _probe_rows(weight: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """[rows, in] random inputs of about the weight's scale, in its dtype and on its device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, weight.shape[1], generator=g) * weight.float().std().clamp(min=1e-3)
    return x.to(device=weight.device, dtype=weight.dtype)


def _rows_alone(linear: nn.Module, x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor | None:
    """Each row of x through `linear` alone ([rows, out]), if every leading block of x gives each
    of its rows those same bits; else None."""
    alone = torch.cat([linear(x[i : i + 1]) for i in range(x.shape[0])])
    return alone if all(torch.equal(linear(x[:n]), alone[:n]) for n in blocks) else None


def stock_rows_vary(model: nn.Module, blocks: tuple[int, ...] = CHECK_BLOCKS) -> list[tuple[int, int]]:
    """The [out, in] weight shapes of `model`'s stock `nn.Linear`s whose product gives a row other
    bits inside a block than alone (as the stock fp32 product does on a Zen 4 EPYC). Where a model
    runs such products unpacked, a tree's logits can round unlike one-token decoding's."""
    shapes: dict[tuple[int, int], nn.Linear] = {}
    for m in model.modules():
        if type(m) is nn.Linear:
            shapes.setdefault(tuple(m.weight.shape), m)
    with torch.inference_mode():
        return [shape for shape, lin in shapes.items()
                if _rows_alone(lin, _probe_rows(lin.weight, max(blocks), 0), blocks) is None]


def _pack_exactly(lin: nn.Linear, batch_hint: int) -> PackedLinear | None:
    """The first split of `lin`'s input (K_CHUNK_TRIES) whose packed product passes `same_bits`."""
    for k in K_CHUNK_TRIES:
        if k > 1 and lin.in_features // k < 64:
            break
        p = PackedLinear(lin, batch_hint, k_chunks=k)
        if same_bits(lin, p):
            return p
    return None


def shape_key(linear: nn.Module) -> str:
    """The key of a linear's weight shape in a split table: "out x in", "+bias" if it has one."""
    out, inp = linear.weight.shape
    return f"{out}x{inp}" + ("+bias" if linear.bias is not None else "")


def pack_linears(model: nn.Module, batch_hint: int = PACK_BATCH_HINT, splits: dict[str, int] | None = None) -> int:
    """Swap every bf16 or fp32 `nn.Linear` of `model` (on CPU) for a `PackedLinear`; returns how many.

    A weight shape whose product gives a row other bits inside a block (oneDNN splits a wide input
    dimension differently for different row counts) is packed in input chunks whose products are
    row-invariant, and summed in a fixed order. Does nothing (returns 0) if packing is unavailable
    or no split of some weight shape is row-invariant. Shared modules (tied weights) are packed once.

    splits: the input parts per `shape_key`, from an earlier probe on this machine (`packed_splits`);
    a shape it names is packed so without checking its bits again, others are checked."""
    # parent._modules, not named_children(): the latter lists a module shared by two slots once
    found = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if type(child) is nn.Linear]
    if not found:
        return 0
    w = found[0][2].weight
    if not packing_available(w.device, w.dtype):
        return 0
    packed: dict[int, PackedLinear] = {}
    chunks: dict[str, int] = dict(splits or {})  # weight shape -> the split that passed
    for _, _, lin in found:
        if id(lin) in packed:
            continue
        shape = shape_key(lin)
        try:
            p = PackedLinear(lin, batch_hint, chunks[shape]) if shape in chunks else _pack_exactly(lin, batch_hint)
        except RuntimeError as e:  # a torch build whose private oneDNN ops differ
            log.warning("cannot pack linear weights with this torch (%s); not packing", e)
            return 0
        if p is None:
            log.warning("packed %s linears of shape %s give a row other bits inside a block, or differ from "
                        "nn.Linear, on this CPU; not packing", w.dtype, tuple(lin.weight.shape))
            return 0
        packed[id(lin)] = p
        chunks[shape] = len(p.k_slices)
    for parent, name, lin in found:
        setattr(parent, name, packed[id(lin)])
    return len(found)


def packed_splits(model: nn.Module) -> dict[str, int]:
    """The input parts of each packed weight shape of `model` (`shape_key` -> parts), for `pack_linears`."""
    return {shape_key(m): len(m.k_slices) for m in model.modules() if isinstance(m, PackedLinear)}
