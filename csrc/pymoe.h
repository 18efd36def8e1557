/* pymoe C core: the hot loops of MoE routing (slot assignment, dispatch, combine, and their
 * backward), the C twin of pymoe/indexed.py. Every function here computes exactly what the NumPy
 * reference defines; the tests check it, never the other way round.
 *
 * Legend (shared with the Python docstrings and the CUDA kernels):
 *   T tokens, D model dim, E experts, K choices per token, C expert capacity.
 * Arrays are dense row-major (C-contiguous). Index arrays are int64.
 *   expert_index [T, K]  expert chosen by token t as its j-th choice, in [0, E)
 *   position     [T, K]  slot of (t, j) inside its expert, in [0, C), or -1 when dropped
 *   slot_owner   [E, C]  t*K + j of the pair in slot (e, c), or -1 when the slot is empty
 *   x [T, D], expert_in / expert_out [E, C, D], y [T, D], gate [T, K]
 *
 * Conventions: outputs first, inputs next, sizes last (llm.c). Every function returns PYMOE_OK or
 * a negative error code after checking its own sizes and indices, so no input, however wrong,
 * makes it read or write out of bounds. Outputs are fully overwritten (never accumulated).
 * Parallel loops give each output row to exactly one thread and sum in a fixed order, so results
 * are bitwise identical for any number of OpenMP threads.
 *
 * Everything between the cdef markers is also read by csrc/build_cffi.py as the cffi cdef. */
#ifndef PYMOE_H
#define PYMOE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
#define PYMOE_OK 0
#define PYMOE_ERR_SIZE -1      /* a size is negative, or a product of sizes overflows int64 */
#define PYMOE_ERR_NULL -2      /* a NULL pointer for a non-empty array */
#define PYMOE_ERR_EXPERT -3    /* an expert_index entry outside [0, E) */
#define PYMOE_ERR_POSITION -4  /* a position entry outside [-1, C) */
#define PYMOE_ERR_OWNER -5     /* a slot_owner entry outside [-1, T*K) */
#define PYMOE_ERR_ORDER -6     /* token_order is not a permutation of 0..T-1 */
#define PYMOE_ERR_NOMEM -7     /* scratch allocation failed */
#define PYMOE_ERR_NAN -8       /* a score or bias entry is NaN */
#define PYMOE_ERR_PAIRS -9     /* a pair order entry outside [0, T*K), a repeat, or N > T*K */
/* The message of an error code above ("unknown error code" for any other int). */
const char *pymoe_error_string(int code);

/* Slot assignment with choice-major priority and capacity drop (pymoe.priority + capacity).
 * Pairs claim slots in the order: choice j = 0 of token_order[0], ..., token_order[T-1], then
 * choice j = 1 of the same tokens, and so on; the n-th pair to claim expert e gets slot n if
 * n < C and is dropped (position -1) otherwise. token_order may be NULL for 0, 1, ..., T-1.
 * Out: position [T, K], slot_owner [E, C], expert_load [E] (pairs per expert before dropping).
 * In: expert_index [T, K], token_order [T] or NULL. Serial: O(T*K + E*C). */
int pymoe_assign_slots(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                       const int64_t *expert_index, const int64_t *token_order,
                       int64_t T, int64_t K, int64_t E, int64_t C);

/* Slot assignment over an explicit pair order: every slot rule of pymoe.slots (token-major
 * priority, drop policy "probs", expert choice, second-expert policies) reduces to this plus
 * pymoe_keep_by_score. The N pairs order[0..N) (flat ids t*K + j, distinct) claim slots in that
 * order; the n-th listed pair to claim expert e gets slot n if n < C, else position -1; pairs not
 * listed get -1. Out: position [T, K], slot_owner [E, C], expert_load [E] (listed pairs per
 * expert before dropping). In: expert_index [T, K], order [N]. Serial: O(T*K + E*C). */
int pymoe_assign_slots_ordered(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                               const int64_t *expert_index, const int64_t *order, int64_t N,
                               int64_t T, int64_t K, int64_t E, int64_t C);

/* Per-expert keep selection (drop policy "probs", expert choice): keep[t*K + j] = 1 iff pair
 * (t, j) is listed in order[0..N) and is among the C listed pairs of its expert with the highest
 * score[t*K + j], ties to the pair listed earlier; 0 otherwise. Scores are compared as doubles
 * (a float32 score converts exactly). Out: keep [T, K] (one byte each). In: expert_index [T, K],
 * order [N], score [T, K]. One thread per expert (a stable merge sort of its pairs), so the
 * result does not depend on the thread count. O(T*K log(T*K)). */
int pymoe_keep_by_score(uint8_t *keep, const int64_t *expert_index, const int64_t *order,
                        const double *score, int64_t N, int64_t T, int64_t K, int64_t E,
                        int64_t C);

