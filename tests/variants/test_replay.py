"""Router replay: route(..., replay=), MoELayer.forward(x, replay=) and pymoe.replay.Recorder.

Replaying a routing's own selection must give the same bits (every preset, NumPy and C); replaying
a selection recorded under other logits is checked by hand on a literal case, against Megatron-Core
0.16.1's RouterReplay (REPLAY_FORWARD, on CPU) and its gradients against central differences.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pymoe
from helpers import FD_RTOL, assert_same_bits, backend_by_name, numerical_grad, rel_error
from pymoe.replay import Recorder

ARRAYS = ("router_logits", "probs", "expert_index", "token_order", "position", "gate_before_drop",
          "gate", "kept", "expert_load", "slot_owner", "expert_load_kept")
NAMES = pymoe.presets()


def assert_same_routing(a: pymoe.Routing, b: pymoe.Routing) -> None:
    for name in ARRAYS:
        assert_same_bits(getattr(a, name), getattr(b, name))
    assert a.capacity == b.capacity
    assert_same_bits(np.float64(a.aux_loss), np.float64(b.aux_loss))
    assert_same_bits(np.float64(a.z_loss), np.float64(b.z_loss))


def _k(name: str) -> int:
    return 1 if name in ("switch", "deepspeed-top1") else 2


# ------------------------------------------------------------------ replaying its own selection

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("cf", [1.0, None])
def test_own_selection_same_bits(name, backend, cf, request):
    """route(L, replay=route(L).expert_index) is route(L), bit for bit, for every preset: the
    replayed selection is the one top-K (or the group limit, the bias, Sinkhorn) would choose."""
    backend_by_name(backend, request)  # a skip with the reason where C is not built
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(96, 16)) - 0.3 * np.arange(16)).astype(np.float32)  # some drops
    bias = rng.normal(0, 0.2, 16) if name == "deepseek-v3" else None
    kw = dict(preset=name, backend=backend, expert_bias=bias, seed=7)
    r = pymoe.route(logits, _k(name), cf, **kw)
    assert_same_routing(pymoe.route(logits, _k(name), cf, replay=r.expert_index, **kw), r)


@pytest.mark.parametrize("kw", [dict(selection="sinkhorn"), dict(num_groups=4, topk_groups=2),
                                dict(second_expert_policy="threshold"), dict(k=4, normalize=True,
                                                                           drop_policy="probs")])
def test_own_selection_same_bits_variants(kw):
    logits = np.random.default_rng(4).normal(size=(40, 8))
    k = kw.pop("k", 2)
    r = pymoe.route(logits, k, 1.0, **kw)
    assert_same_routing(pymoe.route(logits, k, 1.0, replay=r.expert_index, **kw), r)


# ------------------------------------------------------------------ a literal case

def test_literal_replay():
    """2 tokens, 3 experts, K = 1, capacity 1: the live top-1 would send both tokens to expert 0
    (one dropped); the replayed selection [[2], [0]] sends token 0 to expert 2 with its live
    probability there, and nobody is dropped."""
    logits = np.log(np.array([[0.5, 0.2, 0.3], [0.6, 0.3, 0.1]], np.float64))
    live = pymoe.route(logits, 1, capacity=1)
    assert live.expert_index[:, 0].tolist() == [0, 0] and live.kept[:, 0].tolist() == [True, False]
    r = pymoe.route(logits, 1, capacity=1, replay=np.array([[2], [0]]))
    assert r.expert_index[:, 0].tolist() == [2, 0] and r.kept.all()
    np.testing.assert_allclose(r.gate[:, 0], [0.3, 0.6], rtol=1e-15)
    assert r.expert_load.tolist() == [1, 0, 1]
    # normalised top-2 gates are the live scores at the replayed experts, renormalised
    r2 = pymoe.route(logits, 2, None, normalize=True, replay=[[2, 1], [2, 0]])
    np.testing.assert_allclose(r2.gate, [[0.6, 0.4], [0.1 / 0.7, 0.6 / 0.7]], rtol=1e-14)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("bad, err, words", [
    (np.zeros((4, 3), np.int64), ValueError, "shape [T, K] = [4, 2]"),
    (np.zeros((4, 2), np.float32), TypeError, "integer array"),
    (np.zeros((4, 2), bool), TypeError, "integer array"),
    (np.array([[0, 1], [1, 2], [2, 8], [0, 3]]), ValueError, "[0, E) = [0, 8)"),
    (np.array([[0, 1], [1, 2], [-1, 2], [0, 3]]), ValueError, "token 2, choice 0"),
    (np.array([[0, 1], [1, 1], [2, 3], [0, 3]]), ValueError, "token 1 lists an expert twice"),
    ("0, 1", TypeError, "replay: expected an int array"),
])
def test_bad_replay(bad, err, words):
    logits = np.zeros((4, 8))
    with pytest.raises(err, match="^replay: ") as info:
        pymoe.route(logits, 2, replay=bad)
    assert words in str(info.value)
    layer = pymoe.MoELayer(3, 4, 8, 2, seed=0)
    with pytest.raises(err, match="^replay: "):
        layer.forward(np.ones((4, 3)), replay=bad)


def test_replay_refused_where_there_is_no_selection():
    with pytest.raises(ValueError, match="^replay: expert choice"):
        pymoe.route(np.zeros((4, 4)), 4, 1.0, selection="experts", replay=np.tile(np.arange(4), (4, 1)))
    layer = pymoe.MoELayer(3, 4, 4, 2, token_groups=2, seed=0)
    with pytest.raises(ValueError, match="^replay: .*token_groups = 2"):
        layer.forward(np.ones((4, 3)), replay=np.zeros((4, 2), np.int64) + [0, 1])
    with Recorder().record(), pytest.raises(ValueError, match="^replay: "):
        layer.forward(np.ones((4, 3)))


# ------------------------------------------------------------------ gradients

def _logits_pair(T: int, E: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The live float64 logits and a selection recorded under other logits (a perturbed copy, as a
    rollout engine's would be): many tokens' replayed experts are not their live top-K."""
    rng = np.random.default_rng(seed)
    live = rng.normal(size=(T, E))
    return live, live + rng.normal(0, 0.7, size=(T, E))


