"""pymoe: Mixture-of-Experts token routing, step by step in NumPy, with C and CUDA fast paths.

Legend used everywhere (Python docstrings, C headers, CUDA kernels):
    T tokens, D model dim, E experts, K choices per token, C expert capacity, H expert hidden dim.

The routing recipe, one module per step:
    router.py    1-2  router_logits [T, E] = x @ w_router + b_router; probs = softmax
    topk.py      3-4  expert_index [T, K] (ties to the lower expert); gate [T, K]
    priority.py  5-7  expert mask [T, K, E]; choice-major priority; position_in_expert [T, K]
    capacity.py  8-9  expert_capacity C; drop pairs whose position >= C
    dense.py     10-11 dispatch_mask / combine_weights [T, E, C] and their einsums
    indexed.py   11   the same dispatch/combine by (expert, slot) gathers (what C/CUDA mirror)
    experts.py   11   E two-layer FFNs on [E, C, D]
    losses.py    12   load-balancing loss and router z-loss (and the global-batch one)
    slots.py     5-9  every slot rule (priority x drop policy) through one function
    routing.py        route(): the steps above written straight down; layer.py: MoELayer
    options.py        every keyword of route() and MoELayer: its default, check and doc
    precision.py      router precision (round_to bf16/fp16, flip_report); replay.py: router replay
    token_groups.py   GShard token groups (MoELayer(token_groups=G), expert_parallel.py on MPI)
    soft_moe.py       Soft MoE (SoftMoELayer): slots as softmax mixes of all tokens, no routing
    ep_nodes.py       expert parallelism across nodes: hierarchical all-to-all, per-node dedup

Beside the recipe:
    variants/    the major systems' routing variants, one module per step (scores,
                 group_limited, sinkhorn, noisy, expert_choice, shared) and presets.py
    backend/     the NumPy, C and CUDA tiers behind one registry (get_backend, backends())
    viz.py, compare/, bench/   pictures, preset comparison, benchmarks
    monitor.py   LoadTracker: expert loads, CV, MaxVio, dead experts per layer and step
"""
from . import compare, precision, replay  # modules; pymoe.compare(...) is compare.compare
from .backend import BackendInfo, backends, get_backend
from .backend.install import warn_if_core_missing
from .compare import Comparison
from .layer import MoELayer
from .memory import MemoryBudgetError, get_memory_budget, memory_budget, set_memory_budget
from .routing import Routing, route, route_backward
from .soft_moe import SoftMoELayer
from .variants.presets import Preset, preset, presets
from .variants.scores import update_expert_bias

__all__ = ["MoELayer", "Routing", "route", "route_backward", "update_expert_bias", "backends",
           "get_backend", "BackendInfo", "MemoryBudgetError", "get_memory_budget",
           "set_memory_budget", "memory_budget", "Preset", "preset", "presets", "compare",
           "Comparison", "precision", "replay", "SoftMoELayer"]
__version__ = "0.1.0"

warn_if_core_missing()  # one line when the C core is not built (PYMOE_DISABLE_C=1 silences it)
