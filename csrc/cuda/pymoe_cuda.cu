// Host side of the pymoe CUDA kernels (API in pymoe_cuda.h): size checks, launch shapes, errors.
// The same file builds the GPU library (nvcc) and its CPU emulation (g++ -DPYMOE_EMULATE with
// emu/cuda_emu.h), so the launch code the tests run is the launch code a GPU user runs.
#include <limits.h>
#include <stdint.h>

#include "pymoe_cuda.h"

#ifdef PYMOE_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#define PYMOE_LAUNCH(kernel, grid, block, stream, ...) \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define PYMOE_LAUNCH_BARRIER PYMOE_LAUNCH
#endif

#include "../internal.h"  // check_sizes, size_mul, REQUIRE and PYMOE_ERR_*, shared with the C core
#include "kernels.cuh"

namespace {

int g_block = 256;               // threads per block, every kernel
const int64_t kMaxGrid = 65535;  // blocks of the grid-stride kernels: enough to fill any GPU

int launched() { return (int)cudaGetLastError(); }

unsigned grid_for(int64_t n) { return (unsigned)(n < 1 ? 1 : n < kMaxGrid ? n : kMaxGrid); }

// 16-byte vector moves need D * size to be a multiple of 16 and 16-byte aligned base pointers.
template <typename REAL>
int vec_ok(int64_t D, const void *a, const void *b) {
    return (D * (int64_t)sizeof(REAL)) % 16 == 0 && ((uintptr_t)a & 15u) == 0 &&
           ((uintptr_t)b & 15u) == 0;
}

template <typename REAL>
int router(REAL *probs, int64_t *expert_index, REAL *gate, const REAL *logits, int64_t T,
           int64_t E, int64_t K, int normalize, int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, 0, 0);
    int64_t TE;
    if (err) return err;
    if (E < 1 || K < 1 || K > E || !size_mul(T, E, &TE)) return PYMOE_ERR_SIZE;
    REQUIRE(probs, TE); REQUIRE(logits, TE); REQUIRE(expert_index, s.TK); REQUIRE(gate, s.TK);
    int64_t rows = PYMOE_ROUTER_SMEM_BYTES / (E * (int64_t)sizeof(REAL));  // rows per block
    if (rows < 1) return PYMOE_ERR_SIZE;  // E too large for the shared-memory tile
    if (rows > g_block) rows = g_block;
    if (T == 0) return 0;
    const int64_t grid = (T + rows - 1) / rows;
    if (grid > INT_MAX) return PYMOE_ERR_SIZE;
    (void)status;  // the router has no indices to check
    PYMOE_LAUNCH_BARRIER(router_kernel<REAL>, (unsigned)grid, g_block, (cudaStream_t)stream,
                         probs, expert_index, gate, logits, T, E, K, normalize, rows);
    return launched();
}

template <typename REAL>
int dispatch(REAL *expert_in, const REAL *x, const REAL *weight, const int64_t *slot_owner,
             int64_t T, int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, D);
    if (err) return err;
    REQUIRE(expert_in, s.ECD); REQUIRE(x, s.TD); REQUIRE(slot_owner, s.EC);
    if (s.EC == 0) return 0;
    PYMOE_LAUNCH(dispatch_kernel<REAL>, grid_for(s.EC), g_block, (cudaStream_t)stream, expert_in,
                 x, weight, slot_owner, T, K, s.EC, D, vec_ok<REAL>(D, expert_in, x), status);
    return launched();
}

template <typename REAL>
int combine(REAL *y, const REAL *expert_out, const REAL *weight, const int64_t *expert_index,
            const int64_t *position, int64_t T, int64_t K, int64_t E, int64_t C, int64_t D,
            int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, D);
    if (err) return err;
    REQUIRE(y, s.TD); REQUIRE(expert_out, s.ECD);
    REQUIRE(expert_index, s.TK); REQUIRE(position, s.TK);
    if (T == 0) return 0;
    PYMOE_LAUNCH(combine_kernel<REAL>, grid_for(T), g_block, (cudaStream_t)stream, y, expert_out,
                 weight, expert_index, position, T, K, E, C, D, vec_ok<REAL>(D, y, expert_out),
                 status);
    return launched();
}

template <typename REAL>
int gate_grad(REAL *dgate, const REAL *dy, const REAL *expert_out, const int64_t *expert_index,
              const int64_t *position, int64_t T, int64_t K, int64_t E, int64_t C, int64_t D,
              int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, D);
    if (err) return err;
    REQUIRE(dgate, s.TK); REQUIRE(dy, s.TD); REQUIRE(expert_out, s.ECD);
    REQUIRE(expert_index, s.TK); REQUIRE(position, s.TK);
    if (s.TK == 0) return 0;
    PYMOE_LAUNCH_BARRIER(gate_grad_kernel<REAL>, grid_for(T), g_block, (cudaStream_t)stream,
                         dgate, dy, expert_out, expert_index, position, T, K, E, C, D, status);
    return launched();
}

}  // namespace

extern "C" {

int pymoe_cuda_device_count(int *count) {
    if (count == NULL) return PYMOE_ERR_NULL;
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) *count = 0;  // some runtimes leave garbage behind on failure
    return (int)e;
}

const char *pymoe_cuda_error_name(int code) {
    switch (code) {
        case PYMOE_ERR_SIZE: return "PYMOE_ERR_SIZE";
        case PYMOE_ERR_NULL: return "PYMOE_ERR_NULL";
        default: return code < 0 ? "PYMOE_ERR_UNKNOWN" : cudaGetErrorName((cudaError_t)code);
    }
}

