"""02: capacity and balance. How much is dropped, and which tokens lose out.

What it teaches:
- Every expert keeps at most C = ceil(K*T*capacity_factor/E) assignments; the rest are dropped.
  The drop rate falls as the capacity factor grows, and a skewed router (a few popular experts)
  drops far more than a balanced one at the same capacity.
- The priority order cannot change *how many* pairs are dropped (each expert drops
  max(0, load - C)), only *which*. Batch-prioritised routing (priority="score", V-MoE) serves the
  most confident tokens first: at tight capacity it drops the least confident tokens whole, and
  the routing weight it loses is smaller. With more slack the overflow is mostly second choices,
  and there the least confident tokens, having flatter distributions, hold the larger second
  gates: BPR then loses slightly more weight. The numbers below show both regimes.
- Capacity has two costs, and the capacity factor trades one for the other: pairs dropped
  (their tokens lose an expert's output) and slots padded (empty rows of the fixed [E, C, D]
  buffers that are still computed, or sent between devices, for nothing). Raising the factor
  buys fewer drops with more padding; a skewed router pays more of both.
- Expert load before and after dropping: the picture of what capacity does.

Run:  python examples/02_capacity.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse

import numpy as np

import pymoe
from pymoe import viz

MIN_TOKENS = 10  # fewest tokens a plotted mean may rest on


def router_logits(kind: str, T: int, E: int, rng: np.random.Generator) -> np.ndarray:
    """[T, E] logits: "balanced" (every expert equally likely) or "skewed" (expert e's logit
    shifted by -0.35*e, so expert 0 is about 2.4x as popular as expert 2.5 positions down)."""
    logits = rng.normal(size=(T, E))
    if kind == "skewed":
        logits -= 0.35 * np.arange(E)
    return logits


def lost_weight(r: pymoe.Routing) -> float:
    """Share of the total gate weight that sits on dropped pairs."""
    total = r.gate_before_drop.sum()
    return float(r.gate_before_drop[~r.kept].sum() / total) if total else 0.0


def lost_confidence(r: pymoe.Routing) -> float:
    """Mean top-1 probability of the tokens that lost every choice (nan when none did)."""
    lost = ~r.kept.any(axis=1)
    return float(r.probs[lost].max(axis=1).mean()) if lost.any() else float("nan")


def prob(v: float) -> str:
    """A mean probability for the table, '-' where it is nan (no token lost every choice)."""
    return f"{v:6.2f}" if np.isfinite(v) else f"{'-':>6s}"


def padded_fraction(r: pymoe.Routing) -> float:
    """Share of the E*C expert slots left empty (padding that is computed or sent anyway)."""
    slots = r.num_experts * r.capacity
    return float(slots - r.expert_load_kept.sum()) / slots if slots else 0.0


def sweep(logits: dict[str, np.ndarray], K: int, factors: np.ndarray) -> dict:
    """Drop statistics for each router kind and priority over the capacity factors."""
    out: dict = {}
    for kind, lg in logits.items():
        for priority in ("choice", "score"):
            rs = [pymoe.route(lg, K, float(cf), priority=priority) for cf in factors]
            out[(kind, priority)] = {
                "dropped": [r.dropped_fraction for r in rs],
                "tokens_dropped": [r.tokens_dropped_fraction for r in rs],
                "tokens_lost": [int(round(r.tokens_dropped_fraction * r.num_tokens)) for r in rs],
                "padded": [padded_fraction(r) for r in rs],
                "lost_weight": [lost_weight(r) for r in rs],
                "lost_confidence": [lost_confidence(r) for r in rs],
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    T, E, K = (512, 8, 2) if args.quick else (4096, 8, 2)
    factors = np.round(np.arange(0.5, 2.0001, 0.125), 3)
    rng = np.random.default_rng(0)
    logits = {kind: router_logits(kind, T, E, rng) for kind in ("balanced", "skewed")}
    res = sweep(logits, K, factors)

    print(f"Drop statistics, T={T} tokens, E={E} experts, K={K}, over capacity factors "
          f"{factors[0]}..{factors[-1]}")
    print(f"{'':>12s} | {'dropped pairs':^19s} | {'padded slots':^19s} | skewed router, choice / "
          "score priority")
    print(f"{'cf':>6s} {'C':>5s} | {'balanced':>9s} {'skewed':>9s} | {'balanced':>9s} "
          f"{'skewed':>9s} | {'tokens lost whole':>17s} | {'their top-1 prob':>16s} | "
          f"{'weight lost':>15s}")
    sc, ss = res[("skewed", "choice")], res[("skewed", "score")]
    bc = res[("balanced", "choice")]
    for i, cf in enumerate(factors):
        C = pymoe.capacity.expert_capacity(T, E, K, float(cf))
        print(f"{cf:6.3f} {C:5d} | {bc['dropped'][i]:9.1%} "
              f"{sc['dropped'][i]:9.1%} | {bc['padded'][i]:9.1%} {sc['padded'][i]:9.1%} | "
              f"{sc['tokens_dropped'][i]:7.1%} / "
              f"{ss['tokens_dropped'][i]:6.1%} | {prob(sc['lost_confidence'][i])} / "
              f"{prob(ss['lost_confidence'][i])} | {sc['lost_weight'][i]:6.1%} / "
              f"{ss['lost_weight'][i]:6.1%}")
    if not np.isfinite([*sc["lost_confidence"], *ss["lost_confidence"]]).all():
        print("(their top-1 prob: - where no token lost every choice)")
    same = all(res[(k, "choice")]["dropped"] == res[(k, "score")]["dropped"]
               for k in ("balanced", "skewed"))
    print(f"dropped pairs identical under both priorities: {same} (the order decides which, "
          "not how many)")
    i1 = int(np.argmin(np.abs(factors - 1.0)))
    d_model = 4096
    row = 4 * d_model  # bytes of one float32 token row
    for kind in ("balanced", "skewed"):
        C = pymoe.capacity.expert_capacity(T, E, K, 1.0)
        empty = round(res[(kind, "choice")]["padded"][i1] * E * C)
        print(f"at capacity factor 1.0, {kind} router: {res[(kind, 'choice')]['dropped'][i1]:.1%} "
              f"of pairs dropped and {empty} of {E * C} slots empty; at D={d_model} in float32 "
              f"that is {empty * row / 2**20:.1f} MiB of padding per layer and step, computed "
              "and, across devices, sent twice")
    print("(at capacity factor 1.0 there are exactly K*T slots, so every dropped pair leaves an "
          "empty slot at some other expert: the drops and the padding are the same count)")

    curves = {
        "dropped pairs, balanced router": res[("balanced", "choice")]["dropped"],
        "dropped pairs, skewed router": res[("skewed", "choice")]["dropped"],
        "padded (empty) slots, balanced router": res[("balanced", "choice")]["padded"],
        "padded (empty) slots, skewed router": res[("skewed", "choice")]["padded"],
    }
    weight = {
        "skewed, choice priority": res[("skewed", "choice")]["lost_weight"],
        "skewed, score priority (BPR)": res[("skewed", "score")]["lost_weight"],
        "balanced, choice priority": res[("balanced", "choice")]["lost_weight"],
        "balanced, score priority (BPR)": res[("balanced", "score")]["lost_weight"],
    }
    keys = {"skewed, choice priority": ("skewed", "choice"),
            "skewed, score priority (BPR)": ("skewed", "score"),
            "balanced, choice priority": ("balanced", "choice"),
            "balanced, score priority (BPR)": ("balanced", "score")}
    # A mean over a handful of tokens is noise: leave out points that average fewer than 10.
    whole = {label: [c if n >= MIN_TOKENS else float("nan") for c, n in
                     zip(res[key]["lost_confidence"], res[key]["tokens_lost"])]
             for label, key in keys.items()}
    lost_counts = {label: res[key]["tokens_lost"] for label, key in keys.items()}
    out = args.out
    paths = [f"{out}/02_drop_rate.png", f"{out}/02_lost_weight.png",
             f"{out}/02_tokens_lost.png", f"{out}/02_expert_load.png"]
    figs = {}
    figs[paths[0]] = viz.curves(
        factors, curves, paths[0], xlabel="capacity factor",
        ylabel="fraction of pairs dropped / of slots empty",
        title=f"the two costs of capacity, T={T} E={E} K={K}: a larger factor drops less\n"
              "and pads more (padding is computed, and sent between devices, for nothing)",
        reference=(0.0, "nothing dropped / padded"), legend="below")
    figs[paths[1]] = viz.curves(
        factors, weight, paths[1], xlabel="capacity factor",
        ylabel="share of the total gate weight",
        title="routing weight on the dropped pairs\n(BPR loses less at tight capacity, slightly "
              "more once mostly second choices overflow)")
    figs[paths[2]] = viz.curves(
        factors, whole, paths[2], xlabel="capacity factor",
        ylabel="their mean top-1 router probability",
        title="how confident were the tokens that lost every choice? BPR drops the least\n"
              f"confident (number at each point: tokens averaged; under {MIN_TOKENS} not drawn)",
        counts=lost_counts, legend="below")
    loads = {kind: pymoe.route(logits[kind], K, 1.0) for kind in ("balanced", "skewed")}
    figs[paths[3]] = viz.expert_load_bars({f"{k}, capacity factor 1.0": r
                                           for k, r in loads.items()}, paths[3])
    return {"factors": factors, "results": res, "loads": loads, "pictures": figs}


if __name__ == "__main__":
    main()
