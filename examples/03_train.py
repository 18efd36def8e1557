"""03: train a small MoE classifier from scratch with pymoe's forward/backward and NumPy Adam.

What it teaches:
- An MoE layer trains like any other layer: its backward gives the gradients of every parameter,
  the router's included (they flow through the gate values and the auxiliary losses).
- The load-balancing loss matters: with coefficient 0 the router is free to crowd tokens onto a
  few experts. Switch Transformer's 0.01 evens the load a little here; this small model needs
  0.1 for a clear effect (the task loss falls to ~0.01, so a 0.01 * aux term barely registers).
  The aux-loss-free alternative (DeepSeek-V3; Wang et al. 2024) leaves the loss alone and nudges
  a selection bias per expert after every step (pymoe.update_expert_bias).
- Watching the load: a pymoe.monitor.LoadTracker records every step's expert loads and gives the
  coefficient of variation, MaxVio (max load over mean load, minus 1) and dead experts per epoch;
  viz.load_heatmap shows the load per expert over the epochs.
- Experts specialise: per digit, the share of its test tokens whose first choice is each expert
  (the table and the class-by-expert heatmap), summed up as the mutual information between digit
  and first-choice expert (0 bits when the expert says nothing about the digit, at most log2 E),
  against the same measure with the digits shuffled (what a finite test set gives by chance).
- Accuracy against a dense model of the same *active* size (one FFN with K*H hidden units: the
  compute each token gets in the MoE), as mean and spread over several seeds (each seed a new
  train/test split and initialisation): with 449 test images one seed's differences of a point
  or so are within the noise.

Data: scikit-learn's digits (1797 8x8 images, shipped inside the package, no download) when
scikit-learn is installed, else a synthetic 10-class mixture. Model: x -> relu(x W_in + b_in)
= h -> h + MoE(h) -> logits, softmax cross-entropy. Evaluation routes dropless (capacity_factor
None) so that test accuracy does not depend on who else is in the batch.

Run:  python examples/03_train.py [--quick] [--out DIR] [--seeds N]
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

import pymoe
from pymoe import viz
from pymoe.monitor import LoadTracker

# ------------------------------------------------------------------------------ data

def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(x_train [N, 64], y_train [N], x_test, y_test, description), features standardised."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        name = "scikit-learn digits (1797 8x8 images, 10 classes)"
    except ImportError:
        x, y = synthetic_mixture(rng)
        name = "synthetic 10-class mixture (scikit-learn not installed)"
    order = rng.permutation(len(x))
    x, y = x[order].astype(np.float64), y[order].astype(np.int64)
    n_test = len(x) // 4
    mean, std = x[n_test:].mean(axis=0), x[n_test:].std(axis=0) + 1e-6
    x = (x - mean) / std
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test], name


def synthetic_mixture(rng: np.random.Generator, n: int = 2000, d: int = 64):
    """10 classes, each a mixture of 3 Gaussian blobs in 64-D: not linearly separable."""
    centers = rng.normal(size=(10, 3, d)) * 1.5
    y = rng.integers(0, 10, size=n)
    blob = rng.integers(0, 3, size=n)
    return centers[y, blob] + rng.normal(size=(n, d)), y


# ------------------------------------------------------------------------------ model

class Classifier:
    """x -> h = relu(x W_in + b_in) -> h + moe(h) -> h W_out + b_out, with a manual backward."""

    def __init__(self, d_in: int, d_model: int, n_classes: int, moe: pymoe.MoELayer,
                 seed: int, bias_rate: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.moe = moe
        self.bias_rate = bias_rate  # > 0: aux-loss-free balancing of moe.expert_bias
        self.params = {
            "w_in": rng.normal(0, np.sqrt(2 / d_in), (d_in, d_model)), "b_in": np.zeros(d_model),
            "w_out": rng.normal(0, np.sqrt(1 / d_model), (d_model, n_classes)),
            "b_out": np.zeros(n_classes),
        }

    def all_params(self) -> dict[str, np.ndarray]:
        return {**self.params, **{f"moe.{k}": v for k, v in self.moe.params.items()}}

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        p = self.params
        self.x = x
        self.pre = x @ p["w_in"] + p["b_in"]  # [B, D]
        self.h = np.maximum(self.pre, 0)  # [B, D]
        self.h1 = self.h + self.moe.forward(self.h, train=train)  # [B, D] residual around the MoE
        return self.h1 @ p["w_out"] + p["b_out"]  # [B, classes]

    def backward(self, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        g = {"w_out": self.h1.T @ dlogits, "b_out": dlogits.sum(axis=0)}
        dh1 = dlogits @ p["w_out"].T  # [B, D]
        dh = dh1 + self.moe.backward(dh1)  # the MoE's backward adds its aux/z-loss terms
        dpre = dh * (self.pre > 0)
        g["w_in"], g["b_in"] = self.x.T @ dpre, dpre.sum(axis=0)
        return {**g, **{f"moe.{k}": v for k, v in self.moe.grads.items()}}


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    p[np.arange(len(y)), y] -= 1
    return loss, p / len(y)


class Adam:
    """Adam (Kingma & Ba 2015) on a dict of arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], lr: float = 3e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, *betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            m_hat = self.m[k] / (1 - self.b1 ** self.t)
            v_hat = self.v[k] / (1 - self.b2 ** self.t)
            self.params[k] -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# ------------------------------------------------------------------------------ training