@pytest.mark.parametrize("name", ["megatron", "mixtral", "deepseek-v3", "deepspeed-top2", "switch",
                                  "llama4", "nllb-moe", "flaxformer"])
@pytest.mark.parametrize("cf", [1.0, None])
def test_gradients_under_replay(name, cf):
    """route_backward of sum(gate * dgate) + aux + z-loss under a foreign replayed selection
    against central differences in float64 (the selection a constant, the gates live)."""
    T, E, k = 24, 16, _k(name)
    logits, other = _logits_pair(T, E, 11)
    kw = dict(preset=name, seed=5)
    sel = pymoe.route(other, k, cf, **kw).expert_index
    assert not np.array_equal(np.sort(sel, axis=1),
                              np.sort(pymoe.route(logits, k, cf, **kw).expert_index, axis=1))
    dgate = np.random.default_rng(2).normal(size=(T, k))
    r = pymoe.route(logits, k, cf, replay=sel, **kw)

    def objective() -> float:
        q = pymoe.route(logits, k, cf, replay=sel, **kw)
        np.testing.assert_array_equal(q.kept, r.kept)  # no drop decision moves within the step
        return float(np.sum(q.gate * dgate) + 0.3 * q.aux_loss + 0.2 * q.z_loss)

    analytic = pymoe.route_backward(r, dgate, aux_loss_coef=0.3, z_loss_coef=0.2)
    assert rel_error(analytic, numerical_grad(objective, logits)) <= FD_RTOL


