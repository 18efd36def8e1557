"""Properties of route() on random configurations, and agreement with the loop oracle."""
import numpy as np
import pytest

import pymoe
from helpers import oracle_route, oracle_softmax
from props import given, st


@st.composite
def routing_case(draw):
    T = draw(st.integers(0, 40))
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, E))
    cf = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    min_capacity = draw(st.integers(0, 5))
    normalize = draw(st.booleans())
    priority = draw(st.sampled_from(["choice", "score"]))
    # Small integers provoke ties among experts and among tokens' scores; floats do not.
    if draw(st.booleans()):
        logits = draw(st.lists(st.integers(-2, 2), min_size=T * E, max_size=T * E))
        logits = np.array(logits, dtype=np.float64).reshape(T, E)
    else:
        seed = draw(st.integers(0, 2**31))
        logits = np.random.default_rng(seed).normal(size=(T, E)) * draw(st.floats(0.1, 10))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return logits.astype(dtype), k, cf, min_capacity, normalize, priority


def _route(case):
    logits, k, cf, minc, normalize, priority = case
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize with k=1 warns; the values still count
        return pymoe.route(logits, k, cf, min_capacity=minc, normalize=normalize,
                           priority=priority)


@given(routing_case())
def test_matches_the_loop_oracle(case):
    logits, k, cf, minc, normalize, priority = case
    r = _route(case)
    o = oracle_route(logits.tolist(), r.probs.tolist(), logits.shape[1], k, cf, minc, normalize, priority)
    for name in ("expert_index", "position", "kept", "expert_load", "token_order",
                 "dispatch_mask"):
        np.testing.assert_array_equal(getattr(r, name), o[name], err_msg=name)
    assert r.capacity == o["capacity"]
    rtol = 1e-12 if logits.dtype == np.float64 else 1e-5
    if len(logits):
        np.testing.assert_allclose(r.probs, oracle_softmax(logits.tolist()), rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(r.gate, o["gate"], rtol=rtol)
    np.testing.assert_allclose(r.combine_weights, o["combine_weights"], rtol=rtol)
    assert r.aux_loss == pytest.approx(o["aux_loss"], rel=rtol, abs=1e-12)
    assert r.z_loss == pytest.approx(o["z_loss"], rel=rtol, abs=1e-12)


@given(routing_case())
def test_capacity_invariants(case):
    r = _route(case)
    C, E = r.capacity, r.num_experts
    assert np.all(r.expert_load_kept <= C)
    np.testing.assert_array_equal(r.expert_load_kept, np.minimum(r.expert_load, C))
    dropped = int((~r.kept).sum())
    assert dropped == int(np.maximum(0, r.expert_load - C).sum())
    assert r.dropped_fraction == pytest.approx(dropped / max(r.kept.size, 1))
    assert np.all(r.gate[~r.kept] == 0) and np.all(r.position[~r.kept] == -1)
    np.testing.assert_array_equal(r.gate[r.kept], r.gate_before_drop[r.kept])
    # The kept pairs of each expert are exactly its first C in priority order, at slots 0..n-1.
    order = r.token_order
    for e in range(E):
        pairs = [(t, j) for j in range(r.k) for t in order if r.expert_index[t, j] == e]
        kept = [p for p in pairs if r.kept[p]]
        assert kept == pairs[:C]
        assert [r.position[p] for p in kept] == list(range(len(kept)))
    # slot_owner is the inverse map of (expert_index, position)
    owner = r.slot_owner
    assert owner.shape == (E, C)
    for e in range(E):
        n = r.expert_load_kept[e]
        assert np.all(owner[e, n:] == -1)
        for c in range(n):
            t, j = divmod(int(owner[e, c]), r.k)
            assert r.expert_index[t, j] == e and r.position[t, j] == c


@given(routing_case())
def test_dense_tensors_agree_with_the_index_form(case):
    r = _route(case)
    T, K = r.expert_index.shape
    assert r.dispatch_mask.dtype == bool
    assert r.dispatch_mask.sum() == r.kept.sum()
    for t in range(T):
        for j in range(K):
            if r.kept[t, j]:
                e, c = r.expert_index[t, j], r.position[t, j]
                assert r.dispatch_mask[t, e, c]
                assert r.combine_weights[t, e, c] == r.gate[t, j]
    np.testing.assert_allclose(r.combine_weights.sum(axis=(1, 2)), r.gate.sum(axis=1), rtol=1e-6)
