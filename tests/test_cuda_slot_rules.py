"""The CUDA counting sort and top-K against the slot rules and the top-K contract: every priority
order (choice-major with any token order, token-major), drop policy "probs", expert choice, and
top_k with bias, counts and column sums; integers exact, sums bit for bit."""
import numpy as np
import pytest

from pymoe.topk import top_k as np_top_k

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def pair_order(token_order, T, K, token_major):
    """Every (t, j) in the order pairs claim slots: choice-major or token-major."""
    order = np.arange(T) if token_order is None else token_order
    if token_major:
        return [(int(t), j) for t in order for j in range(K)]
    return [(int(t), j) for j in range(K) for t in order]


def ref_assign_slots(expert_index, token_order, E, C, token_major=False, score=None):
    """A loop over the priority order: the n-th pair to claim an expert gets slot n if n < C.
    With score (drop policy "probs"): each expert keeps its C highest-scoring pairs, ties to the
    earlier pair, and the kept pairs fill slots in priority order."""
    T, K = expert_index.shape
    pairs = pair_order(token_order, T, K, token_major)
    keep = {}
    if score is not None:
        for e in range(E):
            mine = [(rank, p) for rank, p in enumerate(pairs) if expert_index[p] == e]
            best = sorted(mine, key=lambda rp: (-score[rp[1]], rp[0]))[:C]
            keep.update({p: True for _, p in best})
    position = np.full((T, K), -1, np.int64)
    owner = np.full((E, C), -1, np.int64)
    load, filled = np.zeros(E, np.int64), np.zeros(E, np.int64)
    for t, j in pairs:
        e = expert_index[t, j]
        load[e] += 1
        if score is not None and not keep.get((t, j)):
            continue
        if filled[e] < C:
            position[t, j] = filled[e]
            owner[e, filled[e]] = t * K + j
        filled[e] += 1
    return position, owner, load


@pytest.fixture(scope="module")
def c_core():
    """[the C backend] when it is built, else []: its top_k is the twin of the CUDA one."""
    from pymoe import c_backend

    be, _ = c_backend.load()
    return [be] if be is not None else []


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
@given(slot_problem(), st.booleans(), st.booleans())
def test_assign_slots_every_priority_and_drop_policy(cuda_impl, case, token_major, by_score):
    """choice (None), random (a permutation), reversed orders; choice- or token-major; drop
    policy "position" or "probs": the same integers as the loop over the slot rules."""
    expert_index, token_order, E, C, score, block = case
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    want = ref_assign_slots(expert_index, token_order, E, C, token_major,
                            score if by_score else None)
    with be.block_size(block):
        got = be.assign_slots(dev(expert_index), None if token_order is None else dev(token_order),
                              E, C, token_major=token_major,
                              score=dev(score) if by_score else None)
    for g, w, name in zip(got, want, ("position", "slot_owner", "expert_load")):
        np.testing.assert_array_equal(host(g), w, err_msg=name)


def test_many_chunks_and_wide_experts(cuda_impl):
    """More pairs than one block's chunk (several chunks, a multi-tile scan) and E > 32."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(7)
    T, E, K, C = 700, 45, 2, 20
    expert_index = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    order = rng.permutation(T).astype(np.int64)
    score = rng.uniform(size=(T, K))
    for token_major, s in [(False, None), (True, None), (False, score)]:
        with be.block_size(32):  # chunk = 256 pairs: 6 chunks, 270 scan entries
            got = be.assign_slots(dev(expert_index), dev(order), E, C, token_major=token_major,
                                  score=None if s is None else dev(s))
        want = ref_assign_slots(expert_index, order, E, C, token_major, s)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(host(g), w)


@settings(max_examples=20)
@given(st.integers(1, 30), st.integers(1, 9), st.integers(0, 2**31), st.booleans(),
       st.sampled_from([32, 128, 1024]))
def test_expert_choice(cuda_impl, T, E, seed, ties, block):
    """Expert choice (Zhou et al. 2022): K = E pairs per token (its experts
    in decreasing score, ties to the lower expert), each expert takes its top-C tokens by score,
    ties to the lower token, and the taken tokens fill slots in token order."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(seed)
    probs = rng.uniform(size=(T, E))
    if ties:
        probs = np.round(probs, 1)
    C = int(rng.integers(1, T + 1))
    expert_index = np.argsort(-probs, axis=1, kind="stable").astype(np.int64)  # [T, E]
    score = np.take_along_axis(probs, expert_index, axis=1)  # [T, E]
    with be.block_size(block):
        position, owner, load = be.assign_slots(dev(expert_index), None, E, C, token_major=True,
                                                score=dev(score))
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


