"""Dynamic-tree sizes for a target on a CPU, per dtype and CPU kind.

On a CPU a verified node costs arithmetic, so every preset has a confidence floor (`min_prob`):
high where a node costs most (fp32, and bf16 without AMX), low where it costs little (bf16 with
AMX). The numbers were measured with `eaglespec bench --trees` and `eaglespec bench`; the README
has the sweeps.
"""

from __future__ import annotations

import torch

from eaglespec.backends.cpu.flags import has_amx

#: fp32 on CPU: a verified node costs 3-4 ms of fp32 arithmetic on 2 AVX2 cores (a 16-node forward
#: 1.79x a one-node one), so a node pays only if it is likely to be accepted. On 8 MT-bench first
#: turns (`eaglespec bench --trees --dtype float32`, an AVX2 EPYC) a fixed 10 nodes gave 1.28x against
#: 1.05x for 16; on 16 first turns (256 tokens) a tree of up to 20 nodes that verifies only guesses
#: of draft probability >= 0.1 gave 1.41x against 1.29x for the fixed 10 (2026-11-23, e109373).
CPU_FP32_TREE = dict(top_k=4, depth=8, total_tokens=20, min_prob=0.1)

#: bf16 on a CPU with AVX-512 bf16 but no AMX (a Zen 4 EPYC): a 16-node forward costs 1.49x a
#: one-node one, so here too a floor beats a fixed tree. On 8 MT-bench first turns (128 tokens,
#: `eaglespec bench --trees --dtype bfloat16`, two sweeps) it gave 1.46x and 1.45x against 1.27x
#: for the AMX default of 16 fixed nodes and 1.31x / 1.37x for 10 (2026-11-23, 98014d7).
CPU_BF16_NO_AMX_TREE = dict(top_k=4, depth=8, total_tokens=32, min_prob=0.05)

#: bf16 on a CPU with AMX (a Xeon): a node costs little, so the floor is lower and the tree deeper
#: than without AMX. With the stage-14 head on MT-bench first turns (256 tokens), against the fixed
#: 16 nodes (top_k 4, depth 5) that were the default: depth 8 read 1.99x / tau 3.27 vs 1.98x / 3.14
#: on 16 turns (`eaglespec bench --trees --dtype bfloat16`), 1.89x / 3.06 vs 1.87x / 2.98 on 32
#: (`eaglespec bench --limit 4`), both at about 15 nodes per step; depth 10 added 0.06 and 0.03 tau
#: at the same speed (2026-11-24, 8fa8f45).
CPU_BF16_AMX_TREE = dict(top_k=4, depth=10, total_tokens=32, min_prob=0.02)


def tree_sizes(dtype: torch.dtype) -> dict:
    """The dynamic-tree fields (TreeConfig keywords) for a target in `dtype` on this CPU; {} for
    dtypes without a measured preset (they keep TreeConfig's defaults)."""
    if dtype == torch.float32:
        return dict(CPU_FP32_TREE)
    if dtype == torch.bfloat16:
        return dict(CPU_BF16_AMX_TREE if has_amx() else CPU_BF16_NO_AMX_TREE)
    return {}
