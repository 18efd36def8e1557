"""Cross-check: the switch, gshard, flaxformer, tutel and megablocks presets against their systems'
formulas, transcribed from the source (file and line in each comment), on literal cases.

Their code needs TensorFlow (Mesh-TF), JAX (flaxformer) or a GPU (Tutel's and MegaBlocks' kernels),
so each routing function is transcribed here in NumPy, step for step in the original's tensor
form (masks, cumulative sums, one-hots), not in pymoe's; float64 throughout, compared at 1e-12.
Sources: tensorflow/mesh da90793 mesh_tensorflow/transformer/moe.py; google/flaxformer 399ea3a
flaxformer/architectures/moe/{routing,moe_layers}.py; microsoft/tutel 82af7aa
tutel/impls/{fast_dispatch,losses}.py; databricks/megablocks 78eea65
megablocks/layers/{router,moe}.py, megablocks/backend/kernels.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from crosscheck import CASES, Outcome, assert_same, ours, tied_logits

F64 = np.float64


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def one_hot(i: np.ndarray, n: int) -> np.ndarray:
    """jax.nn.one_hot / mtf.one_hot: an all-zero row for an index outside [0, n)."""
    return (np.asarray(i)[..., None] == np.arange(n)).astype(F64)


def excl_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x, axis=0) - x


def _outcome(chosen, combine, aux, capacity) -> Outcome:
    return Outcome(chosen.astype(bool), (combine != 0).any(axis=2), combine.sum(axis=2), combine,
                   float(aux), capacity)


# ------------------------------------------------------------------------------- Mesh-TF

def mtf_capacity(T: int, E: int, cf: float, min_capacity: int = 4) -> int:
    # moe.py:368-371: min(group_size, int(group_size * cf / E)), then max(., moe_min_expert_capacity)
    return max(min(T, int((T * cf) / E)), min_capacity)


def mtf_switch(logits: np.ndarray, cf: float) -> Outcome:
    """moe.py _switch_gating (1176-1309), policy "argmax", no importance, one group."""
    T, E = logits.shape
    C = mtf_capacity(T, E, cf)
    raw_gates = softmax(logits)  # 1208
    expert_index = raw_gates.argmax(axis=1)  # 1211: mtf.top_1 (first maximum)
    expert_gate = raw_gates[np.arange(T), expert_index]
    expert_mask = one_hot(expert_index, E)  # 1221
    density_1, density_1_proxy = expert_mask.mean(0), raw_gates.mean(0)  # 1225-1226
    loss = np.mean(density_1_proxy * density_1) * E * E  # 1232-1234
    position_in_expert = excl_cumsum(expert_mask) * expert_mask  # 1275-1276
    expert_mask = expert_mask * (position_in_expert < C)  # 1280-1282
    expert_mask_flat = expert_mask.sum(1)  # 1283
    expert_gate = expert_gate * expert_mask_flat  # 1293
    combine = (expert_gate[:, None, None] * expert_mask_flat[:, None, None]
               * one_hot(expert_index, E)[:, :, None]
               * one_hot(position_in_expert.sum(1).astype(int), C)[:, None, :])  # 1295-1301
    return _outcome(one_hot(expert_index, E), combine, loss, C)


def mtf_top2(logits: np.ndarray, cf: float, *, eps: float = 1e-9,
             uniform: np.ndarray | None = None, threshold: float = 0.2) -> Outcome:
    """moe.py _top_2_gating (1312-1510), no importance, one group; policy "all" (uniform None)
    or "random" with the given U(0, 1) draws."""
    T, E = logits.shape
    C = mtf_capacity(T, E, cf)
    raw_gates = softmax(logits)  # 1391
    index_1 = raw_gates.argmax(1)  # 1397: top_1
    gate_1 = raw_gates[np.arange(T), index_1]
    mask_1 = one_hot(index_1, E)  # 1399
    gates_without_top_1 = raw_gates * (1.0 - mask_1)  # 1405
    index_2 = gates_without_top_1.argmax(1)  # 1407
    gate_2 = gates_without_top_1[np.arange(T), index_2]
    mask_2 = one_hot(index_2, E)  # 1409
    chosen = mask_1 + mask_2
    denom = gate_1 + gate_2 + eps  # 1413
    gate_1, gate_2 = gate_1 / denom, gate_2 / denom  # 1414-1415
    density_1, density_1_proxy = mask_1.mean(0), raw_gates.mean(0)  # 1420-1422
    loss = np.mean(density_1_proxy * density_1) * E * E  # 1423-1424
    if uniform is not None:  # 1462-1465: policy "random"
        mask_2 = mask_2 * (uniform < gate_2 / max(threshold, 1e-9))[:, None]
    position_in_expert_1 = excl_cumsum(mask_1) * mask_1  # 1472-1473
    mask_1 = mask_1 * (position_in_expert_1 < C)  # 1475
    mask_1_count = mask_1.sum(0)  # 1478
    mask_1_flat = mask_1.sum(1)  # 1480
    position_in_expert_1 = position_in_expert_1.sum(1)  # 1482-1483
    gate_1 = gate_1 * mask_1_flat  # 1485
    position_in_expert_2 = (excl_cumsum(mask_2) + mask_1_count) * mask_2  # 1488-1490
    mask_2 = mask_2 * (position_in_expert_2 < C)  # 1491
    mask_2_flat = mask_2.sum(1)  # 1493
    gate_2 = gate_2 * mask_2_flat  # 1494
    position_in_expert_2 = position_in_expert_2.sum(1)  # 1495-1496
    combine = (gate_1[:, None, None] * mask_1_flat[:, None, None] * one_hot(index_1, E)[:, :, None]
               * one_hot(position_in_expert_1.astype(int), C)[:, None, :]
               + gate_2[:, None, None] * mask_2_flat[:, None, None] * one_hot(index_2, E)[:, :, None]
               * one_hot(position_in_expert_2.astype(int), C)[:, None, :])  # 1499-1506
    return _outcome(chosen, combine, loss, C)


@pytest.mark.parametrize("case", list(CASES))
def test_switch(case):
    logits = CASES[case](40, 8, F64)
    for cf in (1.0, 1.25, 2.0):
        theirs = mtf_switch(logits, cf)
        assert_same(ours("switch", logits, 1, cf), theirs, F64, "switch")
    assert not theirs.kept[theirs.chosen].all() or case == "random"


@pytest.mark.parametrize("case", list(CASES))
def test_gshard(case):
    """Second expert "all" (policy override) and "random" (the preset's default, seed 0: pymoe
    draws one U(0, 1) per token from numpy's default_rng(seed), fed to the transcription). Exact
    with Mesh-TF's 1e-9 left out of the gate denominator; with it, its gates are smaller by
    about 1e-9 relative (docs/conventions.md, section 3)."""
    T, E = 40, 8
    logits = CASES[case](T, E, F64)
    for cf in (1.25, 2.0, 4.0):
        mine = ours("gshard", logits, 2, cf, second_expert_policy="all")
        assert_same(mine, mtf_top2(logits, cf, eps=0.0), F64, "gshard")
        with_eps = mtf_top2(logits, cf)
        assert np.abs(mine.gate - with_eps.gate).max() <= 2e-9
        u = np.random.default_rng(0).uniform(size=T)
        assert_same(ours("gshard", logits, 2, cf), mtf_top2(logits, cf, eps=0.0, uniform=u), F64,
                    "gshard")


# ----------------------------------------------------------------------------- flaxformer

def flax_capacity(T: int, E: int, cf: float, min_capacity: int = 4) -> int:
    # moe_layers.py:175-178: int(round(capacity_factor * tokens_per_group / num_experts)), then
    # max(., min_expert_capacity)
    return max(int(round(cf * T / E)), min_capacity)


def flax_tokens_choose(logits: np.ndarray, k: int, cf: float, bpr: bool) -> Outcome:
    """routing.py TokensChooseMaskedRouter._compute_routing_instructions (542-640), one group,
    no padding; _load_balancing_loss (720-754)."""
    T, E = logits.shape
    C = flax_capacity(T, E, cf)
    router_probs = softmax(logits)  # 322: _compute_router_probabilities
    expert_index = np.argsort(-router_probs, axis=1, kind="stable")[:, :k]  # 561: top_k
    expert_gate = np.take_along_axis(router_probs, expert_index, 1)
    mask = one_hot(expert_index, E).max(axis=1)  # 739-742 (aux loss computed at 581)
    aux = np.mean(mask.mean(0) * router_probs.mean(0)) * E ** 2  # 744-753
    if bpr:
        permutation = np.argsort(-expert_gate[:, 0], kind="stable")  # 586 (jnp.argsort is stable)
        expert_index = expert_index[permutation]  # 588-589
    flat = expert_index.T.reshape(-1)  # 594-596: [K * T], choice-major
    expert_mask = one_hot(flat, E)  # 600
    token_priority = np.cumsum(expert_mask, axis=0) * expert_mask - 1.0  # 606
    token_priority = token_priority.reshape(k, T, E).transpose(1, 0, 2).max(axis=1)  # 607-617
    if bpr:
        token_priority = token_priority[np.argsort(permutation)]  # 621-623
    dispatch_mask = one_hot(token_priority.astype(int), C)  # 629: -1 and >= C give zero rows
    combine = router_probs[:, :, None] * dispatch_mask  # 635-640
    chosen = one_hot(np.argsort(-router_probs, axis=1, kind="stable")[:, :k], E).max(axis=1)
    return _outcome(chosen, combine, aux, C)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bpr", [True, False])
def test_flaxformer(case, bpr):
    logits = CASES[case](40, 8, F64)
    for k, cf in [(2, 1.25), (2, 2.0), (1, 1.0), (2, 0.3)]:
        mine = ours("flaxformer", logits, k, cf, priority="score" if bpr else "choice")
        assert_same(mine, flax_tokens_choose(logits, k, cf, bpr), F64, "flaxformer")


def test_flaxformer_capacity_rounds_half_to_even():
    """int(round(x)) in Python rounds halves to even: cf * T / E = 6.5 gives 6, 7.5 gives 8."""
    logits = CASES["random"](52, 8, F64)  # 1.0 * 52 / 8 = 6.5
    assert ours("flaxformer", logits, 2, 1.0).capacity == flax_capacity(52, 8, 1.0) == 6
    logits = CASES["random"](60, 8, F64)  # 7.5
    assert ours("flaxformer", logits, 2, 1.0).capacity == flax_capacity(60, 8, 1.0) == 8


# ---------------------------------------------------------------------------------- Tutel

def tutel_extract_critical(logits: np.ndarray, k: int, cf: float, bpr: bool = False) -> Outcome:
    """fast_dispatch.py extract_critical (143-196), normalize_gate=True, alignment 1, with the
    default loss_fn losses.gshard_loss (losses.py 12-19); the kernels keep a route iff its
    location < capacity (fast_dispatch.py fast_encode / jit_kernels/sparse.py)."""
    T, E = logits.shape
    scores = softmax(logits)
    topk_indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # 146
    indices_s = [topk_indices[:, j] for j in range(k)]  # 148
    masks_se = [one_hot(x, E) for x in indices_s]  # 150
    gates_s = [(scores * x).sum(1) for x in masks_se]  # 151
    ce = one_hot(topk_indices[:, 0], E).sum(0) * (E / T)  # losses.py 14-15: hot_value E / T
    l_loss = np.sum(scores.sum(0) * ce) / T  # losses.py 16-18
    if bpr:  # 155-157, compute_sorted_location (138-141)
        order = np.argsort(-scores.max(1), kind="stable")

        def location(x):
            sorted_cumsum = (np.cumsum(x[order], 0) - 1) * x[order]
            return sorted_cumsum[np.argsort(order)]
    else:
        def location(x):  # fast_cumsum_sub_one
            return np.cumsum(x, 0) - 1
    locations1 = location(masks_se[0])  # 161
    locations_s = [(locations1 * masks_se[0]).sum(1)]  # 163
    acc_base = np.zeros(E)
    for j in range(1, k):  # 165-171
        acc_base = acc_base + masks_se[j - 1].sum(0)
        locations2 = location(masks_se[j]) + acc_base
        locations_s.append((locations2 * masks_se[j]).sum(1))
    if k > 1:  # 173-175
        denom_s = np.maximum(sum(gates_s), np.finfo(F64).eps)
        gates_s = [x / denom_s for x in gates_s]
    samples_per_expert = (T + E - 1) // E  # 188
    capacity = k * int(cf * samples_per_expert)  # 190
    combine = np.zeros((T, E, capacity))
    for j in range(k):
        keep = locations_s[j] < capacity
        t = np.flatnonzero(keep)
        combine[t, indices_s[j][t], locations_s[j][t].astype(int)] = gates_s[j][t]
    return _outcome(one_hot(topk_indices, E).max(axis=1), combine, l_loss, capacity)


def _topk_case(case: str, T: int, E: int, k: int) -> np.ndarray:
    """Tutel and MegaBlocks select with torch.topk, whose order among equal values is
    undocumented: their tie case keeps the K-th and (K+1)-th scores apart (crosscheck.py)."""
    return tied_logits(T, E, F64, k=k) if case == "ties" else CASES[case](T, E, F64)


@pytest.mark.parametrize("case", list(CASES))
def test_tutel(case):
    for k, cf in [(1, 1.0), (2, 1.0), (2, 0.5), (3, 1.5)]:
        logits = _topk_case(case, 40, 8, k)
        assert_same(ours("tutel", logits, k, cf), tutel_extract_critical(logits, k, cf), F64,
                    "tutel")
        assert_same(ours("tutel", logits, k, cf, priority="score"),
                    tutel_extract_critical(logits, k, cf, bpr=True), F64, "tutel")


# ----------------------------------------------------------------------------- MegaBlocks

def megablocks_moe(logits: np.ndarray, k: int, cf: float) -> Outcome:
    """router.py LearnedRouter.forward (92-: softmax, _top_k at 87, no weight normalisation by
    default); moe.py ParallelMLP.expert_capacity (133-136), indices_and_bins (152-183: sort of the
    flat t*K+j expert ids, histogram, inclusive cumsum), load_balancing_loss (138-150);
    kernels.py _binned_copy (326-): slot c of expert e takes sorted entry bins[e-1] + c if c <
    its count, within the capacity grid."""
    T, E = logits.shape
    scores = softmax(logits)
    top_experts = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # _top_k
    expert_weights = np.take_along_axis(scores, top_experts, 1)
    flat = top_experts.reshape(-1)  # [T * K], index t*K + j
    indices = np.argsort(flat, kind="stable")  # ops.sort: radix sort, stable
    tokens_per_expert = np.bincount(flat, minlength=E)  # ops.histogram
    bins = np.cumsum(tokens_per_expert)  # ops.inclusive_cumsum
    capacity = int(cf * (k * T * 1 / E))  # expert_capacity, expert-parallel world size 1
    combine = np.zeros((T, E, capacity))
    for e in range(E):
        start = bins[e - 1] if e > 0 else 0
        for c in range(min(capacity, bins[e] - start)):
            index_a = indices[start + c]
            combine[index_a // k, e, c] = expert_weights.reshape(-1)[index_a]
    scale = E / (T * k)  # load_balancing_loss
    aux = scale * np.dot(tokens_per_expert.astype(F64), scores.mean(0))
    return _outcome(one_hot(top_experts, E).max(axis=1), combine, aux, capacity)


@pytest.mark.parametrize("case", list(CASES))
def test_megablocks(case):
    for k, cf in [(1, 1.0), (2, 1.0), (2, 0.6), (4, 1.3)]:
        logits = _topk_case(case, 40, 8, k)
        assert_same(ours("megablocks", logits, k, cf), megablocks_moe(logits, k, cf), F64,
                    "megablocks")


def test_capacity_rules():
    """Each preset's capacity against its system's formula, over token counts and factors."""
    E = 8
    for T in (7, 40, 52, 100, 333):
        logits = CASES["random"](T, E, F64)
        for cf in (0.5, 1.0, 1.25, 1.1, 2.0):
            assert ours("switch", logits, 1, cf).capacity == min(mtf_capacity(T, E, cf), T)
            assert ours("flaxformer", logits, 2, cf).capacity == min(flax_capacity(T, E, cf), T)
            for k in (1, 2):
                tutel = k * int(cf * ((T + E - 1) // E))
                assert ours("tutel", logits, k, cf).capacity == min(tutel, T)
                assert ours("megablocks", logits, k, cf).capacity == min(int(cf * (k * T / E)), T)
                assert ours("nllb-moe", logits, 2, 1.0).capacity == min(2 * math.ceil(T / E), T)
