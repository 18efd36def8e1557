"""The NumPy backend: the reference slot assignment (priority.py, capacity.py) and the indexed
formulation (indexed.py), behind the same interface and argument checks as the C backend."""
from __future__ import annotations

import contextlib

import numpy as np

from .. import _checks
from ..capacity import expert_load, keep_by_score, slot_owner
from ..expert_forms import EXPERT_FORMS
from ..experts import bias_relu, relu_backward
from ..indexed import combine_indexed, dispatch_indexed, gate_grad_indexed
from ..losses import expert_prob_sum
from ..priority import position_in_expert
from ..router import softmax_lse
from ..slots import assign_slots_ordered
from ..topk import top_k


class NumpyBackend:
    """The reference: the cumsum slot assignment and the NumPy indexed formulation."""
    name = "numpy"

    def softmax_lse(self, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (probs `[T, E]`, logsumexp `[T]`) of `[T, E]` logits (router.softmax_lse); on a
        C-contiguous copy when they are not, so the row sums add in one order whatever the layout."""
        logits = _checks.float_arg("router_logits", router_logits, (None, None))
        return softmax_lse(np.ascontiguousarray(logits))

    def top_k(self, score: np.ndarray, k: int, bias: np.ndarray | None = None,
              probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """-> (expert_index `<int64>[T, K]` of score + bias, expert_load `<int64>[E]`,
        expert_prob_sum(probs) `[E]` or None)."""
        score, k, bias, probs = _checks.top_k_args(score, k, bias, probs)
        expert_index = top_k(score if bias is None else score + bias, k)  # [T, K]
        return (expert_index, expert_load(expert_index, score.shape[1]),
                None if probs is None else expert_prob_sum(probs))

    def assign_slots(self, expert_index: np.ndarray, token_order: np.ndarray | None,
                     num_experts: int, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (position `<int64>[T, K]`, -1 where dropped; slot_owner `<int64>[E, C]`;
        expert_load `<int64>[E]` before dropping). token_order None means 0, 1, ..., T-1."""
        expert_index, token_order, E, C = _checks.slot_args(expert_index, token_order, num_experts,
                                                             capacity)
        if token_order is None:
            token_order = np.arange(expert_index.shape[0], dtype=np.int64)
        position = position_in_expert(expert_index, E, token_order)  # [T, K]
        position = np.where(position < C, position, -1)  # [T, K], capacity.drop's rule
        return position, slot_owner(expert_index, position, C, E), expert_load(expert_index, E)

    def assign_slots_ordered(self, expert_index: np.ndarray, order: np.ndarray, num_experts: int,
                             capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (position, slot_owner, expert_load) with pairs claiming slots in `order`
        (slots.assign_slots_ordered)."""
        return assign_slots_ordered(*_checks.ordered_slot_args(expert_index, order, num_experts,
                                                               capacity))

    def keep_by_score(self, expert_index: np.ndarray, order: np.ndarray, score: np.ndarray,
                      num_experts: int, capacity: int) -> np.ndarray:
        """-> keep `<bool>[T, K]`: each expert's C best-scoring pairs of `order`, ties to the
        earlier pair (capacity.keep_by_score)."""
        index, pairs, E, C = _checks.ordered_slot_args(expert_index, order, num_experts, capacity)
        score = _checks.float_array("score", score, shape=index.shape)
        return keep_by_score(index, pairs, score, E, C)

    def between_blas_calls(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # NumPy's own loops run on one thread anyway

    def dispatch(self, x: np.ndarray, slot_owner: np.ndarray, k: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
        return dispatch_indexed(*_checks.dispatch_args(x, slot_owner, k, weight))

    def combine(self, expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                weight: np.ndarray | None = None) -> np.ndarray:
        expert_out, expert_index, position = _checks.pair_args(expert_out, expert_index, position)
        if weight is not None:
            weight = _checks.float_arg("weight", weight, position.shape)
        return combine_indexed(expert_out, expert_index, position, weight)

    def bias_relu(self, a: np.ndarray, bias: np.ndarray) -> None:
        """a = relu(a + bias) in place, a `[n, H]`, bias `[H]` (experts.bias_relu)."""
        bias_relu(*_checks.epilogue_args("a", a, "bias", bias, "bias"))

    def relu_backward(self, grad: np.ndarray, hidden: np.ndarray) -> None:
        """grad *= hidden > 0 in place, both `[n, H]` (experts.relu_backward)."""
        relu_backward(*_checks.epilogue_args("grad", grad, "hidden", hidden, "hidden"))

    def gate_grad(self, dy: np.ndarray, expert_out: np.ndarray, expert_index: np.ndarray,
                  position: np.ndarray) -> np.ndarray:
        expert_out, expert_index, position = _checks.pair_args(expert_out, expert_index, position)
        dy = _checks.float_arg("dy", dy, (position.shape[0], expert_out.shape[2]))
        return gate_grad_indexed(dy, expert_out, expert_index, position)

    def form_forward(self, form: str, a: np.ndarray, out: np.ndarray, *args: float,
                     bias: np.ndarray | None = None) -> None:
        """out = h `[n, H]` of expert form `form` from a `[n, W]` (expert_forms.<form>); bias
        `[W]`: a += bias first, in place."""
        if bias is not None:  # checked in full before a is changed
            a, bias = _checks.epilogue_args("a", a, "bias", bias, "bias")
        form, a, out, _, args = _checks.form_args(form, a, out, None, args)
        if bias is not None:
            _checks.no_overlap("out", out, "bias", bias)
            a += bias
        fwd = EXPERT_FORMS[form].forward
        assert fwd is not None
        fwd(a, out, *args)

    def form_backward(self, form: str, dh: np.ndarray, a: np.ndarray, out: np.ndarray,
                      *args: float) -> None:
        """out = da `[n, W]` from dh `[n, H]` and the forward's a (expert_forms.<form>_backward)."""
        form, a, out, dh2, args = _checks.form_args(form, a, out, dh, args)
        bwd = EXPERT_FORMS[form].backward
        assert bwd is not None
        bwd(dh2, a, out, *args)
