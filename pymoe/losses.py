"""Step 12: the auxiliary losses that keep the router healthy, with their gradients."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks
from .capacity import expert_load
from .router import logsumexp, softmax_backward
from .variants.scores import elementwise_scores_backward


def load_balancing_loss(probs: np.ndarray, expert_index: np.ndarray) -> float:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), top-K form.

    Args:
        probs: `[T, E]` router probabilities; expert_index: `<int>[T, K]`.
    Returns:
        aux_loss = E * sum_e f_e * P_e, where f_e = (number of the T*K assignments that chose e,
        before dropping) / (T*K) and P_e = mean_t probs[t, e]. It is 1.0 when routing is perfectly
        balanced (f_e = P_e = 1/E) and at most E. f is piecewise constant, so the gradient flows
        through P only. This normalisation (all K choices counted, divided by T*K) is Megatron-Core's
        and MegaBlocks'; Mesh-TF, DeepSpeed top-2 and Tutel count first choices only (also balanced
        at 1), flaxformer counts "any of K" and HF Mixtral/Qwen count all K without dividing by K
        (both balanced at K), HF also pooling every layer (docs/conventions.md, section 8).
        0.0 when T = 0.
    """
    T, E = probs.shape
    K = expert_index.shape[1]
    return load_balancing_loss_from_sums(expert_load(expert_index, E), expert_prob_sum(probs), T, K)


def expert_prob_sum(probs: np.ndarray) -> np.ndarray:
    """`[E]` sum over tokens of probs `[T, E]`, added in token order (the order the C core uses).

    probs.sum(axis=0) adds row after row for E >= 2; a single column NumPy sums pairwise, so
    that case goes through cumsum, which adds in order.
    """
    if probs.shape[1] == 1 and probs.shape[0]:
        return np.cumsum(probs, axis=0)[-1]  # [1]
    return probs.sum(axis=0)  # [E]


def load_balancing_loss_from_sums(expert_load: np.ndarray, prob_sum: np.ndarray, num_tokens: int,
                                  k: int) -> float:
    """load_balancing_loss from its sufficient statistics, as a backend's top_k returns them.

    Args:
        expert_load: `<int64>[E]` assignments per expert; prob_sum: `[E]` = expert_prob_sum(probs).
    Returns:
        E * sum_e (expert_load[e] / (T*K)) * (prob_sum[e] / T): the same bits as
        load_balancing_loss when prob_sum has them (probs.mean(axis=0) is prob_sum / T).
    """
    T, E = num_tokens, expert_load.shape[0]
    if T == 0:
        return 0.0
    f = expert_load / (T * k)  # [E]
    P = prob_sum / T  # [E]
    return float(E * np.dot(f, P))


def load_balancing_loss_backward(probs: np.ndarray, expert_index: np.ndarray,
                                 coef: float = 1.0) -> np.ndarray:
    """d (coef * aux_loss) / d probs `[T, E]`: coef * E * f_e / T in every row."""
    T, E = probs.shape
    K = expert_index.shape[1]
    if T == 0:
        return np.zeros_like(probs)
    f = expert_load(expert_index, E) / (T * K)  # [E]
    return np.broadcast_to((coef * E / T) * f, (T, E)).astype(probs.dtype)  # [T, E]


LOAD_BALANCING = ("switch", "k_scaled", "sequence", "first_choice")


def aux_loss_scores(scores: np.ndarray, score: str) -> np.ndarray:
    """The `[T, E]` probabilities the load-balancing loss reads: softmax probabilities as they
    are; sigmoid scores divided by their sum over experts (DeepSeek-V3, Megatron-Core), so that
    each row is a distribution either way."""
    if score == "softmax":
        return scores
    return scores / scores.sum(axis=-1, keepdims=True)


def aux_loss_scores_backward(dprobs: np.ndarray, scores: np.ndarray, score: str) -> np.ndarray:
    """Backward of aux_loss_scores: d scores `[T, E]`; for sigmoid, q = s / S gives
    ds_i = (dq_i - sum_e dq_e q_e) / S."""
    if score == "softmax":
        return dprobs
    s = scores.sum(axis=-1, keepdims=True)  # [T, 1]
    q = scores / s
    return (dprobs - (dprobs * q).sum(axis=-1, keepdims=True)) / s


def balance_loss(probs: np.ndarray, expert_index: np.ndarray, kind: str = "switch",
                 sequence_length: int | None = None) -> float:
    """The load-balancing loss as each system scales it.

    Args:
        probs: `[T, E]` (aux_loss_scores); expert_index: `<int>[T, K]`.
        kind: "switch": load_balancing_loss (Switch, Megatron-Core, MegaBlocks; balanced at 1).
            "k_scaled": K times that (HF Mixtral / Qwen-MoE count all K choices without dividing
            by K; balanced at K). "sequence": load_balancing_loss of each block of
            sequence_length consecutive tokens, averaged over the blocks (DeepSeek-V3's
            sequence-wise loss, Megatron-Core `seq_aux_loss`; T must be a multiple).
            "first_choice": load_balancing_loss counting each token's first choice only (Mesh-TF,
            DeepSpeed top-1/top-2, Tutel `gshard_loss`; balanced at 1).
    """
    K = expert_index.shape[1]
    if kind == "first_choice":
        return load_balancing_loss(probs, expert_index[:, :1])
    if kind == "k_scaled":
        return K * load_balancing_loss(probs, expert_index)
    if kind == "sequence":
        if sequence_length is None:
            raise ValueError("sequence_length: required for the per-sequence balance loss")
        S = sequence_length
        n = probs.shape[0] // S
        return float(np.mean([load_balancing_loss(probs[i * S:(i + 1) * S],
                                                  expert_index[i * S:(i + 1) * S])
                              for i in range(n)])) if n else 0.0
    return load_balancing_loss(probs, expert_index)


