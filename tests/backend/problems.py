"""Routing problems the operations' test files share: `routed` for the C core's sweeps (sizes,
dtype, priority, ties, and the reference's routing), `problem` for the CUDA kernels' (the same,
plus a block size)."""
import warnings

import numpy as np

import pymoe
from props import st

SMALL_BLOCKS = [32, 64, 128, 256]  # every example; 512 and 1024 in the *_large_blocks sweeps


@st.composite
def problem(draw, blocks=tuple(SMALL_BLOCKS)):
    T = draw(st.integers(0, 48))
    E = draw(st.integers(1, 40))  # past 32: more than one value per lane in the warp router
    K = draw(st.integers(1, min(E, 6)))
    D = draw(st.sampled_from([1, 3, 4, 8, 13, 64, 70]))  # ragged and vector-friendly widths
    cf = draw(st.one_of(st.none(), st.floats(0.05, 2.5)))
    priority = draw(st.sampled_from(["choice", "score"]))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    block = draw(st.sampled_from(list(blocks)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    logits = rng.normal(size=(T, E))
    if draw(st.booleans()):
        logits = np.round(logits)  # ties between experts and between tokens
    return logits.astype(dtype), K, cf, priority, D, block, rng


def ref_routing(logits, K, cf, priority, normalize=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize with K=1 warns; the values still count
        return pymoe.route(logits, K, cf, priority=priority, normalize=normalize)


@st.composite
def routed(draw):
    """A routing problem: sizes, dtype, priority, and the reference's routing of it."""
    T = draw(st.integers(0, 70))
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    D = draw(st.sampled_from([1, 3, 4, 7, 16, 33, 64, 130]))  # ragged and aligned widths
    cf = draw(st.one_of(st.none(), st.floats(0.05, 2.5)))
    priority = draw(st.sampled_from(["choice", "score"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, E))
    if draw(st.booleans()):  # many ties: everyone likes the same experts
        logits = np.round(logits)
    r = pymoe.route(logits, K, cf, priority=priority)
    x = rng.normal(size=(T, D)).astype(dtype)
    return r, x, rng
