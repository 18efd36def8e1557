/* pymoe CUDA host API: plain C functions taking device pointers and a stream.
 *
 * Legend and layouts as in csrc/pymoe.h (T tokens, K choices, E experts, C capacity, D model dim;
 * sizes always in that order; row-major; int64 indices). Each function has the name, argument
 * order and meaning of its C twin (pymoe_assign_slots, pymoe_top_k_f32, pymoe_dispatch_f32, ...)
 * with the prefix pymoe_cuda_, plus a status word and a stream; it checks sizes and pointers on
 * the host, launches kernels from kernels.cuh on `stream` (a cudaStream_t; NULL for the default
 * stream) and returns:
 *     0          launched (the work may still be running: kernels are asynchronous),
 *     < 0        PYMOE_ERR_* from csrc/pymoe.h (bad sizes or NULL pointers; nothing launched),
 *     > 0        a cudaError_t of this call's own launches (pymoe_cuda_error_name says which);
 *                errors other libraries left pending are neither reported nor cleared.
 * Index contents are checked on the device: an invalid entry is treated as dropped/empty and a bit
 * (PYMOE_BAD_*, kernels.cuh) is OR-ed into *status, a device int on the current device, normally
 * the one pymoe_cuda_status gives for (current device, stream); status may be NULL to skip it.
 * No input makes a kernel access memory out of bounds. Host-thread safe: the block size is a
 * per-thread setting and the status table is locked.
 *
 * Build: `python csrc/cuda/build.py` (nvcc; see that file), which also copies this header next to
 * the library, where the Python loader (pymoe/backend/cuda_backend.py) reads the declarations below. */
#ifndef PYMOE_CUDA_H
#define PYMOE_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
/* Status bits the kernels OR into the status word: each stands for the C core's error code of the
 * same name (PYMOE_ERR_EXPERT, ...), whose message pymoe_cuda_error_string gives. */
#define PYMOE_BAD_EXPERT 1    /* an expert_index entry outside [0, E) */
#define PYMOE_BAD_POSITION 2  /* a position entry outside [-1, C) */
#define PYMOE_BAD_OWNER 4     /* a slot_owner entry outside [-1, T*K) */
#define PYMOE_BAD_ORDER 8     /* token_order is not a permutation of 0..T-1 */
#define PYMOE_BAD_NAN 16      /* a NaN score, logit or bias */
#define PYMOE_BAD_PAIRS 32    /* a pair order entry outside [0, T*K), or a repeat */
/* The PYMOE_ERR_* code of status bit `bit` (0 for a value that is not one status bit). */
int pymoe_cuda_status_code(int bit);
/* Devices: *count = visible devices (0 on error); get/set the calling thread's current device.
 * Each returns a cudaError_t (0 = success). */
int pymoe_cuda_device_count(int *count);
int pymoe_cuda_get_device(int *device);
int pymoe_cuda_set_device(int device);
/* Names and messages for any code these functions return (negative: pymoe's own, with the C
 * core's messages, pymoe_error_string; positive: cudaError_t). */
const char *pymoe_cuda_error_name(int code);
const char *pymoe_cuda_error_string(int code);
/* 1 when this library is the CPU emulation built by `build.py --emulate`. */
int pymoe_cuda_emulated(void);
/* The status word of (current device, stream): allocated on that device and zeroed with
 * cudaMemsetAsync on `stream` at first use, then kept. _take copies it to *host_value (waiting
 * for the stream: a synchronisation) and zeroes it again on the stream when it was set. */
int pymoe_cuda_status(int **status, void *stream);
int pymoe_cuda_status_take(int *host_value, void *stream);
/* Threads per block for every kernel launched from the calling host thread: a power of two in
 * [32, 1024] (default 256). Returns 0, or PYMOE_ERR_SIZE for an invalid value. */
int pymoe_cuda_set_block_size(int threads);
int pymoe_cuda_get_block_size(void);

/* Slot assignment, the twins of C's three slot functions (pymoe.h), with the same arguments
 * and integers; pymoe.slots defines them. Index entries are checked on the device: a bad expert
 * sets PYMOE_BAD_EXPERT, a token_order that is not a permutation PYMOE_BAD_ORDER, an order entry
 * outside [0, T*K) or a repeated one PYMOE_BAD_PAIRS. E <= 12288 and T*K < 2^31 (the counting
 * sort's shared counters); N > T*K returns PYMOE_ERR_PAIRS.
 * assign_slots: choice-major priority (all j = 0 pairs in token_order, then j = 1, ...;
 *   token_order [T] or NULL for 0..T-1); the n-th pair to claim expert e gets slot n if n < C,
 *   else it is dropped. Out: position [T, K], slot_owner [E, C], expert_load [E] (pairs per
 *   expert before dropping). In: expert_index [T, K], token_order [T] or NULL.
 * assign_slots_ordered: the same over an explicit order of N distinct pair ids t*K + j
 *   (token-major priority, a kept subsequence, ...); unlisted pairs get position -1 and are not
 *   counted in expert_load. In: expert_index [T, K], order [N].
 * keep_by_score: keep [T, K] (bytes) = 1 for the C listed pairs of each expert with the highest
 *   score [T, K] (doubles), ties to the pair listed earlier; 0 elsewhere. A NaN score among an
 *   over-capacity expert's pairs sets PYMOE_BAD_NAN. */
