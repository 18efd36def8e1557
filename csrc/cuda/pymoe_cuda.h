/* pymoe CUDA host API: plain C functions taking device pointers and a stream.
 *
 * Legend and layouts as in csrc/pymoe.h (T tokens, D model dim, E experts, K choices, C capacity;
 * row-major; int64 indices). Each function checks its sizes and pointers on the host, launches
 * kernels from kernels.cuh on `stream` (a cudaStream_t; NULL for the default stream) and returns:
 *     0          launched (the work may still be running: kernels are asynchronous),
 *     < 0        PYMOE_ERR_* from csrc/pymoe.h (bad sizes or NULL pointers; nothing launched),
 *     > 0        a cudaError_t from the launch (pymoe_cuda_error_name says which).
 * Index contents are checked on the device: an invalid entry is treated as dropped/empty and a bit
 * (PYMOE_BAD_*, kernels.cuh) is OR-ed into *status, a device int that is zero before the call and
 * read after it (pymoe_cuda_status_new/take manage one; status may be NULL to skip reporting).
 * No input makes a kernel access memory out of bounds.
 *
 * Build: `python csrc/cuda/build.py` (nvcc; see that file), which also copies this header next to
 * the library, where the Python loader (pymoe/cuda_backend.py) reads the declarations below. */
#ifndef PYMOE_CUDA_H
#define PYMOE_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
/* Device query: *count = visible devices (0 on error); returns a cudaError_t (0 = success). */
int pymoe_cuda_device_count(int *count);
/* Names for any code these functions return (negative: pymoe's own, positive: cudaError_t). */
const char *pymoe_cuda_error_name(int code);
const char *pymoe_cuda_error_string(int code);
/* 1 when this library is the CPU emulation built by `build.py --emulate`. */
int pymoe_cuda_emulated(void);
/* A status word in device memory for callers without an allocator of their own: _new allocates
 * and zeroes one; _take copies it to *host_value (synchronising the stream) and zeroes it again;
 * _free releases it. Each returns a cudaError_t. */
int pymoe_cuda_status_new(int **status);
int pymoe_cuda_status_take(int *status, int *host_value, void *stream);
int pymoe_cuda_status_free(int *status);
/* Copy nbytes from device to host memory, synchronously on the stream (small index arrays that
 * the host checks, such as a token order). Returns a cudaError_t. */
int pymoe_cuda_copy_to_host(void *host, const void *device, int64_t nbytes, void *stream);
/* Threads per block for every kernel: a power of two in [32, 1024] (default 256). Returns 0, or
 * PYMOE_ERR_SIZE for an invalid value. Tests validate every kernel at several block sizes. */
int pymoe_cuda_set_block_size(int threads);
int pymoe_cuda_get_block_size(void);

/* Router: softmax over E and top-K by logit (ties to the lower expert), gates raw or renormalised.
 * Out: probs [T, E], expert_index [T, K], gate [T, K]. In: logits [T, E]. */
int pymoe_cuda_router_f32(float *probs, int64_t *expert_index, float *gate, const float *logits,
                          int64_t T, int64_t E, int64_t K, int normalize, int *status, void *stream);
int pymoe_cuda_router_f64(double *probs, int64_t *expert_index, double *gate, const double *logits,
                          int64_t T, int64_t E, int64_t K, int normalize, int *status, void *stream);

/* Slot assignment with choice-major priority and capacity drop (token_order NULL: 0..T-1).
 * Out: position [T, K], slot_owner [E, C], expert_load [E]. In: expert_index [T, K], token_order [T].
 * token_order must be a permutation: out-of-range entries are reported (PYMOE_BAD_ORDER),
 * repeated ones are not detected on the device (the Python wrapper checks). */
int pymoe_cuda_assign_slots(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                            const int64_t *expert_index, const int64_t *token_order, int64_t T,
                            int64_t K, int64_t E, int64_t C, int *status, void *stream);

/* Dispatch: expert_in [E, C, D] from x [T, D], weight [T, K] or NULL, slot_owner [E, C]. */
int pymoe_cuda_dispatch_f32(float *expert_in, const float *x, const float *weight,
                            const int64_t *slot_owner, int64_t T, int64_t K, int64_t E, int64_t C,
                            int64_t D, int *status, void *stream);
int pymoe_cuda_dispatch_f64(double *expert_in, const double *x, const double *weight,
                            const int64_t *slot_owner, int64_t T, int64_t K, int64_t E, int64_t C,
                            int64_t D, int *status, void *stream);

/* Combine: y [T, D] from expert_out [E, C, D], weight [T, K] or NULL, expert_index, position. */
int pymoe_cuda_combine_f32(float *y, const float *expert_out, const float *weight,
                           const int64_t *expert_index, const int64_t *position, int64_t T,
                           int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream);
int pymoe_cuda_combine_f64(double *y, const double *expert_out, const double *weight,
                           const int64_t *expert_index, const int64_t *position, int64_t T,
                           int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream);

/* Gate gradient: dgate [T, K] = <dy[t], expert_out[e_tj, p_tj]> for kept pairs, 0 for dropped. */
int pymoe_cuda_gate_grad_f32(float *dgate, const float *dy, const float *expert_out,
                             const int64_t *expert_index, const int64_t *position, int64_t T,
                             int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream);
int pymoe_cuda_gate_grad_f64(double *dgate, const double *dy, const double *expert_out,
                             const int64_t *expert_index, const int64_t *position, int64_t T,
                             int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream);
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif /* PYMOE_CUDA_H */
