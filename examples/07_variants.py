"""07: every routing variant of the major MoE systems, step by step, on the same 8 tokens as 01.

What it teaches: each variant changes one step of the recipe in 01_walkthrough.py. For every
variant this prints the arrays of the changed steps (with shapes), then routes with the one
route()/MoELayer keyword that selects it and checks that the keyword gives exactly those numbers.
Variants: sigmoid scores, expert bias (aux-loss-free), group-limited top-K, scaling factor, noisy
top-K, expert choice, Sinkhorn, GShard second-expert policy, token-major and random priority,
drop policy "probs", renormalise after drop, capacity formulas, shared experts, loss scalings;
and from research: top-p (dynamic K), ReLU routing (ReMoE), Soft MoE.
Pictures: an expert-choice routing, a group-limited routing, top-p's experts per token and
Soft MoE's dispatch and combine weights.

Run:  python examples/07_variants.py [--variant NAME] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import pymoe
from pymoe import viz
from pymoe.capacity import capacity_formula, keep_by_score
from pymoe.losses import balance_loss
from pymoe.priority import pair_order, position_in_pair_order, priority_order
from pymoe.router import router_logits, softmax
from pymoe.topk import gates, renormalize_kept, scale_gates, second_expert_keep, top_k
from pymoe.variants.expert_choice import expert_choice_keep, expert_choice_pairs
from pymoe.variants.group_limited import group_scores, limit_to_groups
from pymoe.variants.noisy import noise_thresholds, smooth_load, softplus
from pymoe.variants.scores import selection_scores, sigmoid, softmax_over_top_k, update_expert_bias
from pymoe.variants.shared import shared_experts_forward
from pymoe.variants.sinkhorn import sinkhorn

T, D, H, E, K = 8, 6, 8, 4, 2
CAPACITY_FACTOR = 0.75  # C = ceil(2 * 8 * 0.75 / 4) = 3, as in 01_walkthrough.py
TOK = [f"t{t}" for t in range(T)]
VERBOSE = True


def show(title: str, a: np.ndarray, legend: str, rows: list[str] | None = TOK) -> None:
    """Print one labelled array (all of it unless --quick)."""
    a = np.asarray(a)
    print(f"  {title}  {legend}  shape {tuple(a.shape)}")
    if not VERBOSE:
        return
    text = np.array2string(a, precision=3, suppress_small=True, max_line_width=110)
    lines = text.splitlines()
    if a.ndim == 2:
        lines = [line[2:].rstrip("]") for line in lines]
    if rows is not None and len(lines) == len(rows):
        lines = [f"{r:>4} {line}" for r, line in zip(rows, lines)]
    print("\n".join("    " + line for line in lines))


def tokens() -> tuple[np.ndarray, np.ndarray]:
    """01_walkthrough.py's 8 tokens and router: (x [T, D], router_logits [T, E])."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, D))
    w_router = rng.normal(size=(D, E)) * 0.6
    b_router = np.array([0.8, 0.0, 0.0, -0.4])  # expert 0 is popular
    return x, router_logits(x, w_router, b_router)


def same(a, b) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- variants

