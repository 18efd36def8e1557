"""The parts of issue 25 together: a padding mask with router replay, and the global-batch loss
and the load tracker reading a real route(..., token_mask=) (their own tests emulate the mask)."""
from __future__ import annotations

import numpy as np
import pytest

import pymoe
from pymoe.losses import GlobalLoadBalance
from pymoe.monitor import LoadTracker

MODES = ("absent", "routed", "counted")


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(24, 8)).astype(np.float32)
    mask = rng.random(24) < 0.7
    return logits, mask


def _same(a: pymoe.Routing, b: pymoe.Routing) -> None:
    for name in ("expert_index", "position", "gate", "kept", "expert_load", "token_order"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.capacity, a.aux_loss, a.z_loss) == (b.capacity, b.aux_loss, b.z_loss)


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("padding", MODES)
def test_replaying_a_masked_routings_selection_is_bit_identical(padding, backend, c_backend):
    logits, mask = _case()
    kw = dict(token_mask=mask, padding=padding, backend=backend)
    r = pymoe.route(logits, 2, 1.0, **kw)
    _same(pymoe.route(logits, 2, 1.0, replay=r.expert_index, **kw), r)


def test_replay_under_a_mask_moves_only_the_replayed_tokens():
    """A selection recorded under other logits: the real rows route as route(L[m], replay=r[m])."""
    logits, mask = _case(1)
    other = pymoe.route(logits + np.float32(0.7) * _case(2)[0], 2, None).expert_index
    r = pymoe.route(logits, 2, 1.0, token_mask=mask, replay=other)
    alone = pymoe.route(logits[mask], 2, 1.0, replay=other[mask])
    np.testing.assert_array_equal(r.expert_index[mask], other[mask])
    np.testing.assert_array_equal(r.position[mask], alone.position)
    np.testing.assert_array_equal(r.gate[mask], alone.gate)
    assert r.aux_loss == alone.aux_loss


@pytest.mark.parametrize("padding", MODES)
def test_global_balance_and_tracker_read_a_real_mask(padding):
    logits, mask = _case(3)
    r = pymoe.route(logits, 2, None, token_mask=mask, padding=padding)
    real = pymoe.route(logits[mask], 2, None)
    g, h = GlobalLoadBalance(8, 2), GlobalLoadBalance(8, 2)
    g.update(r)
    h.update(real)
    np.testing.assert_array_equal(g.tokens_per_expert, h.tokens_per_expert)
    assert g.loss(r) == pytest.approx(h.loss(real), rel=1e-6)
    d = g.loss_backward(r, 1.0)
    np.testing.assert_array_equal(d[~mask], 0.0)
    tracker = LoadTracker(8)
    s = tracker.record(r, step=0)
    assert s.tokens == int(mask.sum()) and s.padding == int((~mask).sum())
    np.testing.assert_array_equal(s.load, real.expert_load)
