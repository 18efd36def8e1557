"""03b: what the z-loss and jitter are for, what MoE costs in training and inference, and decode.

What it teaches:
- Training instability. Nothing in the task loss holds the router logits down: softmax only sees
  their differences, so their level is free to drift. With 03's classifier at ten times 03's
  learning rate the largest logit climbs an order of magnitude above 03's, and bfloat16 stores a
  logit of 100 only to within 0.25 (half its step there): the larger the logits, the coarser
  the router's numbers (ST-MoE's reason for the z-loss). The router z-loss (ST-MoE, Zoph et al.
  2022, eq. 5: z_loss = mean over tokens of logsumexp(logits)^2, weight 1e-3) pulls the
  logsumexp, and with it the largest logit, back towards 0. It does not limit how far apart the
  logits are (the choice): the lowest may fall far below 0, where exp() makes them harmless.
  Jitter (Switch Transformer, Fedus et al. 2021: in training the router's copy of the input is
  multiplied entrywise by U(1 - eps, 1 + eps), eps = 1e-2, while the experts see the clean input;
  pymoe's router_noise="jitter") is noise on the choice of the tokens near a tie, not a pull on
  the logits. Every number and the picture come from the runs themselves (fixed seeds).
- Training against inference cost, counted for Mixtral-8x7B and DeepSeek-V3 from their published
  configurations (00_why counts their parameters): per token an MoE computes with its active
  parameters only, which is the saving. But every expert must stay in memory (in training with
  its gradient and optimizer state), every MoE layer adds all-to-all exchanges between devices
  (2 per step in inference, 4 in training), and training pays for capacity padding, dropped
  pairs and the load the aux loss fails to even (measured here with pymoe.route).
- Low-latency inference (decode: a step processes T = 1..64 new tokens). Measured with
  pymoe.route: the number of distinct experts T tokens touch grows quickly with T, towards all E.
  A decode step reads the weights of every expert it touches, so at batch 64 an MoE reads nearly
  all its stored weights per step, several times what a dense model of the same active size
  reads: decode is bound by memory bandwidth, not compute. Then the levers: fewer experts per
  token, expert parallelism, and dropless routing at inference.

Run:  python examples/03b_stability_and_cost.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np

import pymoe
from pymoe import viz

HERE = os.path.dirname(os.path.abspath(__file__))


def sibling(name: str):
    """Import another example from its file (their names start with digits)."""
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(HERE, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ (a) training instability

Z_LOSS, JITTER = 1e-3, 1e-2  # ST-MoE's z-loss weight; Switch Transformer's jitter eps
# 20 epochs (the default) show the effect, and their numbers agree within 1% across the BLAS
# kernels tried (OpenBLAS SkylakeX, Haswell, Sandybridge). Trained longer at lr 0.03 the runs turn
# chaotic (loss spikes), and their last epochs depend on the last bits of the matmuls.
RUNS = {  # name: (Adam learning rate, z_loss_coef, jitter_eps)
    "lr 0.003 (03's), neither": (3e-3, 0.0, 0.0),
    "lr 0.03, neither": (3e-2, 0.0, 0.0),
    "lr 0.03, z-loss 1e-3": (3e-2, Z_LOSS, 0.0),
    "lr 0.03, jitter 1e-2": (3e-2, 0.0, JITTER),
    "lr 0.03, z-loss + jitter": (3e-2, Z_LOSS, JITTER),
}
SEED_RUNS = ["lr 0.03, neither", "lr 0.03, z-loss 1e-3", "lr 0.03, jitter 1e-2"]


def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (8 significant bits, round to nearest even), returned as float32."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def bf16_step(v: float) -> float:
    """Spacing of bfloat16 numbers at |v|: a logit that large is stored to within half of it."""
    return float(2.0 ** (np.floor(np.log2(abs(v))) - 7)) if v else 0.0


def train_run(t03, seed: int, lr: float, z: float, jit: float, epochs: int) -> dict:
    """03's classifier (E=4, K=2, capacity factor 1.25, aux loss 0.01) trained with Adam at lr on
    seed's split; per epoch the largest router logit of its training batches, per step how many
    first choices the jitter moved; at the end the test set routed dropless."""
    x_tr, y_tr, x_te, y_te, _ = t03.load_data(seed)
    layer = pymoe.MoELayer(48, 32, 4, 2, 1.25, aux_loss_coef=0.01, z_loss_coef=z,
                           jitter_eps=jit, dtype=np.float64, seed=seed)
    model = t03.Classifier(64, 48, 10, layer, seed)
    opt = t03.Adam(model.all_params(), lr=lr)
    rng = np.random.default_rng(seed)
    epoch_max, moved = [], []
    for _ in range(epochs):
        order, largest = rng.permutation(len(x_tr)), -np.inf
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss, dlogits = t03.cross_entropy(model.forward(x_tr[idx], train=True), y_tr[idx])
            r = layer.routing
            largest = max(largest, float(r.router_logits.max()))
            clean = model.h @ layer.params["w_router"] + layer.params["b_router"]  # unjittered
            moved.append(float((clean.argmax(axis=1) != r.expert_index[:, 0]).mean()))
            opt.step(model.backward(dlogits))
        epoch_max.append(largest)
    acc, r = t03.evaluate(model, x_te, y_te)
    r16 = pymoe.route(to_bfloat16(r.router_logits).astype(np.float64), 2, None)
    changed = (np.sort(r16.expert_index, axis=1) != np.sort(r.expert_index, axis=1)).any(axis=1)
    return {"epoch_max": epoch_max, "jitter_moved": float(np.mean(moved)), "test_acc": acc,
            "routing": r, "bf16_changed": float(changed.mean())}


def instability(epochs: int, seeds: int) -> dict:
    t03 = sibling("03_train.py")
    data_name = t03.load_data(0)[4]
    print("(a) Training instability: the router logits, with and without the z-loss and jitter")
    print(f"    03's classifier ({data_name.split(' (')[0]}, 64 -> 48 -> residual MoE E=4, K=2, "
          f"capacity factor 1.25, aux loss 0.01), Adam, batch 64, {epochs} epochs, seed 0.")
    print("    z-loss = mean over tokens of logsumexp(logits)^2 (ST-MoE eq. 5), weight 1e-3; "
          "jitter: the router's copy of the input times U(0.99, 1.01) per entry, in training.")
    runs = {name: train_run(t03, 0, *cfg, epochs) for name, cfg in RUNS.items()}
    marks = sorted({min(max(e, 1), epochs) for e in (1, epochs // 4, epochs // 2,
                                                     3 * epochs // 4, epochs)})
    head = " ".join(f"{'ep ' + str(e):>6s}" for e in marks)
    print("\n    The largest router logit in the training batches of epoch e; the test set at the "
          "end (routed dropless):")
    print(f"    {'run':26s} {head}  {'largest':>8s} {'lowest':>8s} {'z-loss':>8s} {'test acc':>9s}")
    for name, res in runs.items():
        lg = res["routing"].router_logits
        print(f"    {name:26s} " + " ".join(f"{res['epoch_max'][e - 1]:6.1f}" for e in marks)
              + f"  {lg.max():8.1f} {lg.min():8.1f} {res['routing'].z_loss:8.2f} "
              f"{res['test_acc']:9.1%}")
    by_seed = {name: [runs[name]["epoch_max"][-1]] for name in SEED_RUNS}
    if seeds > 1:
        for name in SEED_RUNS:
            by_seed[name] += [train_run(t03, s, *RUNS[name], epochs)["epoch_max"][-1]
                              for s in range(1, seeds)]
        print(f"    The same on other seeds (each a new split and initialisation): the largest "
              f"logit in epoch {epochs}")
        print(f"    {'run':26s} " + " ".join(f"{'seed ' + str(s):>7s}" for s in range(seeds)))
        for name, v in by_seed.items():
            print(f"    {name:26s} " + " ".join(f"{x:7.1f}" for x in v))

    print("\n    Why the level matters: bfloat16 keeps 8 significant bits, so a logit near v is "
          "stored to within half the bf16 step at v.")
    print("    The z-loss bounds the level (the logsumexp), not the spread: with it the lowest "
          "logits fall as far or further (the 'lowest' column).")
    print(f"    {'run':26s} {'largest logit':>14s} {'bf16 step':>10s} {'median gap':>11s} "
          f"{'test tokens whose experts':>26s}")
    print(f"    {'':26s} {'(last epoch)':>14s} {'there':>10s} {'1st-2nd':>11s} "
          f"{'change in bf16':>26s}")
    for name, res in runs.items():
        v, top2 = res["epoch_max"][-1], np.sort(res["routing"].router_logits, axis=1)[:, -2:]
        print(f"    {name:26s} {v:14.1f} {bf16_step(v):10.4g} "
              f"{np.median(top2[:, 1] - top2[:, 0]):11.1f} {res['bf16_changed']:26.1%}")
    worst = max(res["bf16_changed"] for res in runs.values())
    plain, zl = runs["lr 0.03, neither"], runs["lr 0.03, z-loss 1e-3"]
    print(f"    In this small model the bf16 step stays well below the typical gap between a "
          f"token's first two logits, so rounding the logits to bf16 changes few choices (at most "
          f"{worst:.1%} of the test tokens in any run).")
    print("    ST-MoE's concern is a large model whose router logits come out of bf16 arithmetic at "
          "that coarseness: the z-loss keeps them where bf16 is fine")
    print(f"    (test accuracy {zl['test_acc']:.1%} with it, {plain['test_acc']:.1%} without, "
          "one seed: 03 shows a seed's spread is about a point).")
    jitter = [n for n in RUNS if RUNS[n][2]]
    print("\n    Jitter moves the first choice of the training tokens that sit near a tie: "
          + ", ".join(f"{runs[n]['jitter_moved']:.2%} of them ({n.split(', ')[1]})" for n in jitter)
          + ", averaged over every step (0 without it).")
    print("    It is noise on the choice, not a pull on the logits: nothing in it brings their "
          "level back" + (" (the seeds above)." if seeds > 1 else "."))
    return {"runs": runs, "by_seed": by_seed}


# ------------------------------------------------------------------ (b) training vs inference

BF16, TRAIN_STATE = 2, 16  # bytes per parameter: bf16 weights; mixed-precision Adam (see below)


def giga(n: float, unit: str = "") -> str:
    return f"{n / 1e9:.1f}G{unit}" if n < 1e12 else f"{n / 1e12:.2f}T{unit}"


def kib(n: float) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB"


def costs(quick: bool) -> dict:
    w0 = sibling("00_why.py")
    models = [w0.mixtral_8x7b(), w0.deepseek_v3()]
    print("\n(b) Training against inference cost, from the published configurations "
          "(00_why counts the parameters)")
    col = "".join(f"{m.name:>16s}" for m in models)
    print(f"    {'':52s}{col}")

    def row(label: str, values) -> None:
        print(f"    {label:52s}" + "".join(f"{v:>16s}" for v in values))

    row("parameters stored", [giga(m.total()) for m in models])
    row("parameters used per token (active)", [giga(m.active()) for m in models])
    row("inference FLOPs per token, about 2 x active", [giga(2 * m.active()) for m in models])
    row("  a dense model storing as much: 2 x stored", [giga(2 * m.total()) for m in models])
    row("  MoE's saving per token", [f"{m.total() / m.active():.1f}x" for m in models])
    row("training FLOPs per token, about 6 x active", [giga(6 * m.active()) for m in models])
    row("weights resident in inference, bf16 (2 B/param)",
        [giga(BF16 * m.total(), "B") for m in models])
    row("  a dense model of the active size", [giga(BF16 * m.active(), "B") for m in models])
    row("training state, 16 B/param", [giga(TRAIN_STATE * m.total(), "B") for m in models])
    row("  a dense model of the active size", [giga(TRAIN_STATE * m.active(), "B")
                                              for m in models])
    print("    (FLOPs: a multiply and an add per parameter used, three times that with the "
          "backward; attention over the context comes on top.")
    print("    16 B/param: bf16 weight and gradient, fp32 master weight and Adam's two moments "
          "(ZeRO's count, Rajbhandari et al. 2020), for every expert, chosen or not.)")
    print("    All-to-all with expert parallelism: each token's D values go to each of its K "
          "experts and come back, K*D*2 B per exchange in bf16:")
    one = [m.k * m.d_model * BF16 for m in models]
    row("  one exchange, per token and MoE layer", [kib(b) for b in one])
    row("  inference: dispatch + combine = 2 exchanges", [kib(2 * b) for b in one])
    row("  training: + their 2 gradients = 4 exchanges", [kib(4 * b) for b in one])
    row("  training, per token over all MoE layers",
        [kib(4 * b * m.moe_layers) for b, m in zip(one, models)])
    print("    (Upper bounds: copies whose expert is on the token's own device stay there, and "
          "DeepSeek-V3 sends its dispatch in FP8 and each token to at most 4 nodes.)")

    # Capacity and balance in training, measured with pymoe.route on 02_capacity's routers.
    t02 = sibling("02_capacity.py")
    T, E, K, cf = (1024 if quick else 4096), 8, 2, 1.25
    rng = np.random.default_rng(0)
    print(f"\n    What balancing costs in training, measured with pymoe.route (T={T}, E={E}, "
          f"K={K}, 02_capacity's routers):")
    print(f"    {'router':10s} {'capacity factor 1.25: pairs dropped':>36s} {'slots padded':>13s}"
          f"   dropless: busiest expert / mean load")
    measured = {}
    for kind in ("balanced", "skewed"):
        logits = t02.router_logits(kind, T, E, rng)
        r = pymoe.route(logits, K, cf)
        free = pymoe.route(logits, K, None)
        padded = 1 - r.expert_load_kept.sum() / (E * r.capacity)
        straggle = free.expert_load.max() / free.expert_load.mean()
        measured[kind] = {"dropped": r.dropped_fraction, "padded": float(padded),
                          "straggle": float(straggle)}
        print(f"    {kind:10s} {r.dropped_fraction:36.1%} {padded:13.1%}   {straggle:8.2f}x")
    m = models[0]
    print("    Padded slots are computed (and sent) for nothing, dropped pairs lose an expert's "
          "output, and without a capacity the step waits for the busiest expert.")
    print(f"    The aux loss itself is cheap (a few E = {m.num_experts} operations per token against "
          f"2*K*3*D*H = {2 * m.k * m.expert_params() / 1e6:.0f}M expert FLOPs per token in each of "
          "Mixtral's MoE layers); it "
          "costs by evening the load only partly (03_train's load CVs) and by being a term that "
          "is not the task's.")
    a, b = models
    print(f"    So: per token an MoE computes like its active size ({a.total() / a.active():.1f}x "
          f"and {b.total() / b.active():.1f}x fewer FLOPs than a dense model storing as much), "
          "which is what inference saves.")
    print(f"    Training a token costs 6 x active FLOPs as well, but on top: every expert's training "
          f"state in memory ({giga(TRAIN_STATE * a.total(), 'B')} for {a.name} against "
          f"{giga(TRAIN_STATE * a.active(), 'B')} for a dense model of its active size), 4 "
          "all-to-alls per MoE layer, padded slots, dropped pairs and the stragglers the aux "
          "loss only partly prevents.")
    return {"models": {m.name: {"total": m.total(), "active": m.active(),
                                "exchange_bytes": b} for m, b in zip(models, one)},
            "balance": measured}


# ------------------------------------------------------------------ (c) low-latency inference

DECODE_T = [1, 2, 4, 8, 16, 32, 64]


def skewed_logits(rng: np.random.Generator, n: int, E: int) -> np.ndarray:
    """[n, E] standard normal logits with expert e shifted by -2.5 * e / (E - 1): the first
    expert's logit sits 2.5 above the last's (a popularity skew, as trained routers have)."""
    return rng.normal(size=(n, E)) - 2.5 * np.arange(E) / (E - 1)


def distinct_experts(logits: np.ndarray, K: int, T_max: int, devices: int = 1) -> np.ndarray:
    """Route `[trials * T_max, E]` logits dropless with pymoe.route, split them into trials of
    T_max consecutive tokens, and return the mean number of distinct experts the first T tokens
    touch, for T = 1..T_max (`[T_max]`); with devices > 1, on the busiest of that many devices
    (expert e on device e // (E / devices))."""
    E = logits.shape[1]
    r = pymoe.route(logits, K, None, backend="auto")  # dropless: a token's choices are its own
    idx = r.expert_index.reshape(-1, T_max, K)  # [trials, T_max, K]
    trials = idx.shape[0]
    touched = np.zeros((trials, E), dtype=bool)
    out = np.zeros(T_max)
    rows = np.arange(trials)[:, None]
    for t in range(T_max):
        touched[rows, idx[:, t, :]] = True
        if devices == 1:
            out[t] = touched.sum(axis=1).mean()
        else:
            out[t] = touched.reshape(trials, devices, E // devices).sum(axis=2).max(axis=1).mean()
    return out


def expected_distinct(E: int, K: int, T: int) -> float:
    """Every expert equally likely: each token misses a given expert with probability 1 - K/E."""
    return E * (1 - (1 - K / E) ** T)


def decode(quick: bool) -> dict:
    w0 = sibling("00_why.py")
    models = [w0.mixtral_8x7b(), w0.deepseek_v3()]
    trials = 40 if quick else 200
    T_max = DECODE_T[-1]
    rng = np.random.default_rng(1)
    print("\n(c) Low-latency inference: a decode step routes T new tokens (one per sequence in "
          "the batch).")
    print(f"    Distinct experts they touch per MoE layer, measured with pymoe.route (dropless) "
          f"over {trials} steps of random logits")
    print("    (iid: every expert equally likely; skewed: expert e's logit shifted by "
          "-2.5 e / (E - 1), a popularity skew as trained routers have):")
    curves, rows = {}, {}
    for m in models:
        E, K = m.num_experts, m.k
        iid = distinct_experts(rng.normal(size=(trials * T_max, E)), K, T_max)
        skew = distinct_experts(skewed_logits(rng, trials * T_max, E), K, T_max)
        curves[m.name] = {"iid": iid, "skewed": skew}
        rows[m.name] = {T: (iid[T - 1], skew[T - 1], expected_distinct(E, K, T)) for T in DECODE_T}
    head = "".join(f"{m.name + f' (E={m.num_experts}, K={m.k})':>34s}" for m in models)
    sub = "".join(f"{'iid':>10s}{'formula':>10s}{'skewed':>14s}" for _ in models)
    print(f"    {'T':>3s}{head}\n    {'':>3s}{sub}")
    for T in DECODE_T:
        print(f"    {T:3d}" + "".join(f"{rows[m.name][T][0]:10.1f}{rows[m.name][T][2]:10.1f}"
                                       f"{rows[m.name][T][1]:14.1f}" for m in models))
    print("    (formula: E * (1 - (1 - K/E)^T), the iid expectation.)")

    print("\n    Weights read per decode step (bf16), iid router: the always-active weights plus "
          "every touched expert, in every MoE layer;")
    print("    a dense model of the same active size reads its active weights once per step, "
          "whatever T.")
    print(f"    {'':22s}" + "".join(f"{m.name:>34s}" for m in models))
    print(f"    {'T':>3s} {'':18s}" + "".join(f"{'per step':>12s}{'per token':>11s}"
                                               f"{'vs dense':>11s}" for _ in models))
    reads = {}
    for T in DECODE_T:
        line = f"    {T:3d} {'':18s}"
        for m in models:
            always = m.active() - m.moe_layers * m.k * m.expert_params()
            touched = rows[m.name][T][0]
            step = BF16 * (always + m.moe_layers * touched * m.expert_params())
            dense = BF16 * m.active()
            reads.setdefault(m.name, {})[T] = step
            line += f"{giga(step, 'B'):>12s}{giga(step / T, 'B'):>11s}{step / dense:10.2f}x"
        print(line)
    for m in models:
        T = T_max
        flops = 2 * T * m.k * m.expert_params()
        touched = rows[m.name][T][0]
        print(f"    {m.name}: at T={T} the experts do 2*T*K*3*D*H FLOPs on {touched:.0f} experts' "
              f"weights, {flops / (BF16 * touched * m.expert_params()):.1f} FLOPs per byte read "
              f"(a dense layer: {T}).")
    print("    A GPU needs a few hundred FLOPs per byte to be compute-bound (H100 SXM: 989 TFLOP/s "
          "bf16 over 3.35 TB/s = 295): decode is memory-bound, the MoE more so.")

    print("\n    The levers, measured the same way:")
    ds = models[1]
    fewer = {}
    for k in (8, 4, 2):
        fewer[k] = distinct_experts(rng.normal(size=(trials * 16, ds.num_experts)), k, 16)[-1]
    print(f"    Fewer experts per token ({ds.name}'s E={ds.num_experts}, T=16): K=8 touches "
          f"{fewer[8]:.0f} experts per layer, K=4 {fewer[4]:.0f}, K=2 {fewer[2]:.0f} (fewer "
          "parameters used per token: a trade against quality).")
    ep = {}
    for m, P in ((models[0], 8), (models[1], 64)):
        busiest = distinct_experts(rng.normal(size=(trials * T_max, m.num_experts)), m.k, T_max,
                                   devices=P)[-1]
        ep[m.name] = (P, busiest)
        print(f"    Expert parallelism ({m.name}'s experts over P={P} devices, "
              f"{m.num_experts // P} each): at T={T_max} the busiest device reads {busiest:.1f} "
              f"experts per layer, not {rows[m.name][T_max][0]:.1f}; the devices read side by "
              "side and the tokens travel ((b)'s all-to-all).")
    drops = {}
    m = models[0]
    for T in (1, 4, 16, 64):
        steps = [pymoe.route(lg, m.k, 1.25) for lg in rng.normal(size=(trials, T, m.num_experts))]
        drops[T] = (float(np.mean([r.dropped_fraction for r in steps])), steps[0].capacity)
    print(f"    Dropless at inference ({m.name}'s E={m.num_experts}, K={m.k}): with training's "
          "capacity factor 1.25 a decode step would drop "
          + ", ".join(f"{d:.1%} of its pairs at T={T} (C={c})" for T, (d, c) in drops.items())
          + ".")
    print("    pymoe's mixtral and deepseek-v3 presets route dropless (capacity_factor=None), as "
          "those models do: no token's output depends on who else is in the batch.")
    return {"curves": curves, "rows": rows, "experts": {m.name: m.num_experts for m in models},
            "reads": reads, "fewer_k": fewer, "expert_parallel": ep, "drops": drops}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and decode trials (CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    ap.add_argument("--epochs", type=int, default=None, help="default 20 (quick: 6)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds for the largest-logit check "
                    "of three runs (default 3, quick: 1)")
    args = ap.parse_args(argv)
    epochs = args.epochs or (6 if args.quick else 20)
    seeds = args.seeds or (1 if args.quick else 3)
    stab = instability(epochs, seeds)
    cost = costs(args.quick)
    dec = decode(args.quick)

    out = args.out
    paths = [f"{out}/03b_logits.png", f"{out}/03b_decode_experts.png"]
    figs = {}
    figs[paths[0]] = viz.curves(
        None, {name: res["epoch_max"] for name, res in stab["runs"].items()}, paths[0],
        logy=True, xlabel="epoch", ylabel="largest router logit in the epoch's batches",
        title="largest router logit per epoch: the z-loss pulls it back down (digits, seed 0)",
        legend="below")
    figs[paths[1]] = viz.curves(
        range(1, DECODE_T[-1] + 1),
        {f"{name}, {kind} router": v / dec["experts"][name]
         for name, c in dec["curves"].items() for kind, v in c.items()}, paths[1],
        xlabel="tokens per decode step T", ylabel="share of the E experts touched",
        reference=(1.0, "all E experts"),
        title="distinct experts a decode step touches (pymoe.route, random logits)")
    return {"stability": stab, "costs": cost, "decode": dec, "pictures": figs}


if __name__ == "__main__":
    main()