def sigmoid_scores(x, logits):
    s = sigmoid(logits)
    show("2'. scores = sigmoid(router_logits), each in (0, 1), rows need not sum to 1", s, "[T, E]")
    idx = top_k(logits, K)
    g = gates(s, idx, normalize=True)
    show("4'. gate = chosen sigmoid scores / their sum (DeepSeek-V3)", g, "[T, K]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, score="sigmoid", normalize=True)
    same(r.gate_before_drop, g)
    show("   softmax over the K chosen logits (Mixtral) = normalize=True softmax gates",
         softmax_over_top_k(logits, idx), "[T, K]")
    return r


def expert_bias(x, logits):
    s = sigmoid(logits)
    bias = np.array([-0.3, 0.1, 0.1, 0.2])
    print(f"  expert_bias = {bias.tolist()}  [E]: added for choosing only")
    ranked = selection_scores(s, bias)
    show("3'. top-K of scores + bias", top_k(ranked, K), "[T, K]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, score="sigmoid", normalize=True, expert_bias=bias)
    same(r.expert_index, top_k(ranked, K))
    show("   gates read the unbiased scores", r.gate_before_drop, "[T, K]")
    new = update_expert_bias(bias, r.expert_load, 0.01)
    print(f"   load {r.expert_load.tolist()} -> update_expert_bias(rate 0.01) = "
          f"{np.round(new, 3).tolist()}")
    return r


def groups(x, logits):
    s = sigmoid(logits)
    show("3a. group scores: sum of each group's top 2 (2 groups of 2 experts)",
         group_scores(s, 2, 2), "[T, G]")
    masked = limit_to_groups(s, 2, 1, 2)
    show("3b. scores outside each token's best group -> -inf", masked, "[T, E]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, score="sigmoid", normalize=True, num_groups=2,
                    topk_groups=1, group_score_k=2)
    same(r.expert_index, top_k(masked, K))
    show("3c. top-K inside the kept group", r.expert_index, "[T, K]")
    return r


def scaling(x, logits):
    g = gates(sigmoid(logits), top_k(logits, K), True)
    r = pymoe.route(logits, K, CAPACITY_FACTOR, score="sigmoid", normalize=True,
                    scaling_factor=2.5)
    same(r.gate_before_drop, scale_gates(g, 2.5))
    show("4b. gate * routed_scaling_factor 2.5 (DeepSeek-V3)", r.gate_before_drop, "[T, K]")
    return r


def noisy_topk(x, logits):
    rng = np.random.default_rng(0)
    std = softplus(x @ (rng.normal(size=(D, E)) * 0.3))
    noisy = logits + rng.standard_normal((T, E)) * std
    show("1'. H = logits + N(0,1) * softplus(x @ w_noise)", noisy, "[T, E]")
    show("   threshold expert per (t, e): K-th best of the others", noise_thresholds(noisy, K),
         "[T, E]")
    load = smooth_load(logits, noisy, std, K)
    print(f"   smooth load = sum_t Phi((clean - threshold) / std) = {np.round(load, 3).tolist()}; "
          f"load loss CV^2 = {load.var() / load.mean() ** 2:.4f}")
    layer = pymoe.MoELayer(D, H, E, K, CAPACITY_FACTOR, router_noise="noisy_topk",
                           dtype=np.float64, seed=0)
    layer.forward(x, train=True)
    print(f"   MoELayer(router_noise='noisy_topk').forward(train=True): load_loss "
          f"{layer.load_loss:.4f}")
    return layer.routing


def expert_choice(x, logits):
    idx = expert_choice_pairs(logits)
    p = softmax(logits)
    C = capacity_formula(T, E, K, CAPACITY_FACTOR, "k_ceil")
    keep = expert_choice_keep(p, idx, C)
    show(f"3'. every token lists every expert (K = E pairs); each expert keeps its top C = {C}",
         np.where(keep, idx, -1), "[T, E]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, selection="experts")
    np.testing.assert_array_equal(r.kept, keep)
    print(f"   experts per token: {r.kept.sum(axis=1).tolist()} (0..E); every expert full: "
          f"{r.expert_load_kept.tolist()}")
    return r


def sinkhorn_selection(x, logits):
    bal = sinkhorn(logits)
    show("3'. Sinkhorn-balanced exp(logits): columns carry equal mass", bal, "[T, E]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, selection="sinkhorn")
    same(r.expert_index, top_k(bal, K))
    print(f"   load before dropping: plain {np.bincount(top_k(logits, K).ravel(), minlength=E)}"
          f" -> Sinkhorn {r.expert_load}")
    return r


def gshard(x, logits):
    p = softmax(logits)
    idx = top_k(logits, K)
    keep = second_expert_keep(p, idx, "random", 0.2, np.random.default_rng(0))
    show("2nd expert kept with probability min(1, g2 / 0.2) (seeded)", keep, "[T, K]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, normalize=True, second_expert_policy="random",
                    seed=0)
    np.testing.assert_array_equal(r.kept[~keep], False)
    return r


def token_priority(x, logits):
    order = pair_order(np.arange(T), K, "token")
    print(f"  6'. token-major pair order (t*K + j): {order.tolist()}")
    idx = top_k(logits, K)
    C = capacity_formula(T, E, K, CAPACITY_FACTOR, "k_ceil")
    pos = position_in_pair_order(idx, E, order)
    show("7'. positions counted in that order", pos, "[T, K]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, priority="token")
    np.testing.assert_array_equal(r.position, np.where(pos < C, pos, -1))
    return r


def random_priority(x, logits):
    order = priority_order(softmax(logits), "random", np.random.default_rng(3))
    print(f"  6'. random token order (seed 3): {order.tolist()}")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, priority="random", seed=3)
    np.testing.assert_array_equal(r.token_order, order)
    show("   positions", r.position, "[T, K]")
    return r


def drop_probs(x, logits):
    idx = top_k(logits, K)
    g = gates(softmax(logits), idx, False)
    C = capacity_formula(T, E, K, CAPACITY_FACTOR, "k_ceil")
    keep = keep_by_score(idx, pair_order(np.arange(T), K, "choice"), g, E, C)
    show(f"9'. each expert keeps its C = {C} highest gates", keep, "[T, K]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, drop_policy="probs")
    np.testing.assert_array_equal(r.kept, keep)
    show("   then the kept pairs fill slots in priority order", r.position, "[T, K]")
    return r


def renormalize(x, logits):
    r0 = pymoe.route(logits, K, CAPACITY_FACTOR, normalize=True)
    r = pymoe.route(logits, K, CAPACITY_FACTOR, normalize=True, renormalize_after_drop=True)
    same(r.gate, renormalize_kept(r0.gate_before_drop, r0.kept))
    show("9b. default: gates after the drop (g1 < 1 when the 2nd choice dropped)", r0.gate, "[T, K]")
    show("    renormalize_after_drop=True (DeepSpeed): survivors sum to 1", r.gate, "[T, K]")
    return r


def capacity_rules(x, logits):
    for rule in ("k_ceil", "floor", "round", "tutel"):
        r = pymoe.route(logits, K, CAPACITY_FACTOR, capacity_rule=rule)
        print(f"  8'. capacity_rule={rule!r:9s} C = {r.capacity}  dropped {r.dropped_fraction:.3f}")
    r = pymoe.route(logits, K, capacity=2)
    print(f"  8'. capacity=2 (fixed)     C = {r.capacity}  dropped {r.dropped_fraction:.3f}")
    return r


def shared_experts(x, logits):
    layer = pymoe.MoELayer(D, H, E, K, CAPACITY_FACTOR, num_shared_experts=1,
                           shared_expert_gate=True, dtype=np.float64, seed=0)
    y = layer(x)
    y_shared, cache = shared_experts_forward(x, layer.params, "relu", True)
    show("11'. sigmoid gate of the shared expert (Qwen2-MoE)", cache.gate, "[T]", None)
    print(f"   |shared part| / |y| = {np.linalg.norm(y_shared) / np.linalg.norm(y):.3f}")
    return layer.routing


def losses(x, logits):
    r = pymoe.route(logits, K, None)
    for kind, kw in (("switch", {}), ("k_scaled", {}), ("sequence", {"sequence_length": 4})):
        rr = pymoe.route(logits, K, None, load_balancing=kind, **kw)
        same(rr.aux_loss, balance_loss(r.probs, r.expert_index, kind, kw.get("sequence_length")))
        print(f"  12'. load_balancing={kind!r:11s} aux_loss = {rr.aux_loss:.4f}")
    return r


def top_p(x, logits):
    p = softmax(logits)
    idx = top_k(logits, E)
    running = np.cumsum(np.take_along_axis(p, idx, axis=-1), axis=-1)
    show("3'. running sum of each token's sorted probabilities", running, "[T, E]")
    taken = np.ones_like(running, dtype=bool)
    taken[:, 1:] = running[:, :-1] <= 0.6  # up to and including the one that passes p = 0.6
    r = pymoe.route(logits, E, CAPACITY_FACTOR, top_p=0.6)
    np.testing.assert_array_equal(r.selected, taken)
    print(f"   experts per token (top_p=0.6, no cap): {r.experts_per_token.tolist()}")
    return r


def relu_routing(x, logits):
    g = np.maximum(logits, 0)
    show("2'. gates = relu(router_logits): a token's experts are its positive ones", g, "[T, E]")
    r = pymoe.route(logits, K, CAPACITY_FACTOR, selection="relu")
    np.testing.assert_array_equal(r.experts_per_token, (logits > 0).sum(axis=1))
    n = (logits > 0).sum(axis=0)
    l1 = E * np.dot(n / (T * K), g.sum(axis=0) / T)
    same(r.aux_loss, l1)
    print(f"   experts per token: {r.experts_per_token.tolist()}; L1 regulariser "
          f"E sum_e n_e/(T K) * mean_t relu = {l1:.4f}")
    return r


def soft_moe(x, logits):
    layer = pymoe.SoftMoELayer(D, H, E, 1, normalize=False, dtype=np.float64, seed=0)
    y = layer(x)
    show("   dispatch weights: each slot's softmax over the tokens", layer.dispatch_weights[0],
         "[T, E*S]")
    show("   combine weights: each token's softmax over the slots", layer.combine_weights[0],
         "[T, E*S]")
    same(layer.dispatch_weights[0].sum(axis=0), np.ones(E))
    print(f"   y {tuple(y.shape)}: every token gets an output, nothing is dropped")
    return layer


VARIANTS = {
    "sigmoid": sigmoid_scores, "expert_bias": expert_bias, "groups": groups, "scaling": scaling,
    "noisy_topk": noisy_topk, "expert_choice": expert_choice, "sinkhorn": sinkhorn_selection,
    "gshard": gshard, "token_priority": token_priority, "random_priority": random_priority,
    "drop_probs": drop_probs, "renormalize": renormalize, "capacity_rules": capacity_rules,
    "shared_experts": shared_experts, "losses": losses, "top_p": top_p,
    "relu_routing": relu_routing, "soft_moe": soft_moe,
}


def pictures(routings: dict, out: str) -> dict:
    figs = {}
    if "expert_choice" in routings:
        path = os.path.join(out, "07_expert_choice.png")
        figs[path] = viz.expert_choice_picture(routings["expert_choice"], path)
    if "groups" in routings:
        path = os.path.join(out, "07_group_limited.png")
        figs[path] = viz.group_limited_picture(routings["groups"], path)
    if "top_p" in routings:
        path = os.path.join(out, "top_p_k_per_token.png")
        figs[path] = viz.experts_per_token_picture(routings["top_p"], path)
    if "soft_moe" in routings:
        path = os.path.join(out, "soft_moe_weights.png")
        figs[path] = viz.soft_moe_picture(routings["soft_moe"], path)
    return figs


def main(argv: list[str] | None = None) -> dict:
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["all", *VARIANTS], default="all")
    ap.add_argument("--quick", action="store_true", help="print shapes, not every array")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    VERBOSE = not args.quick
    np.set_printoptions(linewidth=110)
    x, logits = tokens()
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    routings = {}
    for name in names:
        print(f"\n== {name} " + "=" * (70 - len(name)))
        routings[name] = VARIANTS[name](x, logits)
    return {"routings": routings, "pictures": pictures(routings, args.out)}


if __name__ == "__main__":
    main()
