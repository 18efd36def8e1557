"""01: MoE routing, one step at a time, on 8 tokens, 4 experts, K = 2.

What it teaches: how a router turns scores into slots. Every array the recipe builds is printed
with its shape: logits, probabilities, top-K, the one-hot mask, the choice-major permutation, the
cumulative sum, positions, capacity and drops, the dispatch and combine tensors, the experts'
outputs and the combined output. Then the same numbers through the indexed (gather/scatter) form,
a short NumPy-vs-C timing of dispatch and combine, and three pictures of the same routing
(token-by-expert heatmap with drops, the [T, E, C] combine tensor, expert loads).

Run:  python examples/01_walkthrough.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import pymoe
from pymoe import viz
from pymoe.capacity import drop, expert_capacity, expert_load
from pymoe.dense import combine_dense, dense_tensors, dispatch_dense
from pymoe.experts import experts_forward
from pymoe.indexed import combine_indexed, dispatch_indexed
from pymoe.losses import load_balancing_loss, router_z_loss
from pymoe.priority import choice_major, expert_mask, position_in_expert, priority_order
from pymoe.router import router_logits, softmax
from pymoe.topk import gates, top_k

T, D, H, E, K = 8, 6, 8, 4, 2
CAPACITY_FACTOR = 0.75  # C = ceil(2 * 8 * 0.75 / 4) = 3 slots per expert: something must drop


def show(title: str, a: np.ndarray, legend: str, rows: list[str] | None = None) -> None:
    """Print one labelled array: a title, its shape legend, then one line per row."""
    a = np.asarray(a)
    print(f"\n{title}  {legend}  shape {tuple(a.shape)}")
    text = np.array2string(a, precision=3, suppress_small=True, max_line_width=110)
    lines = text.splitlines()
    if a.ndim == 2:  # drop the brackets, keep numpy's column alignment
        lines = [line[2:].rstrip("]") for line in lines]
    if rows is not None and len(lines) == len(rows):
        width = max(map(len, rows))
        lines = [f"{r:>{width}} {line}" for r, line in zip(rows, lines)]
    print("\n".join("  " + line for line in lines))


def walkthrough() -> tuple[np.ndarray, pymoe.Routing]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, D))  # [T, D]
    w_router = rng.normal(size=(D, E)) * 0.6  # [D, E]
    b_router = np.array([0.8, 0.0, 0.0, -0.4])  # [E] expert 0 is popular, so it overflows
    w1, b1 = rng.normal(size=(E, D, H)) / np.sqrt(D), np.zeros((E, H))
    w2, b2 = rng.normal(size=(E, H, D)) / np.sqrt(H), np.zeros((E, D))
    tok = [f"t{t}" for t in range(T)]

    print("=" * 78)
    print(f"MoE routing walkthrough: T={T} tokens, D={D}, E={E} experts, K={K} choices, "
          f"capacity_factor={CAPACITY_FACTOR}")
    print("=" * 78)

    logits = router_logits(x, w_router, b_router)
    show("1. router_logits = x @ w_router + b_router", logits, "[T, E]", tok)

    probs = softmax(logits)
    show("2. probs = softmax(router_logits) over experts (rows sum to 1)", probs, "[T, E]", tok)

    expert_index = top_k(logits, K)
    show("3. expert_index = top-K experts per token, best first (ties -> lower expert)",
         expert_index, "[T, K]", tok)

    gate = gates(probs, expert_index, normalize=False)
    show("4. gate = probs at the chosen experts (raw, Switch style; normalize=True would make "
         "rows sum to 1)", gate, "[T, K]", tok)

    mask = expert_mask(expert_index, E)
    show("5. expert mask, one-hot of choice 0 (first choices)", mask[:, 0], "[T, E]", tok)
    show("   expert mask, one-hot of choice 1 (second choices)", mask[:, 1], "[T, E]", tok)

    order = priority_order(probs, "choice")
    ordered = choice_major(mask, order)
    labels = [f"t{t}/choice{j}" for j in range(K) for t in order]
    show("6. choice-major permutation: all first choices (token order), then all second choices",
         ordered, "[K*T, E]", labels)

    cum = np.cumsum(ordered, axis=0)
    show("7. cumulative sum down the tokens, per expert column (a token's count including itself)",
         cum, "[K*T, E]", labels)
    position = position_in_expert(expert_index, E, order)
    show("   position_in_expert = that count - 1, read at the chosen expert", position,
         "[T, K]", tok)

    load = expert_load(expert_index, E)
    capacity = expert_capacity(T, E, K, CAPACITY_FACTOR, 0, load)
    print(f"\n8. expert_capacity C = ceil(K*T*capacity_factor/E) = ceil({K}*{T}*{CAPACITY_FACTOR}"
          f"/{E}) = {capacity}")
    print(f"   expert load before dropping: {load.tolist()}  (fair share K*T/E = {K * T / E:g})")

    position, gate_kept, kept = drop(position, gate, capacity)
    show("9. drop every pair with position >= C: position (-1 = dropped)", position, "[T, K]", tok)
    show("   gate after the drop (0 = dropped)", gate_kept, "[T, K]", tok)
    dropped = [(t, j) for t in range(T) for j in range(K) if not kept[t, j]]
    print("   dropped (token, choice):", ", ".join(f"(t{t}, choice {j} -> expert "
                                                   f"{expert_index[t, j]})" for t, j in dropped))
    print(f"   dropped fraction {len(dropped) / (T * K):.3f}; load after dropping "
          f"{np.minimum(load, capacity).tolist()}")

    dispatch_mask, combine_weights = dense_tensors(expert_index, position, gate_kept, E, capacity)
    print(f"\n10. dispatch_mask <bool>[T, E, C] {dispatch_mask.shape}: 1 where a token sits in a "
          "slot (built from the kept positions);")
    print("    combine_weights [T, E, C]: that token's gate in the same place. Shown per expert, "
          "rows = tokens, columns = slots:")
    for e in range(E):
        mask_rows = [" ".join(str(int(v)) for v in dispatch_mask[t, e]) for t in range(T)]
        cw_rows = ["  ".join(f"{v:.3f}" for v in combine_weights[t, e]) for t in range(T)]
        print(f"    expert {e}   dispatch_mask[:, {e}, :]   combine_weights[:, {e}, :]")
        for t in range(T):
            print(f"      t{t}      {mask_rows[t]:<22s}{cw_rows[t]}")
    print("    (the mask is not `combine_weights != 0`: a kept token whose gate rounds to 0 still "
          "reaches its expert)")

    expert_in = dispatch_dense(x, dispatch_mask)  # [E, C, D]
    owner = [[next((f"t{t}" for t in range(T) if dispatch_mask[t, e, c]), "--")
              for c in range(capacity)] for e in range(E)]
    print("\n11. dispatch: expert_in = einsum('tec,td->ecd', dispatch_mask, x), shape "
          f"{expert_in.shape} [E, C, D]; who sits in each slot:")
    for e in range(E):
        print(f"    expert {e}: " + "  ".join(owner[e]))
    expert_out, _ = experts_forward(expert_in, w1, b1, w2, b2, "relu")
    show("    expert_out[0] = relu(expert_in[0] @ w1[0] + b1[0]) @ w2[0] + b2[0]", expert_out[0],
         "[C, D]", [f"slot {c}" for c in range(capacity)])
    y = combine_dense(expert_out, combine_weights)
    show("    combine: y = einsum('tec,ecd->td', combine_weights, expert_out)", y, "[T, D]", tok)
    lost = [f"t{t}" for t in range(T) if not kept[t].any()]
    print("    tokens with every choice dropped output zeros (the residual carries them): "
          + (", ".join(lost) if lost else "none"))

    print(f"\n12. load-balancing loss E * sum_e f_e P_e = {load_balancing_loss(probs, expert_index):.4f}"
          " (1.0 = perfectly balanced)")
    print(f"    router z-loss mean_t logsumexp(logits_t)^2 = {router_z_loss(logits):.4f}")

    # The same routing through the indexed (gather/scatter) form: no [T, E, C] tensor at all.
    r = pymoe.route(logits, K, CAPACITY_FACTOR)
    print("\nIndexed form (what the C and CUDA paths compute):")
    show("   slot_owner: t*K + j of the pair in each slot, -1 = empty", r.slot_owner, "[E, C]",
         [f"expert {e}" for e in range(E)])
    expert_in_idx = dispatch_indexed(x, r.slot_owner, K)
    out_idx, _ = experts_forward(expert_in_idx, w1, b1, w2, b2, "relu", filled=r.expert_load_kept)
    y_idx = combine_indexed(out_idx, r.expert_index, r.position, r.gate)
    print(f"   route() gives the same positions: {np.array_equal(r.position, position)}")
    print(f"   max |expert_in dense - indexed| = {np.abs(expert_in - expert_in_idx).max():.2e}")
    print(f"   max |y dense - indexed|         = {np.abs(y - y_idx).max():.2e}")
    return x, r


def pictures(r: pymoe.Routing, out: str) -> dict:
    """The same routing, drawn (or printed as text when matplotlib is missing): path -> Figure."""
    print("\nPictures of this routing" + (f" (saved under {out}/)" if viz.have_matplotlib()
                                          else " (text; pip install 'pymoe-routing[viz]' for PNGs):"))
    return {
        f"{out}/01_routing_heatmap.png": viz.routing_heatmap(r, f"{out}/01_routing_heatmap.png"),
        f"{out}/01_dispatch_combine.png": viz.dispatch_combine_picture(
            r, f"{out}/01_dispatch_combine.png"),
        f"{out}/01_expert_load.png": viz.expert_load_bars(r, f"{out}/01_expert_load.png"),
    }


def timing(quick: bool) -> dict[str, float]:
    """A short dispatch + combine timing, NumPy indexed form against the C core when built."""
    info = pymoe.backends()
    shape = (2048, 256, 16, 2) if quick else (8192, 512, 32, 2)
    Tt, Dd, Ee, Kk = shape
    rng = np.random.default_rng(0)
    r = pymoe.route(rng.normal(size=(Tt, Ee)), Kk, 1.25)
    x = rng.normal(size=(Tt, Dd)).astype(np.float32)
    print(f"\nSpeed: dispatch + combine, T={Tt}, D={Dd}, E={Ee}, K={Kk}, float32 "
          "(median of 5; `python -m pymoe.bench` measures properly)")
    names = ["numpy"] + [n for n in ("c",) if n in info and info[n].available]
    times = {}
    for name in names:
        be = pymoe.get_backend(name)
        gate = r.gate.astype(np.float32)
        runs = []
        for _ in range(6):
            t0 = time.perf_counter()
            ein = be.dispatch(x, r.slot_owner, Kk)
            be.combine(ein, r.expert_index, r.position, gate)
            runs.append(time.perf_counter() - t0)
        times[name] = float(np.median(runs[1:]))
        print(f"   {name:6s} {times[name] * 1e3:8.2f} ms")
    if "c" in times:
        print(f"   C is {times['numpy'] / times['c']:.1f}x faster than NumPy here")
    else:
        print(f"   C backend unavailable: {info['c'].detail}")
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller timing section (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    np.set_printoptions(linewidth=110)
    x, r = walkthrough()
    times = timing(args.quick)
    return {"routing": r, "times": times, "pictures": pictures(r, args.out)}


if __name__ == "__main__":
    main()