int pymoe_cuda_assign_slots(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                            const int64_t *expert_index, const int64_t *token_order, int64_t T,
                            int64_t K, int64_t E, int64_t C, int *status, void *stream);
int pymoe_cuda_assign_slots_ordered(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                                    const int64_t *expert_index, const int64_t *order, int64_t N,
                                    int64_t T, int64_t K, int64_t E, int64_t C, int *status,
                                    void *stream);
int pymoe_cuda_keep_by_score(uint8_t *keep, const int64_t *expert_index, const int64_t *order,
                             const double *score, int64_t N, int64_t T, int64_t K, int64_t E,
                             int64_t C, int *status, void *stream);

/* The float operations are written once, in PYMOE_CUDA_FLOAT_OPS(REAL, SFX) below, and declared
 * for float as name_f32 and for double as name_f64 (the loader expands them for cffi with
 * pymoe/backend/cdef_macros.py). Expanded, for example:
 *   int pymoe_cuda_dispatch_f32(float *expert_in, const float *x, const int64_t *slot_owner,
 *                               const float *weight, int64_t T, int64_t K, int64_t E,
 *                               int64_t C, int64_t D, int *status, void *stream);
 * Every name they declare (for grep; Python's cuda_backend.FLOAT_OPS lists the same):
 * pymoe_cuda_softmax_top_k_f32, pymoe_cuda_softmax_top_k_f64, pymoe_cuda_top_k_f32,
 * pymoe_cuda_top_k_f64, pymoe_cuda_dispatch_f32, pymoe_cuda_dispatch_f64, pymoe_cuda_combine_f32,
 * pymoe_cuda_combine_f64, pymoe_cuda_gate_grad_f32 and pymoe_cuda_gate_grad_f64.
 *
 * softmax_top_k: steps 2-4 of pymoe.route fused: softmax over E (pymoe.router.softmax), the
 * top-K by logit (pymoe.topk.top_k, ties to the lower expert) and the gates, raw or renormalised
 * (pymoe.topk.gates). Out: probs [T, E], expert_index [T, K], gate [T, K]. In: router_logits
 * [T, E]. 1 <= K <= E <= 512. A NaN logit sets PYMOE_BAD_NAN.
 *
 * top_k: the twin of C's pymoe_top_k: expert_index[t] = the K largest
 * v[t, e] = score[t, e] + bias[e] (bias NULL: v = score), ties to the lower expert;
 * expert_load[e] = picks of e (NULL: not computed); prob_sum[e] = sum over t = 0..T-1 of
 * probs[t, e] in that order (NULL: not computed). 0 <= K <= E <= 512. NaN: PYMOE_BAD_NAN.
 *
 * dispatch: expert_in [E, C, D] from x [T, D], slot_owner [E, C], weight [T, K] or NULL.
 * combine: y [T, D] from expert_out [E, C, D], expert_index, position, weight [T, K] or NULL.
 *   K <= 1024.
 * gate_grad: dgate [T, K] = <dy[t], expert_out[e_tj, p_tj]> for kept pairs, 0 for dropped.
 *   K <= 1024. */
#define PYMOE_CUDA_FLOAT_OPS(REAL, SFX) \
    int pymoe_cuda_softmax_top_k##SFX(REAL *probs, int64_t *expert_index, REAL *gate, \
                                      const REAL *router_logits, int64_t T, int64_t K, \
                                      int64_t E, int normalize, int *status, void *stream); \
    int pymoe_cuda_top_k##SFX(int64_t *expert_index, int64_t *expert_load, REAL *prob_sum, \
                              const REAL *score, const REAL *bias, const REAL *probs, int64_t T, \
                              int64_t K, int64_t E, int *status, void *stream); \
    int pymoe_cuda_dispatch##SFX(REAL *expert_in, const REAL *x, const int64_t *slot_owner, \
                                 const REAL *weight, int64_t T, int64_t K, int64_t E, \
                                 int64_t C, int64_t D, int *status, void *stream); \
    int pymoe_cuda_combine##SFX(REAL *y, const REAL *expert_out, const int64_t *expert_index, \
                                const int64_t *position, const REAL *weight, int64_t T, \
                                int64_t K, int64_t E, int64_t C, int64_t D, int *status, \
                                void *stream); \
    int pymoe_cuda_gate_grad##SFX(REAL *dgate, const REAL *dy, const REAL *expert_out, \
                                  const int64_t *expert_index, const int64_t *position, \
                                  int64_t T, int64_t K, int64_t E, int64_t C, int64_t D, \
                                  int *status, void *stream);
PYMOE_CUDA_FLOAT_OPS(float, _f32)
PYMOE_CUDA_FLOAT_OPS(double, _f64)
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif /* PYMOE_CUDA_H */