def balance_loss_backward(probs: np.ndarray, expert_index: np.ndarray, coef: float,
                          kind: str = "switch", sequence_length: int | None = None) -> np.ndarray:
    """d (coef * balance_loss) / d probs `[T, E]`."""
    K = expert_index.shape[1]
    if kind == "first_choice":
        return load_balancing_loss_backward(probs, expert_index[:, :1], coef)
    if kind == "k_scaled":
        return load_balancing_loss_backward(probs, expert_index, coef * K)
    if kind == "sequence":
        if sequence_length is None:
            raise ValueError("sequence_length: required for the per-sequence balance loss")
        S = sequence_length
        n = probs.shape[0] // S
        d = np.zeros_like(probs)
        for i in range(n):
            rows = slice(i * S, (i + 1) * S)
            d[rows] = load_balancing_loss_backward(probs[rows], expert_index[rows], coef / n)
        return d
    return load_balancing_loss_backward(probs, expert_index, coef)


def router_z_loss(router_logits: np.ndarray) -> float:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean_t logsumexp(router_logits[t])^2.

    It penalises large logits, which keeps the router's softmax out of float32 trouble. 0.0 when T = 0.
    """
    return router_z_loss_from_lse(logsumexp(router_logits))


def router_z_loss_from_lse(lse: np.ndarray) -> float:
    """router_z_loss from logsumexp(router_logits) `[T]` (route() gets it from the softmax pass)."""
    return float(np.mean(lse ** 2)) if lse.shape[0] else 0.0


def router_z_loss_backward(router_logits: np.ndarray, probs: np.ndarray,
                           coef: float = 1.0) -> np.ndarray:
    """d (coef * z_loss) / d router_logits `[T, E]` = coef * 2 * lse_t * probs[t, e] / T."""
    T = router_logits.shape[0]
    if T == 0:
        return np.zeros_like(router_logits)
    lse = logsumexp(router_logits)  # [T]
    return (coef * 2.0 / T) * lse[:, None] * probs  # [T, E]


class GlobalLoadBalance:
    """The load-balancing loss with f counted over the global batch (Qiu et al. 2025, "Demons in
    the Detail", arXiv 2501.11873; Megatron-Core's `global_aux_loss`).

    The Switch loss E * sum_e f_e P_e (load_balancing_loss) computed on one micro-batch asks
    every micro-batch, often a few sequences of one domain, to spread its own tokens evenly
    over the experts; that fights specialisation (a code batch may rightly prefer the code
    experts). Qwen's global-batch balance keeps P_e local (the mean router probability over the
    current micro-batch's tokens, which carries the gradient) but counts f_e, the share of
    assignments to expert e, over every micro-batch of the optimizer step so far and over every
    data-parallel rank: the loss then only asks the whole batch to be balanced. f is piecewise
    constant, so its being global changes the value and the gradient's size, not where the
    gradient flows.

    Use, per layer: after each micro-batch's route(), `update(routing)` (counts it in), then
    `loss(routing)` and `loss_backward(routing, coef)` (added to route_backward's d logits);
    `reset()` after the optimizer step. After updates with micro-batches 1..m (the current one
    included, on every rank when comm is given):

        f_e = N_e / (K * N),   N_e = assignments to expert e, N = tokens, summed over 1..m;
        loss(r) = E * sum_e f_e * P_e,   P_e = mean over r's tokens of its aux-loss scores
        (softmax probabilities; sigmoid scores divided by their row sum, aux_loss_scores).

    With one micro-batch and one rank it is load_balancing_loss (routing.aux_loss of the switch
    form). Assignments are routing.expert_index before dropping, as routing.aux_loss counts them.
    A routing carrying a `token_mask` (<bool>[T], True = a real token) counts and averages only
    its real tokens.

    Megatron-Core 0.16.1 (`TopKRouter._apply_global_aux_loss`) keeps the sum of the counts and
    the number of micro-batches m, and divides the mean count by the *current* micro-batch's
    token count T_m: f_e = (N_e / m) / (K * T_m). With micro-batches of equal size that is the f
    above; with unequal sizes it over-weights the counts when the current micro-batch is small
    and under-weights them when it is large (Megatron-LM #7213 calls it a bug). pymoe weights each
    micro-batch by its tokens, so the same tokens give the same f in any split. Under data
    parallelism Megatron divides the local probability sum by the global token count, so its
    per-rank value is this one divided by the number of ranks (pymoe's per-rank loss is the one
    to average over ranks like the task loss, as Qwen writes it).

    Args:
        num_experts: E. k: K, choices per token.
        comm: an mpi4py communicator (e.g. MPI.COMM_WORLD) over the data-parallel ranks, or None
            (one process). update() then Allreduces the integer counts (exact, any rank order);
            every rank must call update() the same number of times.
    """

    def __init__(self, num_experts: int, k: int, comm: Any = None) -> None:
        self.num_experts = _checks.integer("num_experts", num_experts, low=1)
        self.k = _checks.integer("k", k, low=1, high=self.num_experts)
        if comm is not None and not callable(getattr(comm, "Allreduce", None)):
            raise TypeError(f"comm: expected an mpi4py communicator (with Allreduce) or None, "
                            f"got {type(comm).__name__}")
        self.comm = comm
        self.reset()

    def reset(self) -> None:
        """Forget every count (at an optimizer step)."""
        self.tokens_per_expert = np.zeros(self.num_experts, np.int64)  # <int64>[E] N_e
        self.num_tokens = 0  # N
        self.micro_batches = 0  # m

    def _check(self, routing: Any) -> tuple[np.ndarray, np.ndarray]:
        """(aux-loss scores [T_real, E], expert_index [T_real, K]) of routing's real tokens."""
        # routing.py imports this module, so a Routing is recognised by what it holds
        if not all(hasattr(routing, a) for a in ("probs", "expert_index", "options")):
            raise TypeError(f"routing: expected a pymoe.Routing from route(), got "
                            f"{type(routing).__name__}")
        if routing.num_experts != self.num_experts or routing.k != self.k:
            raise ValueError(f"routing: expected E={self.num_experts}, K={self.k} (this "
                             f"GlobalLoadBalance's), got E={routing.num_experts}, K={routing.k}")
        if routing.options.selection == "experts":
            raise ValueError("routing: expert-choice routing (selection='experts') has no "
                             "load-balancing loss")
        if getattr(routing, "selected", None) is not None:
            raise ValueError("routing: a ragged selection (top_p, selection='relu') is not "
                             "supported by GlobalLoadBalance (it counts all K pairs per token)")
        probs = aux_loss_scores(routing.probs, routing.options.score)  # [T, E]
        index = routing.expert_index  # [T, K]
        mask = getattr(routing, "token_mask", None)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)  # [T]
            probs, index = probs[mask], index[mask]
        return probs, index

    def update(self, routing: Any) -> None:
        """Count routing's assignments per expert and its tokens into the global batch (and,
        with comm, every rank's: one Allreduce of E + 1 integers)."""
        probs, index = self._check(routing)
        local = np.empty(self.num_experts + 1, np.int64)  # [E + 1]: N_e, then T
        local[:-1] = expert_load(index, self.num_experts)
        local[-1] = probs.shape[0]
        total = local
        if self.comm is not None:
            total = np.empty_like(local)
            self.comm.Allreduce(local, total)  # MPI.SUM, the default op
        self.tokens_per_expert = self.tokens_per_expert + total[:-1]
        self.num_tokens += int(total[-1])
        self.micro_batches += 1

    @property
    def fraction(self) -> np.ndarray:
        """`<float64>[E]` f_e = N_e / (K N) over the global batch so far (0 before any token)."""
        if self.num_tokens == 0:
            return np.zeros(self.num_experts)
        return self.tokens_per_expert / (self.k * self.num_tokens)

    def loss(self, routing: Any) -> float:
        """E * sum_e f_e * P_e for this micro-batch's P (0.0 when it has no real token).
        Call update(routing) first: Megatron counts the current micro-batch in, and so does this."""
        probs, _ = self._check(routing)
        T = probs.shape[0]
        if T == 0:
            return 0.0
        return float(self.num_experts * np.dot(self.fraction, expert_prob_sum(probs) / T))

    def loss_backward(self, routing: Any, coef: float = 1.0) -> np.ndarray:
        """d (coef * loss(routing)) / d routing.router_logits `[T, E]` (a fresh array in the
        score dtype, 0 in padding rows); add it to route_backward's result. d loss / d P_e =
        E f_e, so every real row of d scores is coef * E * f_e / T, then through the score."""
        coef = _checks.nonnegative_finite("coef", coef)
        probs, _ = self._check(routing)
        scores, opts = np.asarray(routing.probs), routing.options  # [T_all, E]
        T = probs.shape[0]
        dprobs = np.zeros_like(scores)  # [T_all, E]
        if T == 0:
            return dprobs
        row = ((coef * self.num_experts / T) * self.fraction).astype(scores.dtype)  # [E]
        mask = getattr(routing, "token_mask", None)
        if mask is None:
            dprobs[:] = row
        else:
            dprobs[np.asarray(mask, dtype=bool)] = row
        dscores = aux_loss_scores_backward(dprobs, scores, opts.score)  # [T_all, E]
        if opts.score == "softmax":
            return softmax_backward(dscores, scores)
        return elementwise_scores_backward(dscores, np.asarray(routing.router_logits), scores,
                                           opts.score)
