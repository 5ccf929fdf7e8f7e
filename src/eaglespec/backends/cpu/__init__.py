"""The CPU backend: CPU flags, the tree shape for CPUs, pre-packed (oneDNN), int8 and fp16 linears.

Everything eaglespec decides by the CPU it runs on is decided here; the method's modules (tree,
verify, generate, drafter) never ask. Use it through `eaglespec.backends`, which picks the backend
by device.
"""

from eaglespec.backends.cpu.flags import cpu_flags, has_amx, machine_id, native_bf16
from eaglespec.backends.cpu.half import Fp16Linear, fp16_pays
from eaglespec.backends.cpu.optimize import convert_draft, draft_setup, optimize_target, weights_fingerprint
from eaglespec.backends.cpu.packed import PackedLinear, pack_linears, packing_available
from eaglespec.backends.cpu.quant import Int8Linear, int8_pays, quantize_linears
from eaglespec.backends.cpu.trees import tree_sizes

#: on the CPUs we test, a half-precision matmul gives a row the same bits in a block of up to 32
#: rows as alone; above that oneDNN switches kernels, so bigger trees are verified in blocks
EXACT_HALF_ROWS = 32

__all__ = ["EXACT_HALF_ROWS", "Fp16Linear", "Int8Linear", "PackedLinear", "convert_draft", "cpu_flags", "draft_setup",
           "fp16_pays", "has_amx", "int8_pays", "machine_id", "native_bf16", "optimize_target", "pack_linears",
           "packing_available", "quantize_linears", "tree_sizes", "weights_fingerprint"]
