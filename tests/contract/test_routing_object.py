"""A Routing is read-only, and route_backward checks one whose fields were rebound (regressions)."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe


# ------------------------------------------------------------------ Routing
def test_routing_arrays_are_read_only():
    r = pymoe.route(np.random.default_rng(0).normal(size=(6, 4)), 2, 1.0)
    for name in ("router_logits", "probs", "expert_index", "token_order", "position", "gate",
                 "gate_before_drop", "kept", "expert_load", "slot_owner", "expert_load_kept",
                 "dispatch_mask", "combine_weights"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(r, name)[...] = 0
    logits = np.zeros((3, 2))
    pymoe.route(logits, 1)
    logits[0, 0] = 1.0  # the caller's own array stays writeable


def test_route_backward_checks_a_rebound_routing():
    r = pymoe.route(np.random.default_rng(0).normal(size=(6, 4)), 2, 1.0)
    r.expert_index = np.full((6, 2), 9)
    with pytest.raises(ValueError, match=r"routing.expert_index: expected entries in \[0, 4\)"):
        pymoe.route_backward(r, np.ones((6, 2)))
