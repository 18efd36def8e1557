"""Slot assignment (the slot rules of pymoe.slots, assign_slots, assign_slots_ordered,
keep_by_score) in C and CUDA against the NumPy reference (pymoe.slots, the spec of the slot rules),
and the slot integers of route() and of the CUDA backend's device route().

C: every slot rule gives the NumPy reference's integers, bit for bit, for any thread count.
CUDA (the counting sort): every priority order (choice-major with any token order, token-major,
explicit pair orders and their subsets), drop policy "probs", expert choice, and the device
route(); integers exact. (CUDA's top_k is tested with C's in test_top_k.py.)"""
import numpy as np
import pytest
from problems import problem, ref_routing, routed

import pymoe
from helpers import GATE_RTOL
from props import given, settings, st
from pymoe.backend.numpy_backend import NumpyBackend
from pymoe.capacity import keep_by_score
from pymoe.priority import pair_order
from pymoe.slots import assign, assign_slots_ordered

REF = NumpyBackend()  # the reference slot assignment (priority.py, capacity.py, slots.py)


@given(routed())
def test_assign_slots_matches_reference(c_backend, case):
    r, _, _ = case
    order = r.token_order if r.priority == "score" else None
    position, owner, load = c_backend.assign_slots(r.expert_index, order, r.num_experts,
                                                   r.capacity)
    np.testing.assert_array_equal(position, r.position)
    np.testing.assert_array_equal(owner, r.slot_owner)
    np.testing.assert_array_equal(load, r.expert_load)
    for got, want in zip(REF.assign_slots(r.expert_index, order, r.num_experts, r.capacity),
                         (position, owner, load)):
        np.testing.assert_array_equal(got, want)


