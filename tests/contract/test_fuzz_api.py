"""Property-based fuzzing of route, route_backward and MoELayer forward/backward (NumPy and C
backends, both formulations) against the contract in fuzz.py: a named ValueError/TypeError, or the
bits the same call gives on contiguous native-order copies of its arrays."""
from __future__ import annotations

import warnings

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