def progress(iterable, desc: str, total: int):
    """tqdm when installed; otherwise the plain iterable (epochs are printed by the caller)."""
    try:
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, leave=False)
    except ImportError:
        return iterable


def train(name: str, model: Classifier, data, epochs: int, batch: int, seed: int,
          quiet: bool = False) -> dict:
    x_tr, y_tr, x_te, y_te = data
    opt = Adam(model.all_params())
    rng = np.random.default_rng(seed)
    hist: dict = {"loss": [], "test_acc": [], "load_cv": []}
    tracker = LoadTracker(model.moe.num_experts)  # one entry per epoch: its batches add up
    bar = range(epochs) if quiet else progress(range(epochs), desc=name, total=epochs)
    for epoch in bar:
        order, losses = rng.permutation(len(x_tr)), []
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss, dlogits = cross_entropy(model.forward(x_tr[idx], train=True), y_tr[idx])
            opt.step(model.backward(dlogits))
            losses.append(loss)
            tracker.record(model.moe.routing, step=epoch)
            if model.bias_rate:  # aux-loss-free: under-loaded experts get easier to choose
                model.moe.expert_bias = pymoe.update_expert_bias(
                    model.moe.expert_bias, model.moe.routing.expert_load, model.bias_rate)
        hist["loss"].append(float(np.mean(losses)))
        hist["load_cv"].append(float(tracker.series("cv")[-1]))
        hist["test_acc"].append(evaluate(model, x_te, y_te)[0])
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", acc=f"{hist['test_acc'][-1]:.3f}")
        elif not quiet and (epoch % max(1, epochs // 5) == 0 or epoch == epochs - 1):
            print(f"  {name}: epoch {epoch + 1}/{epochs} loss {hist['loss'][-1]:.3f} "
                  f"test accuracy {hist['test_acc'][-1]:.3f}")
    hist["tracker"] = tracker
    return hist


def mutual_information(counts: np.ndarray) -> float:
    """I(class; expert) in bits from a [classes, E] table of counts: how much a token's expert
    tells about its class (0 when independent; at most min(log2 classes, log2 E))."""
    p = counts / counts.sum()
    independent = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / independent[nz])).sum())


def class_expert_counts(y: np.ndarray, expert: np.ndarray, n_classes: int, E: int) -> np.ndarray:
    """[classes, E]: how many tokens of each class have each expert as their first choice."""
    counts = np.zeros((n_classes, E))
    np.add.at(counts, (y, expert), 1)
    return counts


def shuffled_information(y: np.ndarray, expert: np.ndarray, E: int, rng: np.random.Generator,
                         n: int = 20) -> float:
    """Mean I(class; expert) with the classes shuffled n times: the chance level on len(y) tokens
    (a finite sample shows a little information even when there is none)."""
    return float(np.mean([mutual_information(class_expert_counts(rng.permutation(y), expert,
                                                                 10, E)) for _ in range(n)]))


def routed_like_training(model: Classifier, x: np.ndarray) -> pymoe.Routing:
    """The routing of x with the training capacity factor: loads, capacity and drops as a
    training batch of this size would see them (evaluation itself routes dropless)."""
    model.forward(x, train=False)
    return model.moe.routing


def evaluate(model: Classifier, x: np.ndarray, y: np.ndarray) -> tuple[float, pymoe.Routing]:
    """Test accuracy, routing dropless (no token is dropped at evaluation): the layer routes with
    its options (pymoe.route's keywords), here those of training with capacity_factor=None."""
    layer, options = model.moe, model.moe.options
    layer.options = dataclasses.replace(options, capacity_factor=None)
    try:
        acc = float((model.forward(x, train=False).argmax(axis=1) == y).mean())
        return acc, layer.routing
    finally:
        layer.options = options


BIAS_RATE = 1e-2  # the bias step u per training step; scores are softmax probabilities (~1/E)