@st.composite
def ordered_problem(draw):
    T = draw(st.integers(0, 60))
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    C = draw(st.integers(0, T + 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    index = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    order = rng.permutation(T * K).astype(np.int64)
    order = order[: draw(st.integers(0, T * K))]  # a subset: some pairs never compete
    score = rng.normal(size=(T, K))
    if draw(st.booleans()):
        score = np.round(score)  # many ties
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return index, order, score.astype(dtype), E, C


@given(ordered_problem())
def test_assign_slots_ordered_matches_numpy(c_backend, case):
    index, order, _, E, C = case
    got_all = c_backend.assign_slots_ordered(index, order, E, C)
    want_all = REF.assign_slots_ordered(index, order, E, C)
    assert len(got_all) == len(want_all)  # (zip's strict= needs Python 3.10)
    for got, want in zip(got_all, want_all):
        np.testing.assert_array_equal(got, want)


@given(ordered_problem())
def test_keep_by_score_matches_numpy_for_any_thread_count(c_backend, case):
    index, order, score, E, C = case
    want = REF.keep_by_score(index, order, score, E, C)
    for n in (1, 2, 5):
        with c_backend.num_threads(n):
            np.testing.assert_array_equal(c_backend.keep_by_score(index, order, score, E, C), want)


RULES = [
    dict(priority="token"),
    dict(priority="score", drop_policy="probs"),
    dict(priority="token", drop_policy="probs"),
    dict(priority="random", drop_policy="probs"),
    dict(priority="random"),
    dict(selection="experts"),
    dict(second_expert_policy="threshold"),
    dict(drop_policy="probs", renormalize_after_drop=True),
]


@pytest.mark.parametrize("kw", RULES)
@pytest.mark.parametrize("tied", [False, True])
def test_layer_slot_rules_same_integers_in_c(c_backend, kw, tied):
    """MoELayer(backend='c') routes exactly like MoELayer(backend='numpy') under every rule."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    if tied:
        x = np.round(x)
    k = 2
    layers = [pymoe.MoELayer(6, 8, 4, k, 0.6 if "selection" not in kw else 0.5,
                             backend=b, dtype=np.float64, seed=2, **kw) for b in ("numpy", "c")]
    ys = [layer(x) for layer in layers]
    a, b = (layer.routing for layer in layers)
    np.testing.assert_array_equal(a.position, b.position)
    np.testing.assert_array_equal(a.slot_owner, b.slot_owner)
    np.testing.assert_array_equal(a.expert_load, b.expert_load)
    np.testing.assert_array_equal(ys[0], ys[1])
    assert a.dropped_fraction > 0


def test_c_rejects_a_bad_pair_order(c_backend):
    index = np.zeros((3, 2), np.int64)
    with pytest.raises(ValueError, match="order: expected distinct pair ids"):
        c_backend.assign_slots_ordered(index, np.array([0, 0]), 1, 2)
    with pytest.raises(ValueError, match=r"order: expected entries in \[0, 6\)"):
        c_backend.keep_by_score(index, np.array([6]), np.zeros((3, 2)), 1, 2)
    ffi = c_backend.ffi
    code = c_backend.lib.pymoe_assign_slots_ordered(
        ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.new("int64_t[]", [0]), 1, 0, 0, 1, 0)
    assert code == c_backend.lib.PYMOE_ERR_PAIRS  # N = 1 > T*K = 0, caught before any write
    with pytest.raises(ValueError, match=r"C core assign_slots_ordered: order has an entry"):
        c_backend._check("assign_slots_ordered", code)


def test_pair_order_is_what_c_walks():
    np.testing.assert_array_equal(pair_order(np.array([2, 0, 1]), 2, "choice"), [4, 0, 2, 5, 1, 3])
    np.testing.assert_array_equal(pair_order(np.array([2, 0, 1]), 2, "token"), [4, 5, 0, 1, 2, 3])


ROUTE_VARIANTS = [
    dict(score="sigmoid", normalize=True, expert_bias=np.array([0.1, -0.2, 0.0, 0.3, 0.0])),
    dict(expert_bias=np.array([0.05, 0.0, -0.05, 0.0, 0.1])),
    dict(score="sigmoid", num_groups=5, topk_groups=2),
    dict(priority="token", drop_policy="probs", renormalize_after_drop=True),
    dict(priority="random", seed=4),
    dict(selection="experts"),
    dict(selection="sinkhorn"),
    dict(second_expert_policy="random", seed=2),
    dict(load_balancing="k_scaled", capacity_rule="tutel"),
]


@pytest.mark.parametrize("kw", ROUTE_VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_route_variants_same_integers_in_c(c_backend, kw, dtype):
    """route(backend='c') (C top-K and C slot rules) routes exactly like backend='numpy'."""
    logits = np.random.default_rng(3).normal(size=(60, 5)).astype(dtype)
    a = pymoe.route(logits, 2, 0.5, backend="numpy", **kw)
    b = pymoe.route(logits, 2, 0.5, backend="c", **kw)
    for name in ("expert_index", "position", "slot_owner", "expert_load", "kept"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.gate, b.gate)
    assert b.aux_loss == pytest.approx(a.aux_loss, rel=1e-6)
    assert a.dropped_fraction > 0


# ------------------------------------------------------------------ CUDA (the counting sort)
@settings(max_examples=40)
@given(problem())
def test_slots_match_reference(cuda_impl, case):
    logits, K, cf, priority, _, block, _ = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    r = ref_routing(logits, K, cf, priority)
    order = dev(r.token_order) if priority == "score" else None
    with be.block_size(block):
        position, owner, load = be.assign_slots(dev(r.expert_index), order, r.num_experts,
                                                r.capacity)
    np.testing.assert_array_equal(host(position), r.position)
    np.testing.assert_array_equal(host(owner), r.slot_owner)
    np.testing.assert_array_equal(host(load), r.expert_load)


def assert_same(got, want, host):
    """(position, slot_owner, expert_load) from the device equal the reference's."""
    assert len(got) == len(want) == 3
    for g, w, name in zip(got, want, ("position", "slot_owner", "expert_load")):
        np.testing.assert_array_equal(host(g), w, err_msg=name)


def device_assign(cuda_impl, expert_index, tokens, E, C, score, **rule):
    """pymoe.slots.assign with the CUDA backend doing the work, on device arrays."""
    be, dev = cuda_impl.backend, cuda_impl.to_device
    return assign(be, dev(expert_index), dev(tokens), E, C, score=dev(score), xp=be.memory.xp,
                  **rule)


@st.composite
def slot_problem(draw):
    T = draw(st.integers(0, 70))
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, min(E, 4)))
    C = draw(st.integers(0, T + 1))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    expert_index = np.argsort(rng.uniform(size=(T, E)), axis=1)[:, :K].astype(np.int64)
    order = draw(st.sampled_from(["none", "random", "reversed"]))
    token_order = {"none": None, "random": rng.permutation(T).astype(np.int64),
                   "reversed": np.arange(T)[::-1].copy().astype(np.int64)}[order]
    score = np.round(rng.uniform(size=(T, K)), draw(st.sampled_from([1, 6])))  # ties or not
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    block = draw(st.sampled_from([32, 64, 128, 256, 512, 1024]))
    return expert_index, token_order, E, C, score.astype(dtype), block


