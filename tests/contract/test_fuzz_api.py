"""Property-based fuzzing of route, route_backward and MoELayer forward/backward (NumPy and C
backends, both formulations) against the contract in fuzz.py: a named ValueError/TypeError, or the
bits the same call gives on contiguous native-order copies of its arrays."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from unittest import mock

import numpy as np
import pytest

import fuzz
import pymoe
from helpers import backend_by_name
from props import given, settings, st

FUZZ = settings(max_examples=fuzz.EXAMPLES, deadline=None)
ROUTE_ARGS = ("router_logits", "k", "capacity_factor", "min_capacity", "normalize", "priority")
ROUTING_FIELDS = ("router_logits", "probs", "expert_index", "token_order", "position",
                  "gate_before_drop", "gate", "kept", "capacity", "expert_load", "aux_loss",
                  "z_loss", "slot_owner", "normalize", "priority")


def _fields(r: pymoe.Routing) -> tuple:
    return tuple(getattr(r, f) for f in ROUTING_FIELDS)


def _route_kwargs(data, E: int) -> dict:
    kw = {"k": data.draw(st.integers(1, E), label="k"),
          "capacity_factor": data.draw(st.sampled_from([1.25, 0.5, 2.0, 1.1, None]), label="cf"),
          "min_capacity": data.draw(st.integers(0, 3), label="min_capacity"),
          "normalize": data.draw(st.booleans(), label="normalize"),
          "priority": data.draw(st.sampled_from(["choice", "score"]), label="priority")}
    if fuzz.maybe(data, "spoil k"):
        kw["k"] = fuzz.bad_int(data, "k", kw["k"], 1, E)
    if fuzz.maybe(data, "spoil capacity_factor"):
        kw["capacity_factor"] = data.draw(st.sampled_from([0.0, -1.0, np.nan, np.inf, "1", True]),
                                          label="bad cf")
    if fuzz.maybe(data, "spoil min_capacity"):
        kw["min_capacity"] = fuzz.bad_int(data, "min_capacity", 0, 0, None)
    if fuzz.maybe(data, "spoil normalize"):
        kw["normalize"] = data.draw(st.sampled_from([1, None, "yes"]), label="bad normalize")
    if fuzz.maybe(data, "spoil priority"):
        kw["priority"] = data.draw(st.sampled_from(["Score", 1, None]), label="bad priority")
    return kw


def _logits(data, T: int, E: int) -> np.ndarray:
    """Logits with deliberate ties (equal values decide by index) and, rarely, NaN/inf."""
    a = fuzz.float_values(data, (T, E), fuzz.float_dtype(data, "logits dtype"),
                          nonfinite=fuzz.maybe(data, "nonfinite logits"))
    if a.dtype.kind == "f" and a.size and data.draw(st.booleans(), label="ties"):
        a = np.round(a * 2) / 2  # many exact ties, like the example
    if fuzz.maybe(data, "spoil router_logits"):
        a = fuzz.spoil_array(data, a, "router_logits")
    return a


@FUZZ
@given(data=st.data())
def test_fuzz_route(data):
    T, E = data.draw(st.integers(0, 7), label="T"), data.draw(st.integers(1, 6), label="E")
    logits = _logits(data, T, E)
    kw = _route_kwargs(data, E)
    shown = fuzz.present(data, logits, "router_logits")
    fuzz.check("route", ROUTE_ARGS,
               lambda: _fields(pymoe.route(shown, **kw)),
               lambda: _fields(pymoe.route(fuzz.canonical(shown), **kw)))


@FUZZ
@given(data=st.data())
def test_fuzz_route_backward(data):
    T, E = data.draw(st.integers(0, 7), label="T"), data.draw(st.integers(1, 6), label="E")
    logits = fuzz.float_values(data, (T, E), fuzz.float_dtype(data, "logits dtype", bad=False))
    K = data.draw(st.integers(1, E), label="k")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize with k=1
        r = pymoe.route(logits, K, 1.0, normalize=data.draw(st.booleans(), label="normalize"))
    dgate = fuzz.float_values(data, (T, K), fuzz.float_dtype(data, "dgate dtype"),
                              nonfinite=fuzz.maybe(data, "nonfinite dgate"))
    if fuzz.maybe(data, "spoil dgate"):
        dgate = fuzz.spoil_array(data, dgate, "dgate")
    coefs = [data.draw(st.sampled_from([0.0, 0.01, 1.0]), label=n) for n in ("aux", "z")]
    if fuzz.maybe(data, "spoil a coefficient"):
        coefs[data.draw(st.integers(0, 1))] = data.draw(st.sampled_from([-1.0, np.nan, "0.1"]))
    routing = r
    if fuzz.maybe(data, "rebind a routing field") and T:
        routing = pymoe.route(logits, K, 1.0)
        routing.expert_index = np.full((T, K), E)  # out of range: must be caught, not indexed
    shown = fuzz.present(data, dgate, "dgate")
    names = ("routing", "dgate", "aux_loss_coef", "z_loss_coef")
    fuzz.check("route_backward", names,
               lambda: pymoe.route_backward(routing, shown, *coefs),
               lambda: pymoe.route_backward(routing, fuzz.canonical(shown), *coefs))


LAYER_ARGS = ("x", "dy", "params", "d_model", "d_hidden", "num_experts", "k", "capacity_factor",
              "min_capacity", "normalize", "priority", "backend", "dtype", "formulation")


@pytest.mark.parametrize("backend", ["numpy", "c"])
@FUZZ
@given(data=st.data())
def test_fuzz_layer(backend, data, request):
    backend_by_name(backend, request)  # "c": skips or fails where the C core is not built
    D, H = data.draw(st.integers(1, 5), label="D"), data.draw(st.integers(1, 4), label="H")
    E = data.draw(st.integers(1, 4), label="E")
    T = data.draw(st.integers(1, 6), label="T")
    cfg = dict(d_model=D, d_hidden=H, num_experts=E, backend=backend, seed=1,
               dtype=data.draw(st.sampled_from(["float32", "float64", "float16"]), label="dtype"),
               formulation=data.draw(st.sampled_from(["indexed", "dense"]), label="formulation"),
               **{n: v for n, v in _route_kwargs(data, E).items() if n != "k"},
               k=data.draw(st.integers(1, E), label="k"))
    if fuzz.maybe(data, "spoil dtype"):
        cfg["dtype"] = data.draw(st.sampled_from([None, "int32", "f2x"]), label="bad dtype")
    x = fuzz.float_values(data, (T, D), fuzz.float_dtype(data, "x dtype"),
                          nonfinite=fuzz.maybe(data, "nonfinite x"))
    if fuzz.maybe(data, "spoil x"):
        x = fuzz.spoil_array(data, x, "x")
    dy = fuzz.float_values(data, x.shape, fuzz.float_dtype(data, "dy dtype"),
                           nonfinite=fuzz.maybe(data, "nonfinite dy"))
    if fuzz.maybe(data, "spoil dy"):
        dy = fuzz.spoil_array(data, dy, "dy")
    bad_param = None
    if fuzz.maybe(data, "spoil a parameter"):
        bad_param = data.draw(st.sampled_from(["w_router", "b_router", "w1", "b1", "w2", "b2"]))
    xs, dys = fuzz.present(data, x, "x"), fuzz.present(data, dy, "dy")

    def make():
        layer = pymoe.MoELayer(**cfg)
        if bad_param is not None:
            layer.params[bad_param].flat[-1] = np.nan
        return layer

    def step(x_in, dy_in):
        layer = make()
        y = layer.forward(x_in)
        dx = layer.backward(dy_in)
        return (y, dx, *(layer.grads[n] for n in sorted(layer.grads)))

    fuzz.check(f"MoELayer[{backend}]", LAYER_ARGS, lambda: step(xs, dys),
               lambda: step(fuzz.canonical(xs), fuzz.canonical(dys)))


# ------------------------------------------------ the newer surface (issue 27's second probe)
VARIANT_VALUES = {  # keyword -> (good values, bad values)
    "score": (["softmax", "sigmoid"], ["Sigmoid", 1]),
    "priority": (["choice", "score", "token", "random"], ["rand", None]),
    "scaling_factor": ([None, 2.5, 0.5], [0.0, -1.0, np.inf, "2"]),
    "drop_policy": (["position", "probs"], ["prob", 0]),
    "renormalize_after_drop": ([False, True], [1, "no"]),
    "selection": (["tokens", "tokens", "experts", "sinkhorn"], ["expert", None]),
    "capacity_rule": (["k_ceil", "floor", "round", "tutel", "k_floor"], ["ceil", 3]),
    "load_balancing": (["switch", "first_choice", "k_scaled"], ["Switch", None]),
    "second_expert_policy": (["all", "random", "threshold", "none"], ["sample", 2]),
    "second_expert_threshold": ([0.2, 0.05], [-0.1, np.nan]),
    "sinkhorn_iterations": ([1, 3], [0, 2.5]),
    "capacity": ([None, 1, 3], [-1, 1.5, True]),
}
VARIANT_NAMES = ("router_logits", "expert_bias", "seed", "k", "capacity_factor", "min_capacity",
                 "normalize", "num_groups", "topk_groups", "group_score_k", "sequence_length",
                 "preset", "backend", *VARIANT_VALUES)


def _variant_kwargs(data, E: int, T: int) -> dict:
    kw: dict = {"k": data.draw(st.integers(1, E), label="k"),
                "capacity_factor": data.draw(st.sampled_from([1.0, 0.5, 2.0, None]), label="cf"),
                "normalize": data.draw(st.booleans(), label="normalize")}
    for name in data.draw(st.lists(st.sampled_from(sorted(VARIANT_VALUES)), max_size=4,
                                   unique=True), label="keywords"):
        good, bad = VARIANT_VALUES[name]
        kw[name] = data.draw(st.sampled_from(bad if fuzz.maybe(data, f"spoil {name}") else good),
                             label=name)
    if data.draw(st.booleans(), label="grouped"):
        kw["num_groups"] = data.draw(st.sampled_from([1, 2, 3, 4]), label="num_groups")
        kw["topk_groups"] = data.draw(st.integers(0, 3), label="topk_groups")
        if data.draw(st.booleans(), label="group_score_k given"):
            kw["group_score_k"] = data.draw(st.integers(0, 3), label="group_score_k")
    if data.draw(st.integers(0, 9), label="sequence loss") == 0:
        kw["load_balancing"] = "sequence"
        kw["sequence_length"] = data.draw(st.integers(0, max(T, 1)), label="sequence_length")
    if kw.get("priority") == "random" or kw.get("second_expert_policy") == "random" or \
            fuzz.maybe(data, "seed"):
        kw["seed"] = data.draw(st.sampled_from([0, 7, -1, "1"]) if fuzz.maybe(data, "spoil seed")
                               else st.integers(0, 9), label="seed")
    if data.draw(st.integers(0, 3), label="bias?") == 0:
        bias = fuzz.float_values(data, (E,), fuzz.float_dtype(data, "bias dtype"))
        scale = data.draw(st.sampled_from([1e-9, 1e-3, 1.0]), label="bias scale")
        kw["expert_bias"] = (bias * scale).astype(bias.dtype) if bias.dtype.kind == "f" else bias
    return kw


def _extreme_logits(data, T: int, E: int) -> np.ndarray:
    """Logits of either router dtype with, sometimes, every value very negative (the sigmoid
    scores underflow), very large in magnitude, or tied."""
    a = fuzz.float_values(data, (T, E), data.draw(st.sampled_from(["float32", "float64",
                                                                   "float16"]), label="dtype"))
    shift = data.draw(st.sampled_from([0.0, 0.0, -150.0, -800.0, 80.0]), label="shift")
    with np.errstate(all="ignore"):
        b = a.astype(np.float64) + shift
        b = b.astype(a.dtype)
    b[~np.isfinite(b)] = np.finfo(b.dtype).max if b.dtype.kind == "f" else 0
    return b


def _route_result(r: pymoe.Routing) -> tuple:
    return (*_fields(r), r.options)


def _finite_outputs(r: pymoe.Routing) -> None:
    assert np.isfinite(r.gate).all() and np.isfinite(r.aux_loss) and np.isfinite(r.z_loss), \
        f"non-finite gates or losses from finite logits: {r.gate!r}, {r.aux_loss}, {r.z_loss}"


@FUZZ
@given(data=st.data())
def test_fuzz_route_variants(data, request):
    """Every routing keyword (valid and invalid values), the presets, logit and bias dtype mixes
    and extreme finite logits: a named error, or NumPy's result, equal bit for bit from the C
    backend, with finite gates and losses, and route_backward finite too."""
    T, E = data.draw(st.integers(0, 8), label="T"), data.draw(st.integers(1, 8), label="E")
    logits = _extreme_logits(data, T, E)
    kw = _variant_kwargs(data, E, T)
    if data.draw(st.integers(0, 4), label="preset?") == 0:
        kw["preset"] = data.draw(st.sampled_from(pymoe.presets() + ["gpt5"]), label="preset")
    backend = "c" if pymoe.backends()["c"].available and data.draw(st.booleans(),
                                                                   label="c") else "numpy"

    moderate = not logits.size or float(np.abs(logits.astype(np.float64)).max()) < 1e15

    def subject():  # finite outputs from finite logits, unless the z-loss's square overflows
        r = pymoe.route(logits, **kw, backend=backend)
        d = pymoe.route_backward(r, np.ones_like(r.gate), 0.01, 0.001)
        if moderate:
            _finite_outputs(r)
            assert np.isfinite(d).all(), f"non-finite route_backward: {d!r}"
        return (*_route_result(r), d)

    def reference():
        r = pymoe.route(fuzz.canonical(logits), **kw, backend="numpy")
        return (*_route_result(r), pymoe.route_backward(r, np.ones_like(r.gate), 0.01, 0.001))

    fuzz.check(f"route variants[{backend}]", VARIANT_NAMES, subject, reference)


@FUZZ
@given(data=st.data())
def test_fuzz_update_expert_bias(data):
    E = data.draw(st.integers(0, 6), label="E")
    bias = fuzz.float_values(data, (E,), fuzz.float_dtype(data, "bias dtype"))
    load = fuzz.float_values(data, (E,), fuzz.float_dtype(data, "load dtype"),
                             nonfinite=fuzz.maybe(data, "nonfinite load", 4))
    if fuzz.maybe(data, "spoil expert_load"):
        load = fuzz.spoil_array(data, load, "expert_load")
    rate = data.draw(st.sampled_from([1e-3, 0.0, -1.0, np.nan]) if fuzz.maybe(data, "spoil rate")
                     else st.sampled_from([1e-3, 0.1]), label="rate")

    def subject():
        out = pymoe.update_expert_bias(bias, load, rate)
        assert np.isfinite(out).all(), f"non-finite bias {out!r} from load {load!r}"
        return out

    fuzz.check("update_expert_bias", ("expert_bias", "expert_load", "rate"), subject,
               lambda: pymoe.update_expert_bias(fuzz.canonical(bias), fuzz.canonical(load), rate))


LAYER_VARIANT_ARGS = LAYER_ARGS + VARIANT_NAMES + tuple(pymoe.options.EXPERT_KEYWORDS) + (
    "layer", "seed")


@pytest.mark.parametrize("backend", ["numpy", "c"])
@settings(max_examples=max(10, fuzz.EXAMPLES // 5), deadline=None)
@given(data=st.data())
def test_fuzz_layer_variants(backend, data, request):
    """MoELayer with the routing variants and its own newer keywords (shared experts, token
    groups and their load statistics, router noise): a named error or the reference's bits, and
    finite outputs and gradients."""
    backend_by_name(backend, request)
    D, H, E = (data.draw(st.integers(1, 4), label=n) for n in ("D", "H", "E"))
    G = data.draw(st.sampled_from([1, 1, 2, 3]), label="token_groups")
    T = G * data.draw(st.integers(1, 3), label="T / G")
    kw = {n: v for n, v in _variant_kwargs(data, E, T).items() if n not in ("seed",)}
    if "expert_bias" in kw and kw["expert_bias"].dtype.kind != "f":
        kw.pop("expert_bias")
    kw.update(num_shared_experts=data.draw(st.integers(0, 2), label="S"),
              token_groups=G, load_stats=data.draw(st.sampled_from(["local", "global"]),
                                                   label="load_stats"),
              router_noise=data.draw(st.sampled_from([None, "jitter", "noisy_topk"]),
                                     label="router_noise"))
    if kw["router_noise"] == "jitter":
        kw["jitter_eps"] = 0.01
    if kw["num_shared_experts"]:
        kw["shared_expert_gate"] = data.draw(st.booleans(), label="gate")
    cfg = dict(d_model=D, d_hidden=H, num_experts=E, backend=backend, seed=1,
               dtype=data.draw(st.sampled_from(["float32", "float64"]), label="dtype"), **kw)
    x = fuzz.float_values(data, (T, D), "float64")
    dy = fuzz.float_values(data, (T, D), "float64")
    train = data.draw(st.booleans(), label="train")

    def step(backend_name):
        layer = pymoe.MoELayer(**{**cfg, "backend": backend_name})
        y = layer.forward(x, train=train)
        dx = layer.backward(dy)
        out = (y, dx, *(layer.grads[n] for n in sorted(layer.grads)))
        assert all(np.isfinite(a).all() for a in out), "non-finite output or gradient"
        routings = layer.routing if isinstance(layer.routing, tuple) else (layer.routing,)
        return tuple((r.expert_index, r.position) for r in routings), out

    def same(got, want):
        """Routing integers exactly; floats: the C gate gradient sums its dot products in its
        own order (test_fuzz_backends: round-off), so C is held to NumPy within a tolerance."""
        if not fuzz.same_bits(got[0], want[0]):
            return False
        if backend == "numpy":
            return fuzz.same_bits(got[1], want[1])
        rtol = 1e-9 if cfg["dtype"] == "float64" else 1e-3
        return all(np.allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max(initial=0))))
                   for g, w in zip(got[1], want[1]))

    fuzz.check(f"MoELayer variants[{backend}]", LAYER_VARIANT_ARGS, lambda: step(backend),
               lambda: step("numpy"), same=same)


COMPARE_NAMES = ("router_logits", "presets", "preset", "k", "capacity_factor", "min_capacity", "normalize",
                 "priority", "score", "seed", "name")


@settings(max_examples=max(10, fuzz.EXAMPLES // 3), deadline=None)
@given(data=st.data())
def test_fuzz_compare(data):
    """compare() with good and bad preset lists, renamed presets and shared keywords."""
    T, E = data.draw(st.integers(0, 12), label="T"), data.draw(st.sampled_from([2, 4, 8, 16]),
                                                               label="E")
    logits = _extreme_logits(data, T, E)
    names = data.draw(st.lists(st.sampled_from(pymoe.presets()), min_size=1, max_size=4,
                               unique=True), label="presets")
    chosen: object = list(names)
    if fuzz.maybe(data, "spoil presets", 5):
        chosen = data.draw(st.sampled_from([names[0], [], [names[0], names[0]], ["gpt5"], [3],
                                            None]), label="bad presets")
    elif data.draw(st.booleans(), label="rename"):
        chosen = [*names, pymoe.preset(names[0], name=names[0] + "-copy", capacity_factor=1.0)]
    shared = {"k": data.draw(st.integers(1, 3), label="k")}
    if data.draw(st.booleans(), label="shared cf"):
        shared["capacity_factor"] = data.draw(st.sampled_from([None, 1.0, 0.5, -1.0]), label="cf")

    def subject():
        c = pymoe.compare(logits, chosen, **shared)
        assert c.table() and len(c.rows) == len(c.names)
        return tuple((r.name, r.capacity, r.dropped_fraction, r.aux_loss) for r in c.rows)

    fuzz.check("compare", COMPARE_NAMES, subject,
               lambda: pymoe.compare(fuzz.canonical(logits), chosen, **shared) and subject())


VIZ_CALLS = ("routing_heatmap", "dispatch_combine_picture", "expert_load_bars", "curves",
             "class_expert_heatmap", "send_matrices", "preset_differences",
             "expert_choice_picture", "group_limited_picture", "load_heatmap")


@FUZZ
@given(data=st.data())
def test_fuzz_viz_bad_input(data):
    """pymoe.viz on wrong kinds of arguments (text mode: no picture is drawn): a TypeError or
    ValueError naming the argument, never an internal AttributeError or IndexError."""
    fn = data.draw(st.sampled_from(VIZ_CALLS), label="function")
    r = pymoe.route(np.random.default_rng(0).normal(size=(6, 4)), 2)
    bad = data.draw(st.sampled_from([{}, {"a": r.gate}, r.gate, [], "routing", 3, np.ones(3),
                                     np.zeros((0, 0)), {"a": []}, {"a": np.ones((2, 3))}, None]),
                    label="argument")
    path = "unused.png"
    calls = {"curves": lambda: viz_mod().curves(None, bad, path, title="t", xlabel="x",
                                                 ylabel="y"),
             "send_matrices": lambda: viz_mod().send_matrices(bad, path, title="t")}
    call = calls.get(fn, lambda: getattr(viz_mod(), fn)(bad, path))
    names = ("routing", "routings", "series", "counts", "matrices", "comparison", "x", "loads")
    with mock.patch.dict(os.environ, {"PYMOE_VIZ_TEXT": "1"}), contextlib.redirect_stdout(io.StringIO()):
        _, err = fuzz.run(call)
    if err is not None:
        assert isinstance(err, (TypeError, ValueError)), f"{fn}({bad!r}): {type(err).__name__}: {err}"
        assert fuzz.names_an_argument(err, names), f"{fn}: error names no argument: {err}"
        fuzz.STATS[f"viz.{fn}", "rejected"] += 1
    else:
        fuzz.STATS[f"viz.{fn}", "drawn"] += 1


def viz_mod():
    from pymoe import viz

    return viz