/* The float operations are written once, in PYMOE_FLOAT_OPS(REAL, SFX) below, and declared
 * twice: for float as name_f32 and for double as name_f64 (cffi's cdef takes no macros, so
 * csrc/build_cffi.py expands them the same way, with pymoe/backend/cdef_macros.py). Expanded, for example:
 *   int pymoe_dispatch_f32(float *expert_in, const float *x, const int64_t *slot_owner,
 *                          const float *weight, int64_t T, int64_t K, int64_t E,
 *                          int64_t C, int64_t D);
 *   int pymoe_combine_f64(double *y, const double *expert_out, const int64_t *expert_index,
 *                         const int64_t *position, const double *weight,
 *                         int64_t T, int64_t K, int64_t E, int64_t C, int64_t D);
 * Every name they declare (for grep; Python's c_backend.FLOAT_OPS lists the same):
 * pymoe_top_k_f32, pymoe_top_k_f64, pymoe_dispatch_f32, pymoe_dispatch_f64, pymoe_combine_f32,
 * pymoe_combine_f64, pymoe_gate_grad_f32, pymoe_gate_grad_f64, pymoe_dispatch_naive_f32,
 * pymoe_dispatch_naive_f64, pymoe_combine_naive_f32, pymoe_combine_naive_f64,
 * pymoe_gate_grad_naive_f32, pymoe_gate_grad_naive_f64, pymoe_bias_relu_f32,
 * pymoe_bias_relu_f64, pymoe_relu_backward_f32 and pymoe_relu_backward_f64; and for each expert
 * form F of gelu, relu2, swiglu, geglu, swiglu_oai, swiglu_clamped, swiglu_clamp_after and
 * swiglu_softcap: pymoe_F_f32, pymoe_F_f64, pymoe_F_backward_f32 and pymoe_F_backward_f64.
 *
 * Top-K selection (pymoe.topk.top_k, with the sums pymoe.losses.load_balancing_loss needs).
 * expert_index[t, :] = the K experts with the largest v[t, e] = score[t, e] + bias[e] (the sum
 * rounded in REAL; v = score when bias is NULL), in decreasing v; equal values go to the lower
 * expert index. These are the same integers as NumPy's stable argsort of -v for any
 * non-NaN input; -0.0 and 0.0 are equal; a NaN anywhere returns PYMOE_ERR_NAN.
 * expert_load[e] = how many of the T*K entries of expert_index equal e (NULL: not computed).
 * prob_sum[e] = sum over t of probs[t, e], added in REAL in token order t = 0, 1, ..., T-1 from 0
 * (bit for bit pymoe.losses.expert_prob_sum); NULL: not computed (probs may then be NULL too).
 * Out: expert_index [T, K], expert_load [E], prob_sum [E]. In: score [T, E], bias [E] or NULL,
 * probs [T, E] or NULL. 0 <= K <= E. Every output depends only on the inputs, never on the
 * thread count: one thread per token row, and each column sum in one fixed order.
 *
 * Dispatch: expert_in[e, c, :] = w * x[t, :] for the pair (t, j) = slot_owner[e, c] / K, % K,
 * with w = weight[t, j] (or 1 when weight is NULL); empty slots are zeroed.
 * Backward: d_x = combine(d_expert_in, weight) and d_weight = gate_grad(d_expert_in, x).
 * Out: expert_in [E, C, D]. In: x [T, D], slot_owner [E, C], weight [T, K] or NULL.
 * Bytes moved: read (filled slots) * D, write E * C * D elements. One thread per slot row.
 *
 * Combine: y[t, :] = sum over kept j, in order j = 0..K-1, of w * expert_out[e_tj, p_tj, :]
 * with w = weight[t, j] (or 1 when weight is NULL); rows of fully dropped tokens are zero.
 * Backward: d_expert_out = dispatch(dy, weight) and d_weight = gate_grad(dy, expert_out).
 * Dispatch's backward is this with weight = NULL.
 * Out: y [T, D]. In: expert_out [E, C, D], expert_index [T, K], position [T, K],
 * weight [T, K] or NULL. Bytes moved: read (kept pairs) * D, write T * D elements.
 * One thread per token.
 *
 * Gate gradient: dgate[t, j] = <dy[t, :], expert_out[e_tj, p_tj, :]> for kept pairs, 0 for
 * dropped ones. Out: dgate [T, K]. In: dy [T, D], expert_out [E, C, D], expert_index, position.
 * One thread per token; each dot product sums in a fixed order.
 *
 * Each of the three row operations also comes as name_naive_f32 / _f64 with the same
 * signature: the plain loops the tuned versions are held to, exported so that the tests can
 * hold the tuned code to them and the benchmark can show what tuning bought.
 *
 * The expert FFN's relu epilogues (pymoe.experts), in place on one expert's [rows, cols] block,
 * one pass each: bias_relu: a = max(a + bias, 0) (a: the first matmul's output, bias [cols]);
 * relu_backward: grad *= (hidden > 0), hidden = the forward's relu output.
 *
 * The expert forms (pymoe.expert_forms, the same bits), one pass each over one expert's rows:
 * pymoe_F: out = h [rows, H] from a [rows, W]; pymoe_F_backward: out = da [rows, W] from
 * dh [rows, H] and the forward's a [rows, W]; pymoe_F_bias: a += bias [W] in place, then pymoe_F,
 * in one pass. W = 2H for the gated forms (a = [gate | up]), H
 * for gelu and relu2. The float arguments (limit, alpha, caps) are the form's, in REAL. */