@settings(max_examples=40)
@given(slot_problem(), st.sampled_from(["choice", "token"]), st.sampled_from(["position", "probs"]))
def test_slot_rules_match_numpy(cuda_impl, case, priority, drop_policy):
    """choice (None), random, reversed token orders; choice- or token-major; drop policy
    "position" or "probs": slots.assign through the CUDA functions gives the integers of
    slots.assign on the NumPy reference; assign_slots (choice-major, token_order or None) those of
    the reference's assign_slots."""
    expert_index, token_order, E, C, score, block = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    tokens = np.arange(expert_index.shape[0]) if token_order is None else token_order
    want = assign(REF, expert_index, tokens, E, C, priority=priority, drop_policy=drop_policy,
                  score=score)
    with be.block_size(block):
        got = device_assign(cuda_impl, expert_index, tokens, E, C, score, priority=priority,
                            drop_policy=drop_policy)
        assert_same(got, want, host)
        got = be.assign_slots(dev(expert_index), None if token_order is None else dev(token_order),
                              E, C)
    assert_same(got, REF.assign_slots(expert_index, token_order, E, C), host)


@st.composite
def ordered_cuda_problem(draw):
    """An explicit pair order (token-major, choice-major or random) and a subset of it."""
    expert_index, token_order, E, C, score, block = draw(slot_problem())
    T, K = expert_index.shape
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    tokens = np.arange(T) if token_order is None else token_order
    order = {"token": pair_order(tokens, K, "token"), "choice": pair_order(tokens, K, "choice"),
             "random": rng.permutation(T * K)}[draw(st.sampled_from(["token", "choice", "random"]))]
    order = order[np.sort(rng.permutation(T * K)[: draw(st.integers(0, T * K))])] \
        if draw(st.booleans()) else order  # a subset: some pairs never compete
    return expert_index, order.astype(np.int64), E, C, score, block


@settings(max_examples=40)
@given(ordered_cuda_problem())
def test_assign_slots_ordered_and_keep_by_score_match_numpy(cuda_impl, case):
    """The two primitives of pymoe.slots, over any pair order or a subset of it: the integers of
    slots.assign_slots_ordered and capacity.keep_by_score."""
    expert_index, order, E, C, score, block = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    with be.block_size(block):
        got = be.assign_slots_ordered(dev(expert_index), dev(order), E, C)
        keep = be.keep_by_score(dev(expert_index), dev(order), dev(score), E, C)
    assert_same(got, assign_slots_ordered(expert_index, order, E, C), host)
    np.testing.assert_array_equal(host(keep), keep_by_score(expert_index, order, score, E, C))