def run(seed: int, epochs: int, quiet: bool = False) -> dict:
    """Train the four models on one seed's split and initialisation."""
    D, H, E, K, batch = 48, 32, 4, 2, 64
    x_tr, y_tr, x_te, y_te, data_name = load_data(seed)
    data = (x_tr, y_tr, x_te, y_te)
    if not quiet:
        print(f"Data: {data_name}; {len(x_tr)} train / {len(x_te)} test")
        print(f"Model: 64 -> {D} -> residual MoE (E={E} experts, K={K}, hidden {H} each, capacity "
              f"factor 1.25 in training) -> 10 classes; Adam, batch {batch}, {epochs} epochs")

    def moe_model(aux: float, bias_rate: float = 0.0) -> Classifier:
        layer = pymoe.MoELayer(D, H, E, K, 1.25, aux_loss_coef=aux, jitter_eps=0.01,
                               dtype=np.float64, seed=seed,
                               expert_bias=np.zeros(E) if bias_rate else None)
        return Classifier(64, D, 10, layer, seed, bias_rate)

    dense_layer = pymoe.MoELayer(D, K * H, 1, 1, None, aux_loss_coef=0.0, dtype=np.float64,
                                 seed=seed)  # E=1: the router always says 1, a plain FFN
    models = {"MoE, aux loss 0.1": moe_model(0.1), "MoE, aux loss 0.01": moe_model(0.01),
              "MoE, aux loss 0": moe_model(0.0),
              f"MoE, aux-free bias {BIAS_RATE:g}": moe_model(0.0, BIAS_RATE),
              f"dense FFN, hidden {K * H}": Classifier(64, D, 10, dense_layer, seed)}
    hist, results = {}, {}
    for name, model in models.items():
        hist[name] = train(name, model, data, epochs, batch, seed, quiet)
        acc, r = evaluate(model, x_te, y_te)
        results[name] = {"test_acc": acc, "routing": r,
                         "load_share": r.expert_load / r.expert_load.sum(),
                         "train_routing": routed_like_training(model, x_te)}
    return {"hist": hist, "results": results, "data": data_name, "y_test": y_te, "E": E}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and seeds (for CI)")
    ap.add_argument("--out", default="pymoe-out", help="where the pictures go (default pymoe-out)")
    ap.add_argument("--epochs", type=int, default=None, help="default 40 (quick: 12)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds for the accuracy spread "
                    "(default 5, quick: 2); the pictures show seed 0")
    args = ap.parse_args(argv)
    epochs = args.epochs or (12 if args.quick else 40)
    n_seeds = args.seeds or (2 if args.quick else 5)
    first = run(0, epochs)
    hist, results, data_name, E = first["hist"], first["results"], first["data"], first["E"]
    y_te = first["y_test"]

    print(f"\nSeed 0: {'model':28s} {'first loss':>10s} {'last loss':>10s} {'test acc':>9s} "
          f"{'load CV':>8s}  test-set share of assignments per expert")
    for name, h in hist.items():
        share = results[name]["load_share"]
        cv = f"{h['load_cv'][-1]:8.3f}" if len(share) > 1 else f"{'-':>8s}"
        print(f"        {name:28s} {h['loss'][0]:10.4f} {h['loss'][-1]:10.4f} "
              f"{results[name]['test_acc']:9.1%} {cv}  " + " ".join(f"{s:5.1%}" for s in share))

    runs = [first] + [run(seed, epochs, quiet=True) for seed in range(1, n_seeds)]
    accs = {name: [r["results"][name]["test_acc"] for r in runs] for name in hist}
    cvs = {name: [r["hist"][name]["load_cv"][-1] for r in runs] for name in hist
           if name.startswith("MoE")}
    print(f"\nOver {n_seeds} seeds (each a new split and initialisation), mean +- standard "
          "deviation:")
    print(f"  {'model':28s} {'test accuracy':>16s} {'final load CV':>16s}")
    for name in hist:
        cv = (f"{np.mean(cvs[name]):7.3f} +- {np.std(cvs[name]):.3f}" if name in cvs
              else f"{'-':>16s}")
        print(f"  {name:28s} {np.mean(accs[name]):8.1%} +- {np.std(accs[name]):4.1%} {cv}")
    aux_name, free_name = "MoE, aux loss 0.1", "MoE, aux loss 0"
    print("\nLoad-balancing loss: expert-load CV at the end of training (mean over seeds) "
          + ", ".join(f"{np.mean(cvs[k]):.3f} with coefficient {k.split()[-1]}"
                      for k in ("MoE, aux loss 0", "MoE, aux loss 0.01", "MoE, aux loss 0.1"))
          + " (0 = perfectly even).")
    bias_name = f"MoE, aux-free bias {BIAS_RATE:g}"
    print(f"Aux-loss-free balancing (no aux loss, expert bias stepped by {BIAS_RATE:g} after each "
          f"batch): final load CV {np.mean(cvs[bias_name]):.3f}.")

    print("\nLoad over training (seed 0, pymoe.monitor.LoadTracker; one entry per epoch, its "
          "batches summed): CV and MaxVio = max load / mean load - 1, at the first epoch -> the "
          "last, and the largest MaxVio of any epoch; drop rate of the last epoch")
    print(f"  {'model':28s} {'CV':>15s} {'MaxVio':>15s} {'max MaxVio':>10s} {'dead':>5s} "
          f"{'dropped':>8s}")
    for name in cvs:
        t = hist[name]["tracker"]
        cv, vio = t.series("cv"), t.series("max_vio")
        print(f"  {name:28s} {cv[0]:6.3f} -> {cv[-1]:5.3f} {vio[0]:6.3f} -> {vio[-1]:5.3f} "
              f"{vio.max():10.3f} {int(t.series('dead').max()):5d} "
              f"{t.series('drop_rate')[-1]:8.1%}")

    counts = class_expert_counts(y_te, results[aux_name]["routing"].expert_index[:, 0], 10, E)
    share = counts / counts.sum(axis=1, keepdims=True)
    print(f"\nSpecialisation (seed 0, {aux_name}, test set): the share of each digit's tokens "
          "whose first choice is each expert")
    print(f"  {'digit':>5s} {'tokens':>6s}  " + " ".join(f"{'expert ' + str(e):>8s}" for e in range(E)))
    for c in range(10):
        print(f"  {c:5d} {int(counts[c].sum()):6d}  " + " ".join(f"{v:8.1%}" for v in share[c]))
    top, seed0_info = share.max(axis=1).mean(), mutual_information(counts)
    print(f"  A digit's most used expert takes {top:.1%} of its first choices on average "
          f"({1 / E:.0%} if the router ignored the digit and loads were even); the mutual "
          f"information of this table: {seed0_info:.2f} bits.")
    rng = np.random.default_rng(0)
    info = {name: [mutual_information(class_expert_counts(
        r["y_test"], r["results"][name]["routing"].expert_index[:, 0], 10, E)) for r in runs]
        for name in cvs}
    chance = {name: float(np.mean([shuffled_information(
        r["y_test"], r["results"][name]["routing"].expert_index[:, 0], E, rng) for r in runs]))
        for name in cvs}
    print(f"\nMutual information between digit and first-choice expert, in bits (0: the expert says "
          f"nothing about the digit; at most log2 {E} = {np.log2(E):.0f}), mean +- standard deviation "
          f"over {n_seeds} seeds:")
    for name in cvs:
        print(f"  {name:28s} {np.mean(info[name]):.2f} +- {np.std(info[name]):.2f} bits   "
              f"(digits shuffled: {chance[name]:.2f})")

    out = args.out
    paths = [f"{out}/03_loss.png", f"{out}/03_balance.png", f"{out}/03_class_expert.png",
             f"{out}/03_expert_load.png", f"{out}/03_load_steps.png"]
    figs = {}
    figs[paths[0]] = viz.curves(
        None, {k: v["loss"] for k, v in hist.items()}, paths[0], logy=True, xlabel="epoch",
        ylabel="training cross-entropy", title=f"training loss ({data_name.split(' (')[0]}, seed 0)")
    figs[paths[1]] = viz.curves(
        None, {k: hist[k]["load_cv"] for k in hist if k.startswith("MoE")}, paths[1],
        xlabel="epoch", ylabel="coefficient of variation", reference=(0.0, "perfectly even"),
        title="expert load imbalance during training (std / mean of the loads, seed 0)")
    figs[paths[2]] = viz.class_expert_heatmap(
        counts, paths[2], title=f"first-choice expert of each class\n({aux_name}, test set)\n"
        f"mutual information {seed0_info:.2f} of {np.log2(E):.0f} bits")
    figs[paths[3]] = viz.expert_load_bars(
        {f"{k}\n(test set as one batch, capacity factor 1.25)": results[k]["train_routing"]
         for k in (aux_name, free_name)}, paths[3])
    figs[paths[4]] = viz.load_heatmap(
        {k: hist[k]["tracker"].loads() for k in (free_name, aux_name, bias_name)}, paths[4],
        steps=range(1, epochs + 1), ylabel="epoch",
        title="load per expert over the epochs (load / mean load; 1 = even; seed 0, training "
        "batches summed per epoch)")
    return {"history": hist, "results": results, "class_expert": counts, "data": data_name,
            "accuracy": accs, "load_cv": cvs, "information": info, "chance_information": chance,
            "top_share": float(top), "pictures": figs}


if __name__ == "__main__":
    main()