@pytest.mark.parametrize("kw", [dict(), dict(preset="deepseek-v3", num_shared_experts=0, num_groups=4,
                                     topk_groups=2),
                                dict(activation="swiglu", normalize=True, z_loss_coef=0.1)])
def test_layer_gradients_under_replay(kw):
    """MoELayer.backward under forward(x, replay=sel), sel recorded by another layer (other router
    weights), against central differences for x and every parameter, in float64."""
    E, k = 8, 2
    layer = pymoe.MoELayer(5, 6, E, k, 1.0, dtype=np.float64, seed=1, **kw)
    other = pymoe.MoELayer(5, 6, E, k, 1.0, dtype=np.float64, seed=2, **kw)
    x = np.random.default_rng(0).normal(size=(12, 5))
    other.forward(x)
    sel = np.array(other.routing.expert_index)
    layer.forward(x)
    assert not np.array_equal(layer.routing.expert_index, sel)
    dy = np.random.default_rng(1).normal(size=x.shape)

    def objective() -> float:
        return float(np.sum(layer.forward(x, replay=sel) * dy)) + layer.loss_terms()

    objective()
    base = layer.routing
    np.testing.assert_array_equal(base.expert_index, sel)
    dx = layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    assert rel_error(dx, numerical_grad(objective, x)) <= FD_RTOL
    for name, p in layer.params.items():
        assert rel_error(grads[name], numerical_grad(objective, p)) <= FD_RTOL, name
    objective()
    np.testing.assert_array_equal(layer.routing.position, base.position)


# ------------------------------------------------------------------ the recorder

def _model(E: int = 6, **kw) -> list[pymoe.MoELayer]:
    return [pymoe.MoELayer(8, 16, E, 2, 1.0, seed=i, **kw) for i in range(3)]


def _run(layers, x):
    for layer in layers:
        x = x + layer(x)
    return x


def test_recorder_records_and_replays_every_layer():
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    layers = _model()
    rec = Recorder()
    with rec.record():
        y = _run(layers, x)
        _run(layers[:1], x)  # a second forward of layer 0
    assert rec.layers == layers
    assert [len(rec.selections(la)) for la in layers] == [2, 1, 1]
    for la in layers[1:]:
        np.testing.assert_array_equal(rec.selections(la)[0], la.routing.expert_index)
    with rec.replay():
        assert_same_bits(_run(layers, x), y)
        _run(layers[:1], x)
        with pytest.raises(ValueError, match="^replay: this layer was recorded 2 time"):
            layers[0](x)
        with pytest.raises(ValueError, match="^replay: the Recorder holds no selection"):
            pymoe.MoELayer(8, 16, 6, 2, seed=9)(x)
    y_live = _run(layers, x)  # outside the block: live routing again
    assert_same_bits(y_live, y)


