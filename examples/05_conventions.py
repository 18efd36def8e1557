"""05: the same router logits through every system's conventions (pymoe presets).

What it teaches:
- "Softmax, top-K, capacity, drop" hides a dozen choices that differ between systems (which
  choices count for capacity, when gates are renormalised, who claims a slot first, which pairs
  an over-full expert drops, how the aux loss is scaled). docs/conventions.md lists them, with
  where each system does what in its source.
- As shipped (each system's own capacity defaults), the same logits lose very different numbers
  of tokens: the HF decoder models and Megatron-Core are dropless by default, Mesh-TF and
  flaxformer leave K out of the capacity and drop most of the second choices.
- At one shared capacity factor, the drop rate hardly moves but *which* pairs survive does
  (priority and drop policy), and so does the gate each survivor gets (renormalised before the
  drop, after it, or never) and the aux-loss value the optimiser sees (balanced at 1 or at K).

Run:  python examples/05_conventions.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse

import numpy as np

import pymoe
from pymoe import viz


def router_logits(T: int, E: int, seed: int) -> np.ndarray:
    """[T, E] logits of a mildly skewed router: expert e's logit shifted by -0.1 e."""
    return np.random.default_rng(seed).normal(size=(T, E)) - 0.1 * np.arange(E)


TOP1 = ("switch", "deepspeed-top1")  # top-1 systems: compared among themselves with K = 1


def porting_example(logits: np.ndarray, K: int) -> dict:
    """One token, three conventions: the gates a token keeps when its second choice is dropped."""
    r = {name: pymoe.route(logits, K, 1.0, min_capacity=0, preset=name)
         for name in ("gshard", "deepspeed-top2", "flaxformer")}
    lost = np.logical_and.reduce([x.kept[:, 0] & ~x.kept[:, 1] for x in r.values()])
    t = int(np.flatnonzero(lost)[0])
    return {"token": t, "gates": {n: r[n].gate[t].round(3).tolist() for n in r},
            "probs": r["gshard"].probs[t, r["gshard"].expert_index[t]].round(3).tolist()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    args = ap.parse_args(argv)
    T, E, K = (128, 16, 2) if args.quick else (1024, 16, 2)
    logits = router_logits(T, E, seed=0)
    # the common HF rule first, then every top-K preset
    names = ["mixtral"] + [n for n in pymoe.presets() if n not in ("mixtral", *TOP1)]

    print(f"Every preset on the same router logits: T={T}, E={E}, K={K}.\n")
    print("1. As shipped: each system's own capacity factor and minimum (dropless where it is):")
    own = {}
    for n in names:
        p = pymoe.preset(n)
        own.setdefault("dropless" if p.capacity_factor is None else
                       f"factor {p.capacity_factor}, rule {p.capacity_rule}, min {p.min_capacity}",
                       []).append(n)
    for setting, group in own.items():
        print(f"   {setting}: {', '.join(group)}")
    shipped = pymoe.compare(logits, names, k=K)
    print(shipped.table(), "\n")
    print("2. One shared capacity factor (1.0, no minimum): what differs is which pairs survive,")
    print("   their gates and the aux loss.")
    shared = pymoe.compare(logits, names, k=K, capacity_factor=1.0, min_capacity=0)
    print(shared.table(), "\n")
    top1 = pymoe.compare(logits, [*TOP1, "tutel", "megablocks", "megatron"], k=1,
                         capacity_factor=1.0, min_capacity=0)
    print("   The top-1 systems, K = 1:")
    print(top1.table(), "\n")

    ex = porting_example(logits, K)
    print(f"3. Token {ex['token']} loses its second choice at capacity factor 1.0. Its two router")
    print(f"   probabilities are {ex['probs']}; the gates it keeps:")
    for name, g in ex["gates"].items():
        print(f"     {name:15s} {g}")
    print("   GShard renormalised before the drop (g1 < 1 stays), DeepSpeed renormalises the")
    print("   survivor (g1 = 1), flaxformer never renormalises (the raw probability).")

    # Capacity formulas: C against the number of tokens routed together, capacity factor 1.25,
    # E = 8, K = 2, each system's own minimum
    tokens = np.arange(8, 97, 4)
    rules = {"deepspeed-top2": "ceil(K T cf / E), min 4", "gshard": "floor(T cf / E), min 4",
             "flaxformer": "round(T cf / E), min 4", "tutel": "K floor(cf ceil(T / E))",
             "megablocks": "floor(K T cf / E)"}
    caps = {f"{n}: {rule}": [pymoe.route(router_logits(int(t), 8, 1), 2, 1.25, preset=n).capacity
                             for t in tokens]
            for n, rule in rules.items()}
    out = args.out
    paths = [f"{out}/05_presets.png", f"{out}/05_capacity.png"]
    figs = {paths[0]: viz.preset_differences(shared, paths[0])}
    figs[paths[1]] = viz.curves(
        tokens, caps, paths[1], xlabel="tokens routed together T", ylabel="slots per expert C",
        title="one capacity factor (1.25), five capacity formulas (E = 8, K = 2)")
    return {"shipped": shipped, "shared": shared, "top1": top1, "porting": ex, "capacities": caps,
            "pictures": figs}


if __name__ == "__main__":
    main()
