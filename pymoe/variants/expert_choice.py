"""Steps 3-9 variant: expert-choice routing (Zhou et al. 2022, arXiv:2202.09368; flaxformer's
ExpertsChooseMaskedRouter).

Instead of each token choosing K experts, each expert chooses its C best tokens by score, so
every expert is exactly full and a token gets anywhere from 0 to E experts. pymoe represents
it with the same arrays as token choice, K = E pairs per token: expert_index `[T, E]` lists
every expert for every token (best first), and position is -1 for the pairs an expert did not
take. slot_owner, dispatch and combine then work unchanged. The flaxformer docs warn that it
is not causal (an expert's choice of token t depends on later tokens): encoders only.
"""
from __future__ import annotations

import numpy as np

from ..capacity import keep_by_score
from ..priority import pair_order


def expert_choice_pairs(router_logits: np.ndarray) -> np.ndarray:
    """Every token's experts, best first: expert_index `<int64>[T, E]` (ties to the lower
    expert), the K = E candidate pairs that experts choose from."""
    return np.argsort(-router_logits, axis=-1, kind="stable").astype(np.int64)  # [T, E]


def expert_choice_keep(probs: np.ndarray, expert_index: np.ndarray,
                       capacity: int) -> np.ndarray:
    """Each expert takes its top-C tokens by score.

    Args:
        probs: `[T, E]` router scores; expert_index: `<int64>[T, E]` from expert_choice_pairs;
        capacity: C <= T.
    Returns:
        keep `<bool>[T, E]`: pair (t, j) is kept iff token t is among the C highest-scoring tokens
        of expert expert_index[t, j], ties to the lower token. This is drop policy "probs" over
        the token-major order of all T*E pairs (capacity.keep_by_score), so C and CUDA reuse it.
    Which tokens an expert takes passes no gradient; the gates of the taken pairs are the scores
    (topk.gates over all E), and their gradient flows as for token choice.
    """
    T, E = expert_index.shape
    score = np.take_along_axis(probs, expert_index, axis=-1)  # [T, E]
    order = pair_order(np.arange(T, dtype=np.int64), E, "token")  # [T*E] token-major
    return keep_by_score(expert_index, order, score, probs.shape[1], capacity)