def test_many_chunks_and_wide_experts(cuda_impl):
    """More pairs than one block's chunk (several chunks, a multi-tile scan) and E > 32."""
    rng = np.random.default_rng(7)
    T, E, K, C = 700, 45, 2, 20
    expert_index = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    order = rng.permutation(T).astype(np.int64)
    score = rng.uniform(size=(T, K))
    for priority, drop_policy in [("choice", "position"), ("token", "position"),
                                  ("choice", "probs"), ("token", "probs")]:
        rule = dict(priority=priority, drop_policy=drop_policy)
        with cuda_impl.backend.block_size(32):  # chunk = 256 pairs: 6 chunks, 270 scan entries
            got = device_assign(cuda_impl, expert_index, order, E, C, score, **rule)
        assert_same(got, assign(REF, expert_index, order, E, C, score=score, **rule),
                    cuda_impl.to_host)


@settings(max_examples=20)
@given(st.integers(1, 30), st.integers(1, 9), st.integers(0, 2**31), st.booleans(),
       st.sampled_from([32, 128, 1024]))
def test_expert_choice(cuda_impl, T, E, seed, ties, block):
    """Expert choice (Zhou et al. 2022): K = E pairs per token (its experts
    in decreasing score, ties to the lower expert), each expert takes its top-C tokens by score,
    ties to the lower token, and the taken tokens fill slots in token order: the reference's
    integers (token-major keep_by_score, then assign_slots_ordered), and the rule itself."""
    be, host = cuda_impl.backend, cuda_impl.to_host
    rng = np.random.default_rng(seed)
    probs = rng.uniform(size=(T, E))
    if ties:
        probs = np.round(probs, 1)
    C = int(rng.integers(1, T + 1))
    expert_index = np.argsort(-probs, axis=1, kind="stable").astype(np.int64)  # [T, E]
    score = np.take_along_axis(probs, expert_index, axis=1)  # [T, E]
    rule = dict(priority="token", drop_policy="probs")
    tokens = np.arange(T)
    with be.block_size(block):
        position, owner, load = device_assign(cuda_impl, expert_index, tokens, E, C, score, **rule)
    assert_same((position, owner, load), assign(REF, expert_index, tokens, E, C, score=score, **rule),
                host)
    position, owner = host(position), host(owner)
    for e in range(E):
        taken = sorted(np.lexsort((np.arange(T), -probs[:, e]))[:C])  # top-C, ties lower token
        t_of_slot = owner[e][owner[e] >= 0] // E
        np.testing.assert_array_equal(t_of_slot, taken)
        for c, t in enumerate(taken):
            j = int(np.flatnonzero(expert_index[t] == e)[0])
            assert position[t, j] == c
    assert (position >= 0).sum() == E * C
    np.testing.assert_array_equal(host(load), np.full(E, T))


def test_bad_pair_orders_are_refused(cuda_impl):
    """A repeated or out-of-range pair id sets PYMOE_BAD_PAIRS (C's PYMOE_ERR_PAIRS message);
    more ids than pairs is refused before any launch."""
    be, dev = cuda_impl.backend, cuda_impl.to_device
    index = dev(np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="order has an entry"):
        be.assign_slots_ordered(index, dev(np.array([0, 0])), 1, 2)
    with pytest.raises(ValueError, match="order has an entry"):
        be.keep_by_score(index, dev(np.array([6])), dev(np.zeros((3, 2))), 1, 2)
    with pytest.raises(ValueError, match="order: expected at most T"):
        be.assign_slots_ordered(index, dev(np.arange(7)), 1, 2)


