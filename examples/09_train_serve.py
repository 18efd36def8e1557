"""09: train and serve route the same: padding masks, router precision, router replay, global balance.

What it teaches: four silent mismatches between what training computes and what serving does, each
made visible on small layers.
1. Padding: a batch of three sequences padded to one length. Without a mask the padding rows take
   capacity and count in the aux loss and the expert loads; with `token_mask` they do not (pymoe's
   default: padding is absent; Megatron routes it, `padding="routed"`).
2. Router precision: the same router logits in bfloat16 choose other experts for a few percent of
   the tokens, all of them tokens whose K-th and (K+1)-th scores are nearly tied (`flip_report`).
3. Router replay: a two-layer model routed with a bfloat16 router (the rollout) and trained with a
   float32 one chooses other experts; replaying the rollout's selections (`pymoe.replay.Recorder`)
   makes training route exactly as the rollout did, while the gates (and their gradient) are the
   float32 pass's own.
4. Global-batch balance: the aux loss over one micro-batch against the one over the whole batch
   (`pymoe.losses.GlobalLoadBalance`).
Picture: the top-K margins, flipped tokens marked.

Run:  python examples/09_train_serve.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import pymoe
from pymoe import viz
from pymoe.losses import GlobalLoadBalance
from pymoe.monitor import LoadTracker
from pymoe.precision import flip_report
from pymoe.replay import Recorder

D, H, E, K = 16, 32, 8, 2


def padding(seed: int = 0) -> dict:
    """Three sequences of 16, 10 and 5 real tokens, padded to 16 (the padding rows are zeros, as
    embeddings of a pad token often are)."""
    print("\n== 1. padding")
    rng = np.random.default_rng(seed)
    lengths = [16, 10, 5]
    mask = np.zeros((3, 16), bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    x = rng.normal(size=(3, 16, D)) * mask[..., None]
    layer = pymoe.MoELayer(D, H, E, K, 1.0, dtype=np.float64, seed=seed)
    tracker = LoadTracker(E)
    y_plain = layer.forward(x)
    plain = tracker.record(layer.routing, step=0, layer="no mask")
    aux_plain = layer.aux_loss
    y = layer.forward(x, mask)
    masked = tracker.record(layer.routing, step=0, layer="token_mask")
    print(f"  {mask.size} rows, {mask.sum()} real tokens, capacity {layer.routing.capacity}")
    print(f"  without a mask: aux loss {aux_plain:.4f}, expert loads {plain.load.tolist()} "
          f"(the zero rows all pick the same experts: CV {plain.cv:.2f})")
    print(f"  with token_mask: aux loss {layer.aux_loss:.4f}, expert loads "
          f"{masked.load.tolist()}, CV {masked.cv:.2f}, {masked.padding} padding rows left out")
    dx = layer.backward(np.ones_like(y))
    alone = layer.forward(x[mask])
    gap = float(np.max(np.abs(y[mask] - alone)))
    print(f"  the real rows equal the layer run on them alone: max difference {gap:.1e}; "
          f"padding rows of y: {np.count_nonzero(y[~mask])} non-zero")
    print(f"  backward: dx on padding rows {np.count_nonzero(dx[~mask])} non-zero")
    return {"aux_plain": aux_plain, "aux_masked": layer.aux_loss, "gap": gap,
            "padding_dx": int(np.count_nonzero(dx[~mask])), "y_plain": y_plain}


def precision(T: int, seed: int = 0) -> dict:
    """A router at a realistic scale: D = 1024, E = 64, K = 8, logits of standard deviation 1."""
    print("\n== 2. router precision")
    rng = np.random.default_rng(seed)
    Dr, Er, Kr = 1024, 64, 8
    x = rng.standard_normal((T, Dr), dtype=np.float32)
    w = rng.standard_normal((Dr, Er), dtype=np.float32) / np.float32(np.sqrt(Dr))
    logits = x @ w  # [T, E]
    report = flip_report(logits, Kr, "bfloat16", capacity_factor=None, preset="mixtral")
    print("  " + str(report).replace("\n", "\n  "))
    return {"report": report}


def replay(seed: int = 0) -> dict:
    """Rollout: a two-layer model whose routers compute in bfloat16. Training: the same weights
    with float32 routers, first routing live, then replaying the rollout's selections."""
    print("\n== 3. router replay")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, D))

    def model(router_dtype: str | None) -> list[pymoe.MoELayer]:
        # router weights of std 1 (logits of std ~4): bf16's spacing there is ~2e-2
        layers = [pymoe.MoELayer(D, H, E, K, None, preset="mixtral", dtype=np.float32,
                                 seed=seed + i, router_dtype=router_dtype) for i in range(2)]
        for layer in layers:
            layer.params["w_router"] = layer.params["w_router"] * np.float32(np.sqrt(10 * D))
        return layers

    def run(layers: list[pymoe.MoELayer]) -> np.ndarray:
        h = x
        for layer in layers:
            h = h + layer.forward(h)
        return h

    rollout, train = model("bfloat16"), model(None)
    rec = Recorder()
    with rec.record():
        run(rollout)
    recorded = [rec.selections(layer)[0] for layer in rollout]
    run(train)
    live = [int(np.any(np.sort(t.routing.expert_index, 1) != np.sort(s, 1), axis=1).sum())
            for t, s in zip(train, recorded)]
    # the recorder keys selections by layer object: hand the rollout's to the training layers
    rec = Recorder.from_selections(train, [[s] for s in recorded])
    with rec.replay():
        y = run(train)
    forced = [int(np.any(t.routing.expert_index != s, axis=1).sum())
              for t, s in zip(train, recorded)]
    for layer in reversed(train):  # backward through the replayed pass, last layer first
        layer.backward(np.ones_like(y))
    grad = float(np.abs(train[0].grads["w_router"]).max())
    print(f"  float32 training pass routing live: {live[0]} and {live[1]} of {x.shape[0]} tokens "
          "choose other experts than the bfloat16 rollout (layers 1, 2)")
    print(f"  replaying the rollout's selections: {forced[0]} and {forced[1]} differ; the gates "
          f"are float32's own, and w_router still gets a gradient (max |g| {grad:.2e})")
    return {"live": live, "replayed": forced, "router_grad": grad}


