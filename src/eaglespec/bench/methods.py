"""The names the bench knows: its methods, its built-in prompt sets and the tree shapes a sweep
tries by default. Apart from the code that runs them, so that the command line can list them in
its help without importing torch."""

from __future__ import annotations

BASELINE = "plain"
METHODS = ("plain", "eagle-static", "eagle-dynamic", "eagle-lookup", "prompt-lookup", "weighed-lookup", "hf-generate",
           "hf-prompt-lookup")
#: the methods that draft with the --lookup chain, so need --lookup >= 1
CHAIN_METHODS = ("eagle-lookup", "weighed-lookup")
BUILTIN_SETS = ("sharegpt", "humaneval")

#: `bench --trees` with no shapes: the grid the CPU tree defaults were first chosen from, the two
#: static presets, the CPU default (depth 8, sized by measured cost) and dynamic trees from 8 to 60
#: nodes (EAGLE-2's GPU setting, 10,6,60, last)
SWEEP_TREES = ("static:cpu_small", "static:mc_sim_7b_63", "4,8,auto", "2,4,8", "4,5,16", "4,6,20", "4,7,24", "6,7,32",
               "6,6,24", "8,6,32", "10,6,60")


class BenchError(ValueError):
    """Bad benchmark input: printed as one line."""
