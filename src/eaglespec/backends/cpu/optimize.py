"""The CPU backend's explicit steps: pre-pack a target's linears, choose and apply a draft's weights.

Nothing here runs unless called: `Target` and the head runner never call it themselves; the CLI,
the bench and the server do, and a caller that wants the stock model skips it.

The target's bit probes (which split each weight shape needs to stay row-invariant when packed,
and whether the stock products are row-invariant) take most of a load's packing time and depend
only on this machine and the weights, so their outcomes are cached on disk, keyed by both
(`eaglespec.paths.ProbeCache`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from eaglespec.backends.base import DraftSetup, TargetOptimization
from eaglespec.backends.cpu.flags import machine_id
from eaglespec.backends.cpu.packed import (PackedLinear, pack_linears, packed_splits, packing_available,
                                           stock_rows_vary)
from eaglespec.backends.cpu.half import Fp16Linear, fp16_kernel_available, fp16_pays
from eaglespec.backends.cpu.quant import Int8Linear, int8_pays, quantize_linears, swap_linears
from eaglespec.paths import ProbeCache, file_stamp

if TYPE_CHECKING:
    from eaglespec.target import Target

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


def weights_probes(model: nn.Module, dtype: torch.dtype) -> ProbeCache:
    """The probe outcomes of a model's weights in `dtype` on this machine; a model built in memory
    (no weights file) is probed every time."""
    return ProbeCache(machine_id(), weights_fingerprint(model, dtype))


def weights_fingerprint(model: nn.Module, dtype: torch.dtype) -> str | None:
    """A digest of the weight files `model` was loaded from (paths, sizes, times) and `dtype`;
    None for a model built in memory."""
    files = weights_files(model)
    if not files:
        return None
    ident = [file_stamp(f) for f in files] + [str(dtype)]
    return hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]


def weights_files(model: nn.Module) -> list[Path]:
    """The weight files of the folder `model` was loaded from ([] if it was built in memory)."""
    folder = getattr(model, "name_or_path", "") or ""
    path = Path(folder)
    if not folder or not path.is_dir():
        return []
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def optimize_target(target: Target, pack: bool = True) -> TargetOptimization:
    """Pre-pack the target's linear weights for oneDNN (`pack`, where this CPU and torch have it):
    the same bits, several times faster. Changes `target.model` in place.

    Where the model stays unpacked, check whether its stock products keep a row's bits in a block
    of rows (they do not on a Zen 4 EPYC in fp32) and warn if not: a tree's verification may then
    round unlike one-token decoding where two tokens nearly tie."""
    model, dtype = target.model, target.dtype
    probes = weights_probes(model, dtype)
    packed = 0
    if pack and packing_available(CPU, dtype):
        splits = probes.get("splits", {}, dict)
        if splits is not None:  # None: an earlier probe found a weight shape that no split keeps exact
            packed = pack_linears(model, splits=splits)
            probes.put("splits", packed_splits(model) if packed else None)
    row_invariant = None
    if not packed:
        varying = probes.get("stock_rows_vary", kind=list)
        if varying is None:
            varying = [list(shape) for shape in stock_rows_vary(model)]
            probes.put("stock_rows_vary", varying)
        row_invariant = not varying
        if varying:
            log.warning("on this CPU the stock %s product of weight shapes %s gives a row other bits inside a "
                        "block than alone: speculative output may part from plain decoding where two tokens "
                        "nearly tie (packing, the default where oneDNN has it, avoids this)",
                        dtype, [tuple(s) for s in varying])
    probes.save()
    return TargetOptimization(packed_linears=packed, row_invariant=row_invariant)


def draft_setup(target_dtype: torch.dtype, weights: Literal["auto", "int8", "fp16", "full"] = "auto",
                dtype: torch.dtype | None = None) -> DraftSetup:
    """How a draft head should run beside a target in `target_dtype` on this CPU.

    dtype (None: chosen): bf16 for a bf16 target where bf16 linears can be pre-packed (a stock bf16
    matmul of a few rows is slower than fp32 here), float32 otherwise. weights: "int8" stores the
    linears as int8 (a draft step is bound by reading them); "full" keeps them in `dtype`,
    pre-packed where oneDNN has it; "fp16" stores them in fp16 and computes in float32 (fbgemm).
    "auto": int8 where the int8 kernel pays (bf16 drafts on AVX-512 CPUs); for float32 drafts
    fp16 where fbgemm has its vector kernels (half the bytes a draft step reads, as fast as packed
    fp32 at every row count, and no rounding of the activations: `half.fp16_pays`); full elsewhere."""
    if weights == "fp16":
        if not fp16_kernel_available():
            raise ValueError("fp16 draft weights need fbgemm's fp16 linear (x86 builds of torch); "
                             "use --draft-weights full")
        return DraftSetup(dtype or torch.float32, "fp16")  # which refuses another dtype
    if dtype is None:
        bf16 = target_dtype == torch.bfloat16 and packing_available(CPU, torch.bfloat16)
        dtype = torch.bfloat16 if bf16 else torch.float32
    if weights == "int8" or (weights == "auto" and int8_pays(CPU, dtype)):
        return DraftSetup(dtype, "int8")
    if weights == "auto" and dtype == torch.float32 and fp16_pays():
        return DraftSetup(dtype, "fp16")
    return DraftSetup(dtype, "packed" if packing_available(CPU, dtype) else "plain")


def convert_draft(head: nn.Module, lm: nn.Linear, setup: DraftSetup) -> tuple[nn.Module, nn.Module]:
    """`head` (changed in place: pass a module you own) and `lm` with their linears stored as
    `setup.weights` says."""
    if setup.weights == "int8":
        quantize_linears(head, setup.dtype)
        return head, Int8Linear(lm, setup.dtype)
    if setup.weights == "fp16":
        swap_linears(head, Fp16Linear)
        return head, Fp16Linear(lm)
    if setup.weights == "packed":
        pack_linears(head)
        return head, PackedLinear(lm)
    return head, lm