@pytest.mark.parametrize("priority", ["choice", "score", "token", "random"])
@pytest.mark.parametrize("drop_policy", ["position", "probs"])
def test_device_route_slot_rules(cuda_impl, priority, drop_policy):
    """be.route with each priority and drop policy: the slot rules applied to its own top-K,
    the token order of pymoe.priority (random: numpy's default_rng(seed)), and the gate."""
    import pymoe

    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(11)
    T, E, K = 45, 6, 2
    logits = np.round(rng.normal(size=(T, E)), 1)
    d = be.route(dev(logits), K, 0.6, priority=priority, drop_policy=drop_policy, seed=5,
                 normalize=True)
    ref = pymoe.route(logits, K, None, normalize=True)  # top-K, gates and capacity inputs
    np.testing.assert_array_equal(host(d.expert_index), ref.expert_index)
    order = {"choice": None, "token": None, "score": ref.token_order if priority == "score"
             else None, "random": np.random.default_rng(5).permutation(T)}[priority]
    if priority == "score":
        order = pymoe.route(logits, K, 0.6, priority="score").token_order
        np.testing.assert_array_equal(host(d.token_order), order)
    gate = host(d.gate)
    tokens = np.arange(T) if order is None else order
    want = assign(REF, ref.expert_index, tokens, E, d.capacity, priority=priority,
                  drop_policy=drop_policy, score=ref.gate_before_drop)
    assert_same((d.position, d.slot_owner, d.expert_load), want, host)
    kept = host(d.position) >= 0
    assert np.all(gate[~kept] == 0)
    np.testing.assert_allclose(gate[kept], ref.gate_before_drop[kept], rtol=1e-12)
    with pytest.raises(ValueError, match="seed: priority='random' needs a seed"):
        be.route(dev(logits), K, priority="random")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'score' \(the device route "
                                        r"runs min_capacity, normalize, priority, drop_policy\)"):
        be.route(dev(logits), K, score="sigmoid")


@pytest.mark.parametrize("T,E,K,cf", [(0, 4, 2, 1.0), (9, 1, 1, 1.0), (9, 4, 4, 1.0),
                                      (9, 5, 2, 0.01), (12, 3, 3, None)])
def test_edge_sizes(cuda_impl, T, E, K, cf):
    """T=0, E=1, K=E, C=1 and dropless, through the device route()."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    logits = np.random.default_rng(T + E).normal(size=(T, E))
    r = pymoe.route(logits, K, cf)
    d = be.route(dev(logits), K, cf)
    assert d.capacity == r.capacity
    np.testing.assert_array_equal(host(d.position), r.position)
    np.testing.assert_array_equal(host(d.slot_owner), r.slot_owner)
    np.testing.assert_allclose(host(d.gate), r.gate, rtol=GATE_RTOL[np.dtype(np.float64)])


def test_device_route_with_score_priority(cuda_impl):
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    logits = np.random.default_rng(3).normal(size=(40, 6)).astype(np.float32)
    r = pymoe.route(logits, 2, 0.7, priority="score", normalize=True)
    d = be.route(dev(logits), 2, 0.7, priority="score", normalize=True)
    np.testing.assert_array_equal(host(d.token_order), r.token_order)
    np.testing.assert_array_equal(host(d.position), r.position)
    np.testing.assert_allclose(host(d.gate), r.gate, rtol=GATE_RTOL[np.dtype(np.float32)])


def test_invalid_slot_input_is_reported_not_followed(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    with pytest.raises(ValueError, match="expert_index entry is outside"):
        be.assign_slots(dev(np.array([[0], [7]])), None, 2, 2)
    with pytest.raises(ValueError, match=r"token_order is not a permutation of 0..T-1"):
        be.assign_slots(dev(np.array([[0], [1], [0]])), dev(np.array([0, 0, 1])), 2, 2)
    with pytest.raises(ValueError, match=r"token_order is not a permutation of 0..T-1"):
        be.assign_slots(dev(np.array([[0], [1], [0]])), dev(np.array([0, 3, 1])), 2, 2)


def test_assign_slots_wrapper_checks_kinds(cuda_impl):
    be, dev = cuda_impl.backend, cuda_impl.to_device
    with pytest.raises(TypeError, match="expected dtype int64"):
        be.assign_slots(dev(np.zeros((2, 1), np.int32)), None, 2, 1)