@settings(max_examples=30)
@given(st.integers(0, 40), st.integers(1, 70), st.integers(0, 2**31), st.booleans(),
       st.booleans(), st.sampled_from([np.float32, np.float64]),
       st.sampled_from([32, 64, 256, 1024]))
def test_top_k_matches_the_c_contract(cuda_impl, c_core, T, E, seed, ties, with_bias, dtype,
                                      block):
    """expert_index of score + bias (ties to the lower expert, as pymoe.topk.top_k), the counts
    per expert, and the column sums of probs bit for bit (token order, from 0), as C's
    pymoe_top_k computes them."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, min(E, 8) + 1))
    score = rng.normal(size=(T, E))
    if ties:
        score = np.round(score)
    score = score.astype(dtype)
    bias = rng.normal(size=E).astype(dtype) if with_bias else None
    probs = rng.uniform(size=(T, E)).astype(dtype)
    with be.block_size(block):
        index, load, psum = be.top_k(dev(score), K, None if bias is None else dev(bias),
                                     dev(probs))
    v = score if bias is None else score + bias  # rounded in the dtype, as the contract says
    want = np_top_k(v, K)
    np.testing.assert_array_equal(host(index), want)
    np.testing.assert_array_equal(host(load), np.bincount(want.reshape(-1), minlength=E))
    # in token order from 0: cumsum adds sequentially (probs.sum(axis=0) does too, except at
    # E = 1 where the axis is contiguous and NumPy sums pairwise)
    in_order = np.cumsum(probs, axis=0)[-1] if T else np.zeros(E, dtype)
    np.testing.assert_array_equal(host(psum), in_order)
    index2, load2, none = be.top_k(dev(score), K, None if bias is None else dev(bias))
    assert none is None
    np.testing.assert_array_equal(host(index2), want)
    for c in c_core:  # the C twin, pymoe_top_k: the same integers and bits
        c_index, c_load, c_sum = c.top_k(score, K, bias, probs)
        np.testing.assert_array_equal(host(index), c_index)
        np.testing.assert_array_equal(host(load), c_load)
        np.testing.assert_array_equal(host(psum), c_sum)


def test_top_k_treats_signed_zeros_as_equal(cuda_impl):
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    score = np.array([[0.0, -0.0, 0.0, -1.0], [-0.0, 0.0, -0.0, 2.0]])
    index, _, _ = be.top_k(dev(score), 3)
    np.testing.assert_array_equal(host(index), [[0, 1, 2], [3, 0, 1]])


@pytest.mark.parametrize("E,block", [(300, 1024), (512, 64)])
def test_wide_rows_in_the_warp_router(cuda_impl, E, block):
    """E > 256: 16 values per lane (at most 512 threads per block there, which the host caps)."""
    be, dev, host = cuda_impl.backend, cuda_impl.to_device, cuda_impl.to_host
    rng = np.random.default_rng(E)
    logits = np.round(rng.normal(size=(5, E)), 1)
    with be.block_size(block):
        probs, index, _ = be.softmax_top_k(dev(logits), 8)
        index2, load, _ = be.top_k(dev(logits), 8)
    np.testing.assert_array_equal(host(index), np_top_k(logits, 8))
    np.testing.assert_array_equal(host(index2), np_top_k(logits, 8))
    np.testing.assert_allclose(host(probs).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="PYMOE_ERR_SIZE"):
        be.top_k(dev(np.zeros((2, 513))), 2)


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
    score = ref.gate_before_drop if drop_policy == "probs" else None
    want = ref_assign_slots(ref.expert_index, order, E, d.capacity, priority == "token", score)
    for g, w in zip((d.position, d.slot_owner, d.expert_load), want):
        np.testing.assert_array_equal(host(g), w)
    kept = host(d.position) >= 0
    assert np.all(gate[~kept] == 0)
    np.testing.assert_allclose(gate[kept], ref.gate_before_drop[kept], rtol=1e-12)
    with pytest.raises(ValueError, match="seed: priority='random' needs a seed"):
        be.route(dev(logits), K, priority="random")
