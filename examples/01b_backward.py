"""01b: the backward pass, one step at a time, on the same 8 tokens as 01_walkthrough.py.

What it teaches: which gradients exist and where they go. The objective is
    L = sum(y * dy) + aux_loss_coef * aux_loss
for a fixed upstream gradient dy [T, D] (what the layers above would send). Going backwards:
combine -> the experts -> dispatch -> the gates -> the aux loss -> the softmax -> the router.
- Dispatch and combine are each other's adjoints (transposes): combine's backward is a dispatch
  of gate * dy, dispatch's backward is a combine with unit weights. The script checks
  <dispatch(x), u> = <x, combine(u)> numerically.
- The router learns only through the gates of the kept pairs and the aux loss. Top-K selection,
  positions and drops are piecewise constant: they pass no gradient, and a dropped pair's gate is
  the constant 0.
- K=1 with renormalised gates (--k 1 --normalize): every gate is exactly 1, so the task gives the
  router no gradient at all; only the aux loss (and z-loss) train it.
A central finite difference of one router weight and one input entry is printed beside the
analytic value.

Run:  python examples/01b_backward.py [--k 1|2|3|4] [--normalize] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import warnings

import numpy as np

import pymoe
from pymoe.experts import experts_backward, experts_forward
from pymoe.indexed import combine_indexed, dispatch_indexed, gate_grad_indexed
from pymoe.losses import load_balancing_loss_backward
from pymoe.router import router_logits, router_logits_backward, softmax_backward
from pymoe.topk import gates_backward

AUX_LOSS_COEF = 0.1


def _walkthrough():
    """examples/01_walkthrough.py as a module (file names starting with digits need importlib)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "01_walkthrough.py")
    spec = importlib.util.spec_from_file_location("walkthrough01", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _walkthrough()


def routing(case: dict, k: int, normalize: bool) -> pymoe.Routing:
    """route() on the case's logits (its K=1-renormalised warning is this script's subject)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pymoe.route(router_logits(case["x"], case["w_router"], case["b_router"]), k,
                           W.CAPACITY_FACTOR, normalize=normalize)


def objective(case: dict, dy: np.ndarray, k: int, normalize: bool) -> float:
    """L = sum(y * dy) + AUX_LOSS_COEF * aux_loss, the forward pass in the indexed form."""
    r = routing(case, k, normalize)
    ein = dispatch_indexed(case["x"], r.slot_owner, k)
    out, _ = experts_forward(ein, case["w1"], case["b1"], case["w2"], case["b2"], "relu",
                             filled=r.expert_load_kept)
    y = combine_indexed(out, r.expert_index, r.position, r.gate)
    return float(np.sum(y * dy) + AUX_LOSS_COEF * r.aux_loss)


def backward_walkthrough(k: int = 2, normalize: bool = False) -> dict:
    """Print each backward step; return the analytic and finite-difference checks."""
    case = W.tiny_case()
    x, T, E = case["x"], W.T, W.E
    tok = [f"t{t}" for t in range(T)]
    show = W.show
    print("=" * 78)
    print(f"MoE backward walkthrough: T={T}, D={W.D}, E={E}, K={k}, normalize={normalize}, "
          f"L = sum(y * dy) + {AUX_LOSS_COEF} * aux_loss")
    print("=" * 78)

    # Forward, keeping what the backward needs (the same steps as 01_walkthrough.py).
    r = routing(case, k, normalize)
    expert_in = dispatch_indexed(x, r.slot_owner, k)  # [E, C, D]
    expert_out, cache = experts_forward(expert_in, case["w1"], case["b1"], case["w2"], case["b2"],
                                        "relu", filled=r.expert_load_kept)
    print(f"forward: C={r.capacity}, kept pairs {int(r.kept.sum())} of {T * k}, "
          f"aux_loss {r.aux_loss:.4f}")

    dy = np.random.default_rng(7).normal(size=x.shape)  # [T, D]
    show("B1. dy = dL/dy, the gradient arriving from above", dy, "[T, D]", tok)

    d_expert_out = dispatch_indexed(dy, r.slot_owner, k, weight=r.gate)  # [E, C, D]
    dgate = gate_grad_indexed(dy, expert_out, r.expert_index, r.position)  # [T, K]
    print("\nB2. combine backward (y[t] = sum_j gate[t,j] * expert_out[e_tj, p_tj]):")
    show("    d expert_out = dispatch(gate * dy): the adjoint of combine is a dispatch; expert 0",
         d_expert_out[0], "[C, D]", [f"slot {c}" for c in range(r.capacity)])
    show("    dgate[t, j] = <dy[t], expert_out[e_tj, p_tj]> (0 for dropped pairs)", dgate,
         "[T, K]", tok)

    d_expert_in, eg = experts_backward(d_expert_out, case["w1"], case["w2"], cache)
    print("\nB3. experts backward (each expert a two-layer FFN on its own slots):")
    print("    " + ", ".join(f"d{n} {tuple(g.shape)}" for n, g in eg.items())
          + "; empty slots get no gradient")
    show("    d expert_in, expert 0", d_expert_in[0], "[C, D]",
         [f"slot {c}" for c in range(r.capacity)])

    dx_experts = combine_indexed(d_expert_in, r.expert_index, r.position)  # [T, D]
    show("B4. dispatch backward = combine with unit weights: each token collects its slots' "
         "gradients", dx_experts, "[T, D]", tok)
    u = np.random.default_rng(8).normal(size=expert_in.shape)  # [E, C, D]
    lhs = float(np.sum(dispatch_indexed(x, r.slot_owner, k) * u))
    rhs = float(np.sum(x * combine_indexed(u, r.expert_index, r.position)))
    # The two sums differ by round-off only (their order differs): print them to 1e-9 and the
    # gap as a bound, so that the transcript does not depend on the CPU's summation kernels.
    print(f"    adjoint check: <dispatch(x), u> = {lhs:.9f}, <x, combine(u)> = {rhs:.9f}, "
          f"difference {_bound(abs(lhs - rhs), 1e-12)}")

    dprobs_task = gates_backward(dgate * r.kept, r.probs, r.expert_index, normalize)  # [T, E]
    show("B5. gates backward: d probs, nonzero only at each token's chosen experts",
         dprobs_task, "[T, E]", tok)
    if normalize and k == 1:
        print("    K=1 renormalised: gate = p/p = 1 whatever p is, so d probs from the task is "
              f"0 up to rounding (max |.| = {np.abs(dprobs_task).max():.1e})")

    f = r.expert_load / (T * k)  # [E]
    daux = load_balancing_loss_backward(r.probs, r.expert_index, AUX_LOSS_COEF)  # [T, E]
    print(f"\nB6. aux loss backward: d({AUX_LOSS_COEF} * E * sum_e f_e P_e)/d probs[t, e] = "
          f"{AUX_LOSS_COEF} * E * f_e / T, the same in every row")
    print("      f_e            " + "".join(f"{v:9.4f}" for v in f))
    print("      d/d probs[t,:] " + "".join(f"{v:9.4f}" for v in daux[0]))
    print("    f_e counts choices (a step function): it passes no gradient; busy experts get "
          "their probability pushed down")

    dlogits_task = softmax_backward(dprobs_task, r.probs)  # [T, E]
    dlogits = softmax_backward(dprobs_task + daux, r.probs)  # [T, E]
    show("B7. softmax backward: d logits = p * (dp - sum_e dp * p)", dlogits, "[T, E]", tok)
    print(f"    of which from the task: max |.| = {np.abs(dlogits_task).max():.3e}; from the aux "
          f"loss: max |.| = {np.abs(dlogits - dlogits_task).max():.3e}")
    check = pymoe.route_backward(r, dgate, aux_loss_coef=AUX_LOSS_COEF)
    print(f"    pymoe.route_backward gives the same: max |difference| "
          f"{_bound(float(np.abs(check - dlogits).max()), 1e-12)}")

    dx_router, dw_router, db_router = router_logits_backward(dlogits, x, case["w_router"])
    show("B8. router backward: dw_router = x^T @ d logits", dw_router, "[D, E]",
         [f"d{i}" for i in range(W.D)])
    dx = dx_experts + dx_router  # [T, D]
    show("B9. dx = dispatch backward + router backward (x feeds both the experts and the router)",
         dx, "[T, D]", tok)

    # Central finite differences in float64: nudge one entry, run the whole forward again.
    def numeric(name: str, index: tuple[int, int], eps: float = 1e-6) -> float:
        plus, minus = dict(case), dict(case)
        plus[name], minus[name] = case[name].copy(), case[name].copy()
        plus[name][index] += eps
        minus[name][index] -= eps
        return (objective(plus, dy, k, normalize) - objective(minus, dy, k, normalize)) / (2 * eps)

    e_first = int(r.expert_index[0, 0])
    checks = {f"w_router[0, {e_first}]": (float(dw_router[0, e_first]),
                                          numeric("w_router", (0, e_first))),
              "x[0, 0]": (float(dx[0, 0]), numeric("x", (0, 0)))}
    # A central difference in float64 with eps = 1e-6 is good to about 1e-9 absolute (its
    # O(eps^2) truncation plus rounding of L / eps); its last digits depend on the BLAS kernel
    # the CPU runs, so it is printed to 8 decimals and the relative difference as a bound.
    print("\nFinite-difference check (central, eps = 1e-6, float64):")
    for name, (analytic, num) in checks.items():
        rel = abs(analytic - num) / max(abs(analytic), abs(num), 1e-300)
        print(f"    dL/d{name}: analytic {analytic:+.8f}   numeric {num:+.8f}   "
              f"relative difference {_bound(rel, 1e-6)}")
    return {"routing": r, "checks": checks, "adjoint": (lhs, rhs),
            "dlogits_task": dlogits_task, "dlogits": dlogits}


def _bound(value: float, limit: float) -> str:
    """'< limit' when value is below it (round-off, whose digits vary by CPU), else the value."""
    text = f"{limit:.0e}".replace("e-0", "e-")  # 1e-6, not 1e-06
    return f"< {text}" if value < limit else f"= {value:.1e} (above {text})"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=W.K, choices=range(1, W.E + 1),
                    help=f"choices per token (default {W.K}; 1 = Switch)")
    ap.add_argument("--normalize", action="store_true", help="renormalise the K gates")
    ap.add_argument("--quick", action="store_true", help="accepted for symmetry (it is instant)")
    ap.add_argument("--out", default="pymoe-out", help="unused (no pictures)")
    args = ap.parse_args(argv)
    np.set_printoptions(linewidth=110)
    return backward_walkthrough(args.k, args.normalize)


if __name__ == "__main__":
    main()