#define PYMOE_FORM0(REAL, SFX, NAME) \
    int pymoe_##NAME##SFX(REAL *out, const REAL *a, int64_t rows, int64_t H); \
    int pymoe_##NAME##_bias##SFX(REAL *out, REAL *a, const REAL *bias, int64_t rows, int64_t H); \
    int pymoe_##NAME##_backward##SFX(REAL *out, const REAL *dh, const REAL *a, \
                                     int64_t rows, int64_t H);
#define PYMOE_FORM1(REAL, SFX, NAME, P1) \
    int pymoe_##NAME##SFX(REAL *out, const REAL *a, REAL P1, int64_t rows, int64_t H); \
    int pymoe_##NAME##_bias##SFX(REAL *out, REAL *a, const REAL *bias, REAL P1, int64_t rows, \
                                 int64_t H); \
    int pymoe_##NAME##_backward##SFX(REAL *out, const REAL *dh, const REAL *a, REAL P1, \
                                     int64_t rows, int64_t H);
#define PYMOE_FORM2(REAL, SFX, NAME, P1, P2) \
    int pymoe_##NAME##SFX(REAL *out, const REAL *a, REAL P1, REAL P2, int64_t rows, int64_t H); \
    int pymoe_##NAME##_bias##SFX(REAL *out, REAL *a, const REAL *bias, REAL P1, REAL P2, \
                                 int64_t rows, int64_t H); \
    int pymoe_##NAME##_backward##SFX(REAL *out, const REAL *dh, const REAL *a, REAL P1, REAL P2, \
                                     int64_t rows, int64_t H);
#define PYMOE_FORMS(REAL, SFX) \
    PYMOE_FORM0(REAL, SFX, gelu) \
    PYMOE_FORM0(REAL, SFX, relu2) \
    PYMOE_FORM0(REAL, SFX, silu) \
    PYMOE_FORM0(REAL, SFX, swiglu) \
    PYMOE_FORM0(REAL, SFX, geglu) \
    PYMOE_FORM2(REAL, SFX, swiglu_oai, limit, alpha) \
    PYMOE_FORM1(REAL, SFX, swiglu_clamped, limit) \
    PYMOE_FORM1(REAL, SFX, swiglu_clamp_after, limit) \
    PYMOE_FORM2(REAL, SFX, swiglu_softcap, gate_cap, up_cap)
#define PYMOE_ROW_OPS(REAL, SFX) \
    int pymoe_dispatch##SFX(REAL *expert_in, const REAL *x, const int64_t *slot_owner, \
                            const REAL *weight, int64_t T, int64_t K, int64_t E, \
                            int64_t C, int64_t D); \
    int pymoe_combine##SFX(REAL *y, const REAL *expert_out, const int64_t *expert_index, \
                           const int64_t *position, const REAL *weight, \
                           int64_t T, int64_t K, int64_t E, int64_t C, int64_t D); \
    int pymoe_gate_grad##SFX(REAL *dgate, const REAL *dy, const REAL *expert_out, \
                             const int64_t *expert_index, const int64_t *position, \
                             int64_t T, int64_t K, int64_t E, int64_t C, int64_t D);
#define PYMOE_FLOAT_OPS(REAL, SFX) \
    int pymoe_top_k##SFX(int64_t *expert_index, int64_t *expert_load, REAL *prob_sum, \
                         const REAL *score, const REAL *bias, const REAL *probs, \
                         int64_t T, int64_t K, int64_t E); \
    PYMOE_ROW_OPS(REAL, SFX) \
    PYMOE_ROW_OPS(REAL, _naive##SFX) \
    int pymoe_bias_relu##SFX(REAL *a, const REAL *bias, int64_t rows, int64_t cols); \
    int pymoe_relu_backward##SFX(REAL *grad, const REAL *hidden, int64_t rows, int64_t cols); \
    PYMOE_FORMS(REAL, SFX)
PYMOE_FLOAT_OPS(float, _f32)
PYMOE_FLOAT_OPS(double, _f64)

/* Threads: 1 when built without OpenMP. The count is process-wide (not per calling thread, as
 * omp_set_num_threads is): every parallel region of the core uses pymoe_get_max_threads().
 * set_num_threads(n <= 0) restores the default; n above PYMOE_MAX_THREADS or the OpenMP thread
 * limit returns PYMOE_ERR_SIZE and changes nothing (libgomp aborts the process when it cannot
 * create the threads it was told to). */
#define PYMOE_MAX_THREADS 1024
int pymoe_openmp_enabled(void);
int pymoe_get_max_threads(void);
int pymoe_thread_limit(void);
int pymoe_set_num_threads(int n);
/* pymoe_one_thread_here(1) ... pymoe_one_thread_here(0) brackets code whose C calls, made from the
 * calling OS thread only, run on one thread whatever the count (MoELayer's steps between its BLAS
 * calls); the brackets nest. Other threads' calls keep the count. */
int pymoe_one_thread_here(int enter);
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif /* PYMOE_H */