const char *pymoe_cuda_error_string(int code) {
    switch (code) {
        case PYMOE_ERR_SIZE:
            return "a size is negative, inconsistent (K > E, E too large for the router), or "
                   "overflows int64";
        case PYMOE_ERR_NULL: return "a NULL pointer was passed for a non-empty array";
        default: return code < 0 ? "unknown pymoe error" : cudaGetErrorString((cudaError_t)code);
    }
}

int pymoe_cuda_emulated(void) {
#ifdef PYMOE_EMULATE
    return 1;
#else
    return 0;
#endif
}

int pymoe_cuda_status_new(int **status) {
    if (status == NULL) return PYMOE_ERR_NULL;
    *status = NULL;
    cudaError_t e = cudaMalloc((void **)status, sizeof(int));
    if (e == cudaSuccess) e = cudaMemset(*status, 0, sizeof(int));
    return (int)e;
}

int pymoe_cuda_status_take(int *status, int *host_value, void *stream) {
    if (status == NULL || host_value == NULL) return PYMOE_ERR_NULL;
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e = cudaMemcpyAsync(host_value, status, sizeof(int), cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    if (e == cudaSuccess) e = cudaMemsetAsync(status, 0, sizeof(int), s);
    return (int)e;
}

int pymoe_cuda_status_free(int *status) { return (int)cudaFree(status); }

int pymoe_cuda_copy_to_host(void *host, const void *device, int64_t nbytes, void *stream) {
    if (nbytes < 0) return PYMOE_ERR_SIZE;
    if (nbytes == 0) return 0;
    if (host == NULL || device == NULL) return PYMOE_ERR_NULL;
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e = cudaMemcpyAsync(host, device, (size_t)nbytes, cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    return (int)e;
}

int pymoe_cuda_set_block_size(int threads) {
    if (threads < 32 || threads > PYMOE_MAX_BLOCK || (threads & (threads - 1)) != 0)
        return PYMOE_ERR_SIZE;
    g_block = threads;
    return 0;
}

int pymoe_cuda_get_block_size(void) { return g_block; }

int pymoe_cuda_router_f32(float *probs, int64_t *expert_index, float *gate, const float *logits,
                          int64_t T, int64_t E, int64_t K, int normalize, int *status,
                          void *stream) {
    return router<float>(probs, expert_index, gate, logits, T, E, K, normalize, status, stream);
}
int pymoe_cuda_router_f64(double *probs, int64_t *expert_index, double *gate,
                          const double *logits, int64_t T, int64_t E, int64_t K, int normalize,
                          int *status, void *stream) {
    return router<double>(probs, expert_index, gate, logits, T, E, K, normalize, status, stream);
}

int pymoe_cuda_assign_slots(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                            const int64_t *expert_index, const int64_t *token_order, int64_t T,
                            int64_t K, int64_t E, int64_t C, int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, 0);
    if (err) return err;
    if (E >= INT_MAX) return PYMOE_ERR_SIZE;
    REQUIRE(position, s.TK); REQUIRE(expert_index, s.TK);
    REQUIRE(slot_owner, s.EC); REQUIRE(expert_load, E);
    if (s.TK > 0) {  // -1 everywhere first: a pair no block numbers (bad index) stays dropped
        cudaError_t e = cudaMemsetAsync(position, 0xff, (size_t)s.TK * sizeof(int64_t),
                                        (cudaStream_t)stream);
        if (e != cudaSuccess) return (int)e;
    }
    PYMOE_LAUNCH_BARRIER(slots_kernel, (unsigned)(E + 1), g_block, (cudaStream_t)stream,
                         position, slot_owner, expert_load, expert_index, token_order, T, K, E, C,
                         status);
    return launched();
}

int pymoe_cuda_dispatch_f32(float *expert_in, const float *x, const float *weight,
                            const int64_t *slot_owner, int64_t T, int64_t K, int64_t E, int64_t C,
                            int64_t D, int *status, void *stream) {
    return dispatch<float>(expert_in, x, weight, slot_owner, T, K, E, C, D, status, stream);
}
int pymoe_cuda_dispatch_f64(double *expert_in, const double *x, const double *weight,
                            const int64_t *slot_owner, int64_t T, int64_t K, int64_t E, int64_t C,
                            int64_t D, int *status, void *stream) {
    return dispatch<double>(expert_in, x, weight, slot_owner, T, K, E, C, D, status, stream);
}

int pymoe_cuda_combine_f32(float *y, const float *expert_out, const float *weight,
                           const int64_t *expert_index, const int64_t *position, int64_t T,
                           int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream) {
    return combine<float>(y, expert_out, weight, expert_index, position, T, K, E, C, D, status,
                          stream);
}
int pymoe_cuda_combine_f64(double *y, const double *expert_out, const double *weight,
                           const int64_t *expert_index, const int64_t *position, int64_t T,
                           int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream) {
    return combine<double>(y, expert_out, weight, expert_index, position, T, K, E, C, D, status,
                           stream);
}

int pymoe_cuda_gate_grad_f32(float *dgate, const float *dy, const float *expert_out,
                             const int64_t *expert_index, const int64_t *position, int64_t T,
                             int64_t K, int64_t E, int64_t C, int64_t D, int *status,
                             void *stream) {
    return gate_grad<float>(dgate, dy, expert_out, expert_index, position, T, K, E, C, D, status,
                            stream);
}
int pymoe_cuda_gate_grad_f64(double *dgate, const double *dy, const double *expert_out,
                             const int64_t *expert_index, const int64_t *position, int64_t T,
                             int64_t K, int64_t E, int64_t C, int64_t D, int *status,
                             void *stream) {
    return gate_grad<double>(dgate, dy, expert_out, expert_index, position, T, K, E, C, D, status,
                             stream);
}

}  // extern "C"