def test_recorder_replays_a_bf16_rollout_into_float32_training():
    """The RL case: record with a bf16 router (the rollout), replay into the float32 layers (the
    trainer): every layer then routes as the rollout did, and some differ from float32's own."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    train = _model(E=16)
    for la in train:
        la.params["w_router"] *= 30  # logits of std ~ 5: some tokens flip in bf16
    rollout = [pymoe.MoELayer(8, 16, 16, 2, 1.0, seed=i, router_dtype="bfloat16")
               for i in range(3)]
    for a, b in zip(rollout, train):
        for n in a.params:
            a.params[n][...] = b.params[n]
    rec = Recorder()
    with rec.record():
        _run(rollout, x)
    replayer = Recorder.from_selections(train, [rec.selections(la) for la in rollout])
    with replayer.replay():
        _run(train, x)
    replayed = [np.array(la.routing.expert_index) for la in train]
    _run(train, x)
    own = [np.array(la.routing.expert_index) for la in train]
    for la, got in zip(rollout, replayed):
        np.testing.assert_array_equal(got, rec.selections(la)[0])
    assert any(not np.array_equal(a, b) for a, b in zip(replayed, own))


def test_recorder_misuse():
    rec = Recorder()
    with rec.record():
        with pytest.raises(RuntimeError, match="already inside its record"), rec.replay():
            pass
    with pytest.raises(ValueError, match="^selections: expected one entry per layer"):
        Recorder.from_selections(_model(), [np.zeros((2, 2), int)])
    with pytest.raises(KeyError):
        rec.selections(_model()[0])


# ------------------------------------------------------------------ Megatron's REPLAY_FORWARD

def _megatron():
    from helpers import import_optional

    torch = import_optional("torch", "crosscheck", module_level=False)
    moe_utils = import_optional("megatron.core.transformer.moe.moe_utils", "crosscheck",
                                module_level=False)
    rr = import_optional("megatron.core.transformer.moe.router_replay", "crosscheck",
                         module_level=False)
    return torch, moe_utils, rr


def megatron_replay(logits: np.ndarray, k: int, capacity_factor: float | None, target: np.ndarray,
                    **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Megatron-Core's topk_routing_with_score_function under a RouterReplay set to REPLAY_FORWARD
    with `target` (then apply_router_token_dropping with drop policy "probs"): (routing_map [T, E],
    kept [T, E], gate [T, E] float64)."""
    torch, moe_utils, rr = _megatron()
    replay = rr.RouterReplay()
    try:
        replay.set_target_indices(torch.from_numpy(target.astype(np.int64)))
        replay.set_router_replay_action(rr.RouterReplayAction.REPLAY_FORWARD)
        x = torch.from_numpy(logits)
        bias = kw.pop("expert_bias", None)
        probs, routing_map = moe_utils.topk_routing_with_score_function(
            x, k, router_replay=replay,
            expert_bias=None if bias is None else torch.from_numpy(bias.astype(np.float32)), **kw)
        chosen = routing_map.numpy().copy()
        if capacity_factor is not None:
            probs, routing_map = moe_utils.apply_router_token_dropping(
                probs, routing_map, k, capacity_factor, drop_policy="probs")
        kept = routing_map.numpy()
        return chosen, kept, np.where(kept, probs.double().numpy(), 0.0)
    finally:
        rr.RouterReplay.clear_global_router_replay_instances()


