"""Dynamic-tree shape for a target on a CPU.

On a CPU every verified node costs arithmetic, and how much depends on the CPU and the weights
(a 16-node forward cost 1.31x a one-node one in bf16 on a Xeon with AMX, 1.49x on a Zen 4 EPYC,
1.79x in fp32 on a Zen 3). So the node budget is not a constant here: each step verifies the
number of nodes that the cost curve measured on this machine says pays best (`sizing="cost"`,
eaglespec/cost.py), up to `total_tokens`. What stays fixed is the shape of the search: top_k and
depth, as the earlier per-CPU presets had them (depth 8 was best or tied on a Zen 3 in fp32 and a
Zen 4 in bf16; depth 10 added little tau on an AMX Xeon, docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from eaglespec.cost import DEFAULT_SIZES

#: the dynamic tree on any CPU and dtype: sized each step by measured cost, at most as many nodes
#: as the cost probe measures (64 with the root)
CPU_TREE = dict(top_k=4, depth=8, total_tokens=DEFAULT_SIZES[-1], min_prob=0.0, sizing="cost")


def tree_sizes(dtype: torch.dtype) -> dict:
    """The dynamic-tree fields (TreeConfig keywords) for a target in `dtype` on this CPU."""
    return dict(CPU_TREE)