def global_balance(seed: int = 0) -> dict:
    """Four micro-batches, each leaning on other experts, the whole batch balanced."""
    print("\n== 4. global-batch balance")
    rng = np.random.default_rng(seed)
    g = GlobalLoadBalance(E, K)
    local, glob = [], []
    for i in range(4):
        logits = rng.normal(size=(64, E))
        logits[:, 2 * i:2 * i + 2] += 2.0  # micro-batch i prefers experts 2i and 2i+1
        r = pymoe.route(logits, K, None)
        g.update(r)
        local.append(r.aux_loss)
        glob.append(g.loss(r))
    print("  aux loss per micro-batch: " + ", ".join(f"{v:.3f}" for v in local))
    print("  global-batch aux loss (counts over the micro-batches so far): "
          + ", ".join(f"{v:.3f}" for v in glob))
    print("  each micro-batch is skewed, the batch is not: the global loss falls towards 1 as "
          "the micro-batches add up")
    return {"local": local, "global": glob}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller precision sweep")
    ap.add_argument("--out", default="pymoe-out", help="where the picture goes (default pymoe-out)")
    args = ap.parse_args(argv)
    res = {"padding": padding(), "precision": precision(2048 if args.quick else 8192),
           "replay": replay(), "global": global_balance()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "09_flip_margins.png")
    res["pictures"] = {path: viz.flip_margins(res["precision"]["report"], path)}
    print(f"\npicture: {path}")
    return res


if __name__ == "__main__":
    main()
