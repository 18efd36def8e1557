"""Zero-computation experts (step 11b's last rows): identity experts, whose output is their input
(LongCat-Flash's Z "zero experts", MoE++'s copy experts), and null (skip) experts, whose output
is 0 (zaya's skip expert). They are experts like the others for routing: the router scores all
E, they are chosen, capacity-limited and counted in the loads, the aux loss and the monitor; only
the experts step differs. They are the last experts, real ones first: experts [0, Er) have
parameters (w1, b1, w2, b2 hold Er = E - Z - N rows), [Er, Er + Z) are identity, [Er + Z, E) null.

With gate g the combine step makes g * x of an identity expert's slot and 0 of a null one's, so
an identity expert adds g * x to the token's output, and its gate gradient is <dy, x>; a null
expert's gate gets gradient <dy, 0> = 0 from the experts (the aux loss still reaches it).
"""
from __future__ import annotations

import numpy as np


def zero_experts_forward(expert_in: np.ndarray, real_out: np.ndarray,
                         identity: int) -> np.ndarray:
    """expert_out `[E, C, D]` from the real experts' output real_out `[Er, C, D]`: the identity
    experts' rows are their input expert_in `[E, C, D]` (rows Er .. Er+Z-1), the null ones 0."""
    E, Er = expert_in.shape[0], real_out.shape[0]
    out = np.zeros(expert_in.shape, np.result_type(real_out, expert_in))  # [E, C, D]
    out[:Er] = real_out
    out[Er:Er + identity] = expert_in[Er:Er + identity]
    assert Er + identity <= E
    return out


def zero_experts_backward(d_out: np.ndarray, d_in_real: np.ndarray, identity: int) -> np.ndarray:
    """d expert_in `[E, C, D]` from d expert_out `[E, C, D]` and the real experts' d input
    `[Er, C, D]`: an identity expert passes its gradient through, a null expert gives 0."""
    Er = d_in_real.shape[0]
    d_in = np.zeros(d_out.shape, np.result_type(d_out, d_in_real))  # [E, C, D]
    d_in[:Er] = d_in_real
    d_in[Er:Er + identity] = d_out[Er:Er + identity]
    return d_in
