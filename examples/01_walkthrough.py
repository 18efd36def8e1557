"""01: MoE routing, one step at a time, on 8 tokens, 4 experts, K = 2.

What it teaches: how a router turns scores into slots. Every array the recipe builds is printed
with its shape: logits, probabilities, top-K, the one-hot mask, the choice-major permutation, the
cumulative sum, positions, capacity and drops, the dispatch and combine tensors, the experts'
outputs, the combined output and the load-balancing loss with its f_e and P_e. Then the same
numbers three more ways: the per-token loop the papers start from (for each token: score, pick
the top K, run those experts, add the weighted outputs), the indexed (gather/scatter) form, and a
short NumPy-vs-C timing; and three pictures of the same routing (token-by-expert heatmap with
drops, the [T, E, C] combine tensor next to its flat [T, E*C] form, expert loads).
examples/01b_backward.py walks the backward pass through the same 8 tokens.

Run:  python examples/01_walkthrough.py [--k 1|2|3|4] [--normalize] [--quick] [--out DIR]
      --k 1 is Switch routing (one expert per token); --normalize renormalises the K gates to
      sum to 1 (GShard, Mixtral).
"""
from __future__ import annotations

import argparse

import numpy as np

import pymoe
from pymoe import viz
from pymoe.bench.cpu import COPY, bench_ops
from pymoe.capacity import drop, expert_capacity, expert_load
from pymoe.dense import combine_dense, dense_tensors, dispatch_dense
from pymoe.experts import experts_forward
from pymoe.indexed import combine_indexed, dispatch_indexed
from pymoe.losses import load_balancing_loss, router_z_loss
from pymoe.priority import choice_major, expert_mask, position_in_expert, priority_order
from pymoe.router import router_logits, softmax
from pymoe.topk import gates, top_k

T, D, H, E = 8, 6, 8, 4
K = 2  # the default; --k changes it
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


