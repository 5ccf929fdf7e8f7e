"""The CPU backend's explicit steps: pre-pack a target's linears, choose and apply a draft's weights.

Nothing here runs unless called: `Target` and the head runner never call it themselves; the CLI,
the bench and the server do, and a caller that wants the stock model skips it.

The target's bit probes (which split each weight shape needs to stay row-invariant when packed,
and whether the stock products are row-invariant) take most of a load's packing time and depend
only on this machine and the weights, so their outcomes are cached on disk, keyed by both
(`ProbeCache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from eaglespec.backends.base import DraftSetup, TargetOptimization
from eaglespec.backends.cpu.flags import machine_id
from eaglespec.backends.cpu.packed import (PackedLinear, pack_linears, packed_splits, packing_available,
                                           stock_rows_vary)
from eaglespec.backends.cpu.quant import Int8Linear, int8_pays, quantize_linears
from eaglespec.paths import cache_root

if TYPE_CHECKING:
    from eaglespec.target import Target

log = logging.getLogger(__name__)

CPU = torch.device("cpu")

#: probe outcomes kept per machine; the oldest go first
MAX_PROBE_ENTRIES = 64


class ProbeCache:
    """Probe outcomes for one model's weights on this machine, in cache_root()/probes/MACHINE.json
    ({entry: {name: outcome}}). A model built in memory (no weights file) is probed every time."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        files = weights_files(model)
        self.path = cache_root() / "probes" / f"{machine_id()}.json"
        self.entry = None
        if files:
            ident = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files] + [str(dtype)]
            self.entry = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
        self.found = self._read().get(self.entry, {}) if self.entry else {}
        self.new: dict = {}

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, name: str, default=None, kind: type = object):
        """The cached outcome `name` if it is None or a `kind`, else `default` (probe again)."""
        value = self.found.get(name, default)
        return value if value is None or isinstance(value, kind) else default

    def put(self, name: str, outcome) -> None:
        if name not in self.found or self.found[name] != outcome:  # a warm load writes nothing
            self.new[name] = outcome

    def save(self) -> None:
        """Merge the new outcomes into the file (atomically; a race loses an entry, never the file)."""
        if not self.entry or not self.new:
            return
        table = self._read()
        table.pop(self.entry, None)
        table[self.entry] = {**self.found, **self.new}  # last, as the newest
        while len(table) > MAX_PROBE_ENTRIES:
            table.pop(next(iter(table)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".probes-")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache only costs the probes next time
            log.info("could not cache probe results in %s: %s", self.path, e)


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
    probes = ProbeCache(model, dtype)
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


def draft_setup(target_dtype: torch.dtype, weights: Literal["auto", "int8", "full"] = "auto",
                dtype: torch.dtype | None = None) -> DraftSetup:
    """How a draft head should run beside a target in `target_dtype` on this CPU.

    dtype (None: chosen): bf16 for a bf16 target where bf16 linears can be pre-packed (a stock bf16
    matmul of a few rows is slower than fp32 here), float32 otherwise. weights: "int8" stores the
    linears as int8 (a draft step is bound by reading them); "full" keeps them in `dtype`,
    pre-packed where oneDNN has it; "auto" is int8 where the int8 kernel pays (bf16 drafts on
    AVX-512 CPUs), full elsewhere."""
    if dtype is None:
        bf16 = target_dtype == torch.bfloat16 and packing_available(CPU, torch.bfloat16)
        dtype = torch.bfloat16 if bf16 else torch.float32
    if weights == "int8" or (weights == "auto" and int8_pays(CPU, dtype)):
        return DraftSetup(dtype, "int8")
    return DraftSetup(dtype, "packed" if packing_available(CPU, dtype) else "plain")


def convert_draft(head: nn.Module, lm: nn.Linear, setup: DraftSetup) -> tuple[nn.Module, nn.Module]:
    """`head` (changed in place: pass a module you own) and `lm` with their linears stored as
    `setup.weights` says."""
    if setup.weights == "int8":
        quantize_linears(head, setup.dtype)
        return head, Int8Linear(lm, setup.dtype)
    if setup.weights == "packed":
        pack_linears(head)
        return head, PackedLinear(lm)
    return head, lm