def _dense(r: pymoe.Routing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    T, E = r.probs.shape
    chosen, kept, gate = np.zeros((T, E), bool), np.zeros((T, E), bool), np.zeros((T, E))
    rows = np.arange(T)[:, None]
    chosen[rows, r.expert_index] = True
    kept[rows, r.expert_index] = r.kept
    gate[rows, r.expert_index] = r.gate
    return chosen, kept, gate


def near_ties(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """float32 logits whose K-th and (K+1)-th largest differ by under bf16's spacing in every
    other token (relative gaps of 2^-12 .. 2^-8): rounding to bf16 reverses or ties many of them."""
    out = logits.copy()
    for t in range(0, len(out), 2):
        order = np.argsort(-out[t], kind="stable")
        a, b = order[k - 1], order[k]
        out[t, b] = out[t, a] * (1 - np.sign(out[t, a]) * 2.0 ** -rng.uniform(8, 12))
    return out.astype(np.float32)


MEGATRON_CASES = {  # name -> (pymoe preset, K, E, Megatron's keywords); pymoe drops by "probs"
    "softmax top-k": ("megatron", 4, 8, {}),
    "sigmoid, groups, bias, scaling": ("deepseek-v3", 8, 32, dict(
        score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)),
}
MEGATRON_TOL = 2e-6  # float32 gates: max |ours - theirs| / max(1, |theirs|)


@pytest.mark.parametrize("case", list(MEGATRON_CASES))
@pytest.mark.parametrize("cf", [None, 1.0, 0.5])
@pytest.mark.parametrize("recorded", ["perturbed", "bfloat16"])
def test_megatron_replay_forward(case, cf, recorded):
    """A selection recorded under other logits (perturbed ones, or the same logits rounded to
    bf16), replayed into float32 logits: the experts, the kept pairs (capacity factor 1.0 and 0.5
    drop by probability) are Megatron's exactly, the gates within MEGATRON_TOL."""
    name, K, E, mkw = MEGATRON_CASES[case]
    T = 64
    rng = np.random.default_rng(8)
    logits = near_ties(rng.normal(size=(T, E)), K, rng)
    bias = rng.normal(0, 0.3, E).astype(np.float32) if name == "deepseek-v3" else None
    if recorded == "perturbed":
        source, src_dtype = (logits + rng.normal(0, 0.5, (T, E))).astype(np.float32), None
    else:
        source, src_dtype = logits, "bfloat16"
    sel = pymoe.route(source, K, None, preset=name, expert_bias=bias,
                      router_dtype=src_dtype).expert_index
    live = pymoe.route(logits, K, None, preset=name, expert_bias=bias).expert_index
    if recorded == "perturbed" or name == "megatron":  # (the bias decides deepseek-v3's ties)
        assert not np.array_equal(np.sort(sel, 1), np.sort(live, 1))  # the replay changes some
    mine = pymoe.route(logits, K, cf, preset=name, expert_bias=bias, replay=sel, drop_policy="probs")
    chosen, kept, gate = megatron_replay(logits, K, cf, sel, expert_bias=bias, **mkw)
    ours = _dense(mine)
    np.testing.assert_array_equal(ours[0], chosen)
    np.testing.assert_array_equal(ours[1], kept)
    d = float(np.max(np.abs(ours[2] - gate) / np.maximum(1.0, np.abs(gate))))
    assert d <= MEGATRON_TOL, f"gates differ by {d:.3g}"


def test_megatron_replay_of_its_own_selection_is_its_routing():
    """Megatron's REPLAY_FORWARD of its own top-K equals its plain routing, as pymoe's does."""
    torch, moe_utils, _ = _megatron()
    logits = np.random.default_rng(9).normal(size=(32, 8)).astype(np.float32)
    _, own = torch.topk(torch.from_numpy(logits), 2, dim=1)
    chosen, kept, gate = megatron_replay(logits, 2, None, own.numpy())
    plain = pymoe.route(logits, 2, None, preset="megatron")
    np.testing.assert_array_equal(_dense(plain)[0], chosen)
    assert np.max(np.abs(_dense(plain)[2] - gate)) <= MEGATRON_TOL


def test_options_untouched_by_replay():
    """replay is a per-call argument, not a routing keyword: the Routing's options are those of
    the same call without it."""
    logits = np.random.default_rng(0).normal(size=(8, 4))
    r = pymoe.route(logits, 2, replay=[[0, 1]] * 8)
    assert dataclasses.asdict(r.options) == dataclasses.asdict(pymoe.route(logits, 2).options)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_layer_own_selection_same_bits(name, backend, request):
    """MoELayer(preset=name).forward(x, replay=its own expert_index) gives the same y, routing and
    backward bits as the plain forward (NumPy and C). A second layer built the same way replays,
    so that random priorities draw the same permutation."""
    backend_by_name(backend, request)
    k = pymoe.preset(name).k or 4
    kw = dict(num_groups=4, topk_groups=2) if name in ("deepseek-v3", "deepseek-v2") else {}

    def build() -> pymoe.MoELayer:
        return pymoe.MoELayer(8, 12, 16, k, 1.0, preset=name, backend=backend, seed=4, **kw)

    layer = build()
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    y = layer.forward(x)
    r, dx = layer.routing, layer.backward(dy)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    layer = build()
    assert_same_bits(layer.forward(x, replay=r.expert_index), y)
    assert_same_routing(layer.routing, r)
    assert_same_bits(layer.backward(dy), dx)
    for n, g in layer.grads.items():
        assert_same_bits(g, grads[n])