def tiny_case() -> dict[str, np.ndarray]:
    """The 8 tokens and the layer's parameters every walkthrough uses (seeded, float64)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, D))  # [T, D]
    w_router = rng.normal(size=(D, E)) * 0.6  # [D, E]
    b_router = np.array([0.8, 0.0, 0.0, -0.4])  # [E] expert 0 is popular, so it overflows
    w1, b1 = rng.normal(size=(E, D, H)) / np.sqrt(D), np.zeros((E, H))
    w2, b2 = rng.normal(size=(E, H, D)) / np.sqrt(H), np.zeros((E, D))
    return {"x": x, "w_router": w_router, "b_router": b_router, "w1": w1, "b1": b1, "w2": w2,
            "b2": b2}


def walkthrough(k: int = K, normalize: bool = False) -> tuple[dict, pymoe.Routing, np.ndarray]:
    """Steps 1-12 on the tiny case, printed. Returns (the case, route()'s Routing, y [T, D])."""
    case = tiny_case()
    x = case["x"]
    tok = [f"t{t}" for t in range(T)]

    print("=" * 78)
    print(f"MoE routing walkthrough: T={T} tokens, D={D}, E={E} experts, K={k} choices, "
          f"capacity_factor={CAPACITY_FACTOR}, normalize={normalize}")
    print("=" * 78)

    logits = router_logits(x, case["w_router"], case["b_router"])
    show("1. router_logits = x @ w_router + b_router", logits, "[T, E]", tok)

    probs = softmax(logits)
    show("2. probs = softmax(router_logits) over experts (rows sum to 1)", probs, "[T, E]", tok)

    expert_index = top_k(logits, k)
    show("3. expert_index = top-K experts per token, best first (ties -> lower expert)",
         expert_index, "[T, K]", tok)
    print("   (a classic bug: np.argsort(scores)[:, :k] sorts ascending and picks the K *worst* "
          "experts;\n    sort -scores, as top_k does, or take argsort(scores)[:, ::-1][:, :k])")

    gate = gates(probs, expert_index, normalize=normalize)
    how = ("renormalised over the K chosen, rows sum to 1 (GShard, Mixtral)" if normalize else
           "raw, Switch style; normalize=True would make rows sum to 1")
    show(f"4. gate = probs at the chosen experts ({how})", gate, "[T, K]", tok)
    if normalize and k == 1:
        print("   K=1 with normalize: every gate is exactly 1.0, a constant; the router gets no "
              "gradient from the task loss (see 01b_backward.py --k 1 --normalize)")

    mask = expert_mask(expert_index, E).astype(np.int64)  # <bool>[T, K, E], printed as 0/1
    for j in range(k):
        show(f"{'5.' if j == 0 else '  '} expert mask, one-hot of choice {j}", mask[:, j], "[T, E]",
             tok)

    order = priority_order(probs, "choice")
    ordered = choice_major(mask, order)
    labels = [f"t{t}/choice{j}" for j in range(k) for t in order]
    show("6. choice-major permutation: all first choices (token order), then all second choices",
         ordered, "[K*T, E]", labels)

    cum = np.cumsum(ordered, axis=0)
    show("7. cumulative sum down the tokens, per expert column (a token's count including itself)",
         cum, "[K*T, E]", labels)
    position = position_in_expert(expert_index, E, order)
    show("   position_in_expert = that count - 1, read at the chosen expert", position,
         "[T, K]", tok)

    load = expert_load(expert_index, E)
    capacity = expert_capacity(T, E, k, CAPACITY_FACTOR, 0, load)
    print(f"\n8. expert_capacity C = ceil(K*T*capacity_factor/E) = ceil({k}*{T}*{CAPACITY_FACTOR}"
          f"/{E}) = {capacity}")
    print(f"   expert load before dropping: {load.tolist()}  (fair share K*T/E = {k * T / E:g})")

    position, gate_kept, kept = drop(position, gate, capacity)
    show("9. drop every pair with position >= C: position (-1 = dropped)", position, "[T, K]", tok)
    show("   gate after the drop (0 = dropped)", gate_kept, "[T, K]", tok)
    dropped = [(t, j) for t in range(T) for j in range(k) if not kept[t, j]]
    print("   dropped (token, choice):", ", ".join(f"(t{t}, choice {j} -> expert "
                                                   f"{expert_index[t, j]})" for t, j in dropped))
    print(f"   dropped fraction {len(dropped) / (T * k):.3f}; load after dropping "
          f"{np.minimum(load, capacity).tolist()}; empty (padded) slots "
          f"{E * capacity - int(np.minimum(load, capacity).sum())} of {E * capacity}")

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
    print(f"    flat form: combine_weights.reshape(T, E*C) is a [{T}, {E * capacity}] matrix "
          "(tokens x expert slots); dispatch and combine are then one matrix product each")

    expert_in = dispatch_dense(x, dispatch_mask)  # [E, C, D]
    owner = [[next((f"t{t}" for t in range(T) if dispatch_mask[t, e, c]), "--")
              for c in range(capacity)] for e in range(E)]
    print("\n11. dispatch: expert_in = einsum('tec,td->ecd', dispatch_mask, x), shape "
          f"{expert_in.shape} [E, C, D]; who sits in each slot:")
    for e in range(E):
        print(f"    expert {e}: " + "  ".join(owner[e]))
    expert_out, _ = experts_forward(expert_in, case["w1"], case["b1"], case["w2"], case["b2"],
                                    "relu")
    show("    expert_out[0] = relu(expert_in[0] @ w1[0] + b1[0]) @ w2[0] + b2[0]", expert_out[0],
         "[C, D]", [f"slot {c}" for c in range(capacity)])
    y = combine_dense(expert_out, combine_weights)
    show("    combine: y = einsum('tec,ecd->td', combine_weights, expert_out)", y, "[T, D]", tok)
    lost = [f"t{t}" for t in range(T) if not kept[t].any()]
    print("    tokens with every choice dropped output zeros (the residual carries them): "
          + (", ".join(lost) if lost else "none"))

    f = load / (T * k)  # [E]
    P = probs.mean(axis=0)  # [E]
    print("\n12. load-balancing loss E * sum_e f_e P_e, f_e = share of the T*K choices on expert e "
          "(before dropping),\n    P_e = mean router probability of expert e:")
    print("      expert      " + "".join(f"{e:>9d}" for e in range(E)))
    print("      f_e         " + "".join(f"{v:9.4f}" for v in f))
    print("      P_e         " + "".join(f"{v:9.4f}" for v in P))
    print("      f_e * P_e   " + "".join(f"{v:9.4f}" for v in f * P))
    print(f"    E * sum = {E} * {np.dot(f, P):.4f} = {load_balancing_loss(probs, expert_index):.4f}"
          " (1.0 = perfectly balanced; f_e is a count, so only P_e carries the gradient)")
    print(f"    router z-loss mean_t logsumexp(logits_t)^2 = {router_z_loss(logits):.4f}")

    # The same routing through the indexed (gather/scatter) form: no [T, E, C] tensor at all.
    r = pymoe.route(logits, k, CAPACITY_FACTOR, normalize=normalize)
    print("\nIndexed form (what the C and CUDA paths compute):")
    show("   slot_owner: t*K + j of the pair in each slot, -1 = empty", r.slot_owner, "[E, C]",
         [f"expert {e}" for e in range(E)])
    expert_in_idx = dispatch_indexed(x, r.slot_owner, k)
    out_idx, _ = experts_forward(expert_in_idx, case["w1"], case["b1"], case["w2"], case["b2"],
                                 "relu", filled=r.expert_load_kept)
    y_idx = combine_indexed(out_idx, r.expert_index, r.position, r.gate)
    print(f"   route() gives the same positions: {np.array_equal(r.position, position)}")
    print(f"   max |expert_in dense - indexed| = {np.abs(expert_in - expert_in_idx).max():.2e}")
    print(f"   max |y dense - indexed|         = {np.abs(y - y_idx).max():.2e}")
    return case, r, y


def expert_ffn(case: dict, e: int, v: np.ndarray) -> np.ndarray:
    """Expert e on one token row v [D] (the same two-layer ReLU FFN as experts_forward)."""
    return np.maximum(v @ case["w1"][e] + case["b1"][e], 0) @ case["w2"][e] + case["b2"][e]


def per_token_loop(case: dict, k: int, normalize: bool, capacity: int | None) -> np.ndarray:
    """The MoE layer as the papers first write it: for each token, score, pick, run, add.

    With capacity, each expert counts the choices it has accepted; walking every token's first
    choice before any second choice (choice-major priority) gives route()'s drops exactly.
    Returns y [T, D].
    """
    x = case["x"]
    scores = [softmax(x[t] @ case["w_router"] + case["b_router"]) for t in range(T)]  # E each
    chosen = [list(np.argsort(-s, kind="stable")[:k]) for s in scores]  # best first
    weight = [[s[e] for e in c] for s, c in zip(scores, chosen)]
    if normalize:
        weight = [[g / sum(w) for g in w] for w in weight]
    accepted = [0] * E  # choices each expert has taken so far
    keep = [[True] * k for _ in range(T)]
    if capacity is not None:
        for j in range(k):  # all first choices, then all second choices, ...
            for t in range(T):
                e = chosen[t][j]
                keep[t][j] = accepted[e] < capacity
                accepted[e] += keep[t][j]
    y = np.zeros((T, D))
    for t in range(T):
        for j in range(k):
            if keep[t][j]:
                y[t] += weight[t][j] * expert_ffn(case, chosen[t][j], x[t])
    return y


def loop_vs_recipe(case: dict, r: pymoe.Routing, y_recipe: np.ndarray, k: int,
                   normalize: bool) -> dict[str, float]:
    """Print the per-token loop next to the vectorised recipe; return the max differences."""
    print("\nThe per-token loop (for each token: softmax, top-K, run those experts, add the "
          "weighted outputs)")
    y_loop = per_token_loop(case, k, normalize, r.capacity)
    diff = float(np.abs(y_loop - y_recipe).max())
    print(f"   with capacity C={r.capacity} (each expert stops accepting at C, first choices "
          f"first): max |y_loop - y_recipe| = {diff:.1e}")
    y_free = per_token_loop(case, k, normalize, None)
    r_free = pymoe.route(r.router_logits, k, None, normalize=normalize)  # dropless
    x = case["x"]
    ein = dispatch_indexed(x, r_free.slot_owner, k)
    out, _ = experts_forward(ein, case["w1"], case["b1"], case["w2"], case["b2"], "relu")
    y_dropless = combine_indexed(out, r_free.expert_index, r_free.position, r_free.gate)
    diff_free = float(np.abs(y_free - y_dropless).max())
    print(f"   without capacity (capacity_factor=None, C = largest load = {r_free.capacity}): "
          f"max |y_loop - y_recipe| = {diff_free:.1e}")
    print("   The loop is the definition; the recipe computes the same numbers with no Python "
          "loop over tokens,\n   in fixed-size [E, C, D] buffers that a batched matmul (or an "
          "all-to-all between devices) can take.")
    return {"with_capacity": diff, "dropless": diff_free}


PICTURES = {"01_routing_heatmap.png": viz.routing_heatmap,
            "01_dispatch_combine.png": viz.dispatch_combine_picture,
            "01_expert_load.png": viz.expert_load_bars}


def pictures(r: pymoe.Routing, out: str) -> dict:
    """The same routing, drawn (or printed as text when matplotlib is missing): path -> Figure
    (or -> the text printed in its place, no file written)."""
    paths = {name: f"{out}/{name}" for name in PICTURES}
    if viz.have_matplotlib():
        print("\nPictures of this routing: " + ", ".join(paths.values()))
    else:
        print("\nPictures of this routing, as text, no files written (the PNGs need matplotlib, "
              "pip install 'pymoe-routing[viz]', and PYMOE_VIZ_TEXT unset; they would be "
              + ", ".join(paths.values()) + "):")
    return {path: PICTURES[name](r, path) for name, path in paths.items()}


def timing(quick: bool) -> dict[str, float]:
    """A short dispatch + combine timing by the benchmark's own function (NumPy indexed form
    against the C core when built); returns milliseconds per implementation."""
    shape = (2048, 256, 16, 2) if quick else (8192, 512, 32, 2)
    print("\nSpeed: dispatch + combine, T={}, D={}, E={}, K={}, float32 (median of 5; "
          "`python -m pymoe.bench` measures more)".format(*shape))
    rows = bench_ops(*shape, repeats=5, dense=False, torch=False)
    times: dict[str, float] = {}
    for r in rows:
        if r.op in ("dispatch", "combine") and r.ms is not None and r.impl != COPY:
            times[r.impl] = times.get(r.impl, 0.0) + r.ms
    for impl, ms in times.items():
        print(f"   {impl:14s} {ms:8.2f} ms")
    c_rows = [impl for impl in times if impl.startswith("C ")]
    for impl in c_rows:
        print(f"   {impl} is {times['numpy indexed'] / times[impl]:.1f}x faster than NumPy here")
    if not c_rows:
        print(f"   C backend unavailable: {pymoe.backends()['c'].detail}")
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=K, choices=range(1, E + 1),
                    help=f"choices per token (default {K}; 1 = Switch)")
    ap.add_argument("--normalize", action="store_true",
                    help="renormalise the K gates to sum to 1 (GShard, Mixtral)")
    ap.add_argument("--quick", action="store_true", help="smaller timing section (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    np.set_printoptions(linewidth=110)
    case, r, y = walkthrough(args.k, args.normalize)
    loop = loop_vs_recipe(case, r, y, args.k, args.normalize)
    times = timing(args.quick)
    return {"routing": r, "loop": loop, "times": times, "pictures": pictures(r, args.out)}


if __name__ == "__main__":
    main()
