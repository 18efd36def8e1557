// Host side of the pymoe CUDA kernels (API in pymoe_cuda.h): size checks, launch shapes, errors.
// The same file builds the GPU library (nvcc) and its CPU emulation (g++ -DPYMOE_EMULATE with
// emu/cuda_emu.h), so the launch code the tests run is the launch code a GPU user runs.
#include <limits.h>
#include <stdint.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "pymoe_cuda.h"

#ifdef PYMOE_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>

// Launch through cudaLaunchKernelEx, whose return value is this launch's error alone: no
// cudaGetLastError, which would also report (and clear) an error another library left behind.
template <typename... Params, typename... Args>
static cudaError_t launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned block,
                                 size_t smem, cudaStream_t stream, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}
#define PYMOE_LAUNCH(kernel, grid, block, smem, stream, ...) \
    launch_kernel(kernel, (grid), (block), (smem), (stream), __VA_ARGS__)
#define PYMOE_LAUNCH_SYNC PYMOE_LAUNCH
#endif

#include "../internal.h"  // check_sizes, size_mul, REQUIRE and PYMOE_ERR_*, shared with the C core
#include "../errors.c"    // pymoe_error_string: the C core's messages, written once
#include "kernels.cuh"

namespace {

// Threads per block, per host thread: two threads launching with different block sizes (the
// Python context manager `block_size`) cannot see each other's setting.
thread_local int t_block = 256;
const int64_t kMaxGridX = 2147483647;  // gridDim.x limit (y and z are 65535; unused here)

unsigned grid_for(int64_t n) { return (unsigned)(n < 1 ? 1 : n < kMaxGridX ? n : kMaxGridX); }

// Values per lane of the warp router for E experts: 1, 2, 4, 8 or 16 (E <= 512).
int values_per_lane(int64_t E) {
    int npl = 1;
    while (32 * (int64_t)npl < E) npl *= 2;
    return npl;
}

template <typename REAL>
int softmax_top_k(REAL *probs, int64_t *expert_index, REAL *gate, const REAL *router_logits,
                  int64_t T, int64_t K, int64_t E, int normalize, int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, 0, 0);
    int64_t TE;
    if (err) return err;
    if (E < 1 || K < 1 || K > E || E > PYMOE_ROUTER_MAX_E || !size_mul(T, E, &TE))
        return PYMOE_ERR_SIZE;
    REQUIRE(probs, TE); REQUIRE(router_logits, TE); REQUIRE(expert_index, s.TK);
    REQUIRE(gate, s.TK);
    if (T == 0) return 0;
    cudaStream_t st = (cudaStream_t)stream;
#define PYMOE_ROUTER(NPL)                                                                         \
    case NPL: {                                                                                   \
        const int b = t_block < router_max_block<NPL>() ? t_block : router_max_block<NPL>();      \
        return PYMOE_LAUNCH_SYNC((softmax_top_k_kernel<REAL, NPL>),                               \
                                 grid_for((T + b / 32 - 1) / (b / 32)), b, 0, st, probs,          \
                                 expert_index, gate, router_logits, T, K, E, normalize, status);  \
    }
    switch (values_per_lane(E)) {
        PYMOE_ROUTER(1) PYMOE_ROUTER(2) PYMOE_ROUTER(4) PYMOE_ROUTER(8) PYMOE_ROUTER(16)
    }
#undef PYMOE_ROUTER
    return PYMOE_ERR_SIZE;
}

template <typename REAL>
int top_k(int64_t *expert_index, int64_t *expert_load, REAL *prob_sum, const REAL *score,
          const REAL *bias, const REAL *probs, int64_t T, int64_t K, int64_t E, int *status,
          void *stream) {
    int64_t TK, TE;
    if (T < 0 || K < 0 || E < 0 || K > E || E > PYMOE_ROUTER_MAX_E || !size_mul(T, K, &TK) ||
        !size_mul(T, E, &TE))
        return PYMOE_ERR_SIZE;
    REQUIRE(expert_index, TK); REQUIRE(score, TE);
    if (prob_sum != NULL) REQUIRE(probs, TE);
    cudaStream_t st = (cudaStream_t)stream;
    cudaError_t e = cudaSuccess;
    if (expert_load != NULL && E > 0)
        e = cudaMemsetAsync(expert_load, 0, (size_t)E * sizeof(int64_t), st);
    if (e == cudaSuccess && T > 0 && K > 0) {
        unsigned long long *load = reinterpret_cast<unsigned long long *>(expert_load);
#define PYMOE_TOPK(NPL)                                                                           \
    case NPL: {                                                                                   \
        const int b = t_block < router_max_block<NPL>() ? t_block : router_max_block<NPL>();      \
        e = PYMOE_LAUNCH_SYNC((top_k_kernel<REAL, NPL>), grid_for((T + b / 32 - 1) / (b / 32)), b, \
                              0, st, expert_index, load, score, bias, T, K, E, status);           \
        break;                                                                                    \
    }
        switch (values_per_lane(E)) {
            PYMOE_TOPK(1) PYMOE_TOPK(2) PYMOE_TOPK(4) PYMOE_TOPK(8) PYMOE_TOPK(16)
        }
#undef PYMOE_TOPK
    }
    if (e == cudaSuccess && prob_sum != NULL && E > 0)
        e = PYMOE_LAUNCH(column_sum_kernel<REAL>, grid_for((E + t_block - 1) / t_block), t_block,
                         0, st, prob_sum, probs, T, E);
    return (int)e;
}

// The slot kernels' block: the configured size, halved until the per-warp expert counters fit.
int slot_block(int64_t E) {
    int b = t_block;
    while (b > 32 && (int64_t)(b / 32) * E * (int64_t)sizeof(int) > PYMOE_SLOT_SMEM) b /= 2;
    return (int64_t)(b / 32) * E * (int64_t)sizeof(int) <= PYMOE_SLOT_SMEM ? b : 0;
}

// Scratch device memory, stream-ordered (cudaMallocAsync): freed on the stream when done.
struct Scratch {
    cudaStream_t stream;
    void *p = nullptr;
    ~Scratch() {
        if (p) cudaFreeAsync(p, stream);
    }
};

// The counting sort of po's N pairs by expert (kernels.cuh). keep == NULL: the pairs get slots
// (position and slot_owner are set to -1 first; expert_load = pairs per expert). keep != NULL:
// each expert's pairs are listed in priority order and keep_by_score_kernel marks its C best
// by score (keep is zeroed first; position, slot_owner and expert_load are not touched). The
// caller has checked the sizes and pointers.
int sort_pairs(const PairOrder &po, int64_t C, int64_t *position, int64_t *slot_owner,
               int64_t *expert_load, uint8_t *keep, const double *score, int *status,
               void *stream) {
    const int64_t TK = po.T * po.K, E = po.E, N = po.N;
    const int block = slot_block(E);
    const int64_t chunk = (int64_t)block * PYMOE_SLOT_ROUNDS;
    // counters are int: every rank is below N + one chunk <= T*K + one chunk
    if (block == 0 || TK > INT_MAX - chunk) return PYMOE_ERR_SIZE;
    const int64_t chunks = (N + chunk - 1) / chunk;
    cudaStream_t st = (cudaStream_t)stream;
    cudaError_t e = cudaSuccess;
    if (keep != NULL) {
        if (TK > 0) e = cudaMemsetAsync(keep, 0, (size_t)TK, st);
    } else {
        if (TK > 0) e = cudaMemsetAsync(position, 0xff, (size_t)TK * sizeof(int64_t), st);
        if (e == cudaSuccess && E * C > 0)
            e = cudaMemsetAsync(slot_owner, 0xff, (size_t)(E * C) * sizeof(int64_t), st);
        if (e == cudaSuccess && E > 0 && N == 0)
            e = cudaMemsetAsync(expert_load, 0, (size_t)E * sizeof(int64_t), st);
    }
    if (e != cudaSuccess || N == 0 || E == 0) return (int)e;
    // scratch: hist and offset [E x chunks]; with keep also sorted [N] and the load [E]; seen
    // [T] (choice-major: a token per j = 0 pair) or [T*K] (explicit order: a pair each)
    const size_t n_hist = (size_t)(E * chunks), n_sorted = keep ? (size_t)(N + E) : 0;
    const size_t n_seen = (size_t)(po.order ? TK : po.T);
    Scratch scratch{st};
    e = cudaMallocAsync(&scratch.p, (2 * n_hist + n_sorted) * sizeof(int64_t) +
                                        n_seen * sizeof(int), st);
    if (e != cudaSuccess) return (int)e;
    int64_t *hist = (int64_t *)scratch.p, *offset = hist + n_hist, *sorted = offset + n_hist;
    int64_t *load = keep ? sorted + N : expert_load;
    int *seen = (int *)(sorted + n_sorted);
    e = cudaMemsetAsync(seen, 0, n_seen * sizeof(int), st);
    const size_t smem = (size_t)(block / 32) * (size_t)E * sizeof(int);
    if (e == cudaSuccess)
        e = PYMOE_LAUNCH_SYNC(slots_count_kernel, (unsigned)chunks, block, smem, st, hist, seen,
                              po, chunks, status);
    if (e == cudaSuccess)
        e = PYMOE_LAUNCH_SYNC(slots_scan_kernel, 1, t_block, 0, st, offset, load, hist, E,
                              chunks);
    if (e == cudaSuccess)
        e = PYMOE_LAUNCH_SYNC(slots_scatter_kernel, (unsigned)chunks, block, smem, st, position,
                              slot_owner, keep ? sorted : nullptr, offset, po, C, chunks);
    if (e == cudaSuccess && keep)
        e = PYMOE_LAUNCH_SYNC(keep_by_score_kernel, grid_for(E), t_block, 0, st, keep, sorted,
                              offset, load, score, E, C, chunks, status);
    return (int)e;
}

// The checks of the two functions over an explicit pair order: sizes and pointers, and
// N <= T*K (C's check_ordered_args; the index contents are checked by the kernels).
int check_ordered(moe_sizes *s, const int64_t *expert_index, const int64_t *order, int64_t N,
                  int64_t T, int64_t K, int64_t E, int64_t C) {
    int err = check_sizes(s, T, K, E, C, 0);
    if (err) return err;
    REQUIRE(expert_index, s->TK); REQUIRE(order, N);
    return N < 0 || N > s->TK ? PYMOE_ERR_PAIRS : 0;
}

// Threads per row group for the row kernels: enough for one vector per thread per unrolled step
// (about D / (vector width * PYMOE_UNROLL)), a power of two in [32, block], and at least
// block * K / PYMOE_MAX_K so that the block's (row, weight) pairs fit its shared arrays.
template <typename REAL>
int row_group(int64_t D, int64_t K, int block) {
    const int64_t want = (D * (int64_t)sizeof(REAL) + 16 * PYMOE_UNROLL - 1) / (16 * PYMOE_UNROLL);
    int g = 32;
    while (g < block && (g < want || (int64_t)(block / g) * K > PYMOE_MAX_K)) g *= 2;
    return g;
}

template <typename REAL>
int dispatch(REAL *expert_in, const REAL *x, const int64_t *slot_owner, const REAL *weight,
             int64_t T, int64_t K, int64_t E, int64_t C, int64_t D, int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, D);
    if (err) return err;
    REQUIRE(expert_in, s.ECD); REQUIRE(x, s.TD); REQUIRE(slot_owner, s.EC);
    if (s.EC == 0) return 0;
    const int group = row_group<REAL>(D, 1, t_block), rows = t_block / group;
    return PYMOE_LAUNCH(dispatch_kernel<REAL>, grid_for((s.EC + rows - 1) / rows), t_block, 0,
                        (cudaStream_t)stream, expert_in, x, slot_owner, weight, T, K, E, C, D,
                        group, status);
}

// The host side shared by combine and gate_grad, the kernels that read expert rows by
// (expert_index, position): the C core's size and pointer checks (internal.h; the kernels check
// the index entries) and the kernels' limit K <= PYMOE_MAX_K, then launch(sizes) unless there
// are no tokens. out [T, out_cols] is the operation's output.
template <typename Launch>
int pair_kernel(const void *out, int64_t out_cols, const void *expert_out,
                const int64_t *expert_index, const int64_t *position, int64_t T, int64_t K,
                int64_t E, int64_t C, int64_t D, Launch launch) {
    moe_sizes s;
    int err = check_pair_pointers(&s, out, out_cols, expert_out, expert_index, position, T, K, E,
                                  C, D);
    if (err) return err;
    if (K > PYMOE_MAX_K) return PYMOE_ERR_SIZE;
    return T == 0 ? 0 : launch(s);
}

template <typename REAL>
int combine(REAL *y, const REAL *expert_out, const int64_t *expert_index,
            const int64_t *position, const REAL *weight, int64_t T, int64_t K, int64_t E,
            int64_t C, int64_t D, int *status, void *stream) {
    return pair_kernel(y, D, expert_out, expert_index, position, T, K, E, C, D,
                       [&](const moe_sizes &) {
        const int group = row_group<REAL>(D, K, t_block), rows = t_block / group;
        return (int)PYMOE_LAUNCH_SYNC(combine_kernel<REAL>, grid_for((T + rows - 1) / rows),
                                      t_block, 0, (cudaStream_t)stream, y, expert_out,
                                      expert_index, position, weight, T, K, E, C, D, group,
                                      status);
    });
}

template <typename REAL>
int gate_grad(REAL *dgate, const REAL *dy, const REAL *expert_out, const int64_t *expert_index,
              const int64_t *position, int64_t T, int64_t K, int64_t E, int64_t C, int64_t D,
              int *status, void *stream) {
    return pair_kernel(dgate, K, expert_out, expert_index, position, T, K, E, C, D,
                       [&](const moe_sizes &s) {
        REQUIRE(dy, s.TD);
        return (int)PYMOE_LAUNCH_SYNC(gate_grad_kernel<REAL>, grid_for(T), t_block, 0,
                                      (cudaStream_t)stream, dgate, dy, expert_out, expert_index,
                                      position, T, K, E, C, D, status);
    });
}

// One status word per (device, stream): a kernel only ever writes the word of the device it
// runs on, and the clears are ordered with the kernels on their stream.
std::mutex g_status_mutex;
std::map<std::pair<int, uintptr_t>, int *> g_status;

}  // namespace

extern "C" {

int pymoe_cuda_device_count(int *count) {
    if (count == NULL) return PYMOE_ERR_NULL;
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) *count = 0;  // some runtimes leave garbage behind on failure
    return (int)e;
}

int pymoe_cuda_get_device(int *device) {
    if (device == NULL) return PYMOE_ERR_NULL;
    return (int)cudaGetDevice(device);
}

int pymoe_cuda_set_device(int device) { return (int)cudaSetDevice(device); }

const char *pymoe_cuda_error_name(int code) {
    switch (code) {
        case PYMOE_ERR_SIZE: return "PYMOE_ERR_SIZE";
        case PYMOE_ERR_NULL: return "PYMOE_ERR_NULL";
        case PYMOE_ERR_EXPERT: return "PYMOE_ERR_EXPERT";
        case PYMOE_ERR_POSITION: return "PYMOE_ERR_POSITION";
        case PYMOE_ERR_OWNER: return "PYMOE_ERR_OWNER";
        case PYMOE_ERR_ORDER: return "PYMOE_ERR_ORDER";
        case PYMOE_ERR_NOMEM: return "PYMOE_ERR_NOMEM";
        case PYMOE_ERR_NAN: return "PYMOE_ERR_NAN";
        case PYMOE_ERR_PAIRS: return "PYMOE_ERR_PAIRS";
        default: return code < 0 ? "PYMOE_ERR_UNKNOWN" : cudaGetErrorName((cudaError_t)code);
    }
}

const char *pymoe_cuda_error_string(int code) {
    if (code == PYMOE_ERR_SIZE) {  // the C core's message, and the limits only the kernels have
        static const std::string size = std::string(pymoe_error_string(code)) +
            ", or a size passes a CUDA kernel limit (E <= 512 for top-K, E <= 12288 and "
            "T*K < 2^31 for slot assignment, K <= 1024 for combine and gate_grad)";
        return size.c_str();
    }
    return code < 0 ? pymoe_error_string(code) : cudaGetErrorString((cudaError_t)code);
}

int pymoe_cuda_status_code(int bit) {
    switch (bit) {
        case PYMOE_BAD_EXPERT: return PYMOE_ERR_EXPERT;
        case PYMOE_BAD_POSITION: return PYMOE_ERR_POSITION;
        case PYMOE_BAD_OWNER: return PYMOE_ERR_OWNER;
        case PYMOE_BAD_ORDER: return PYMOE_ERR_ORDER;
        case PYMOE_BAD_NAN: return PYMOE_ERR_NAN;
        case PYMOE_BAD_PAIRS: return PYMOE_ERR_PAIRS;
        default: return 0;
    }
}

int pymoe_cuda_emulated(void) {
#ifdef PYMOE_EMULATE
    return 1;
#else
    return 0;
#endif
}

int pymoe_cuda_status(int **status, void *stream) {
    if (status == NULL) return PYMOE_ERR_NULL;
    *status = NULL;
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return (int)e;
    std::lock_guard<std::mutex> lock(g_status_mutex);
    int *&word = g_status[{device, (uintptr_t)stream}];
    if (word == NULL) {
        int *p = NULL;
        e = cudaMalloc((void **)&p, sizeof(int));
        if (e == cudaSuccess) e = cudaMemsetAsync(p, 0, sizeof(int), (cudaStream_t)stream);
        if (e != cudaSuccess) {
            if (p) cudaFree(p);
            g_status.erase({device, (uintptr_t)stream});
            return (int)e;
        }
        word = p;
    }
    *status = word;
    return 0;
}

int pymoe_cuda_status_take(int *host_value, void *stream) {
    if (host_value == NULL) return PYMOE_ERR_NULL;
    *host_value = 0;
    int *word = NULL;
    int err = pymoe_cuda_status(&word, stream);
    if (err) return err;
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e = cudaMemcpyAsync(host_value, word, sizeof(int), cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    if (e == cudaSuccess && *host_value != 0) e = cudaMemsetAsync(word, 0, sizeof(int), s);
    return (int)e;
}

int pymoe_cuda_set_block_size(int threads) {
    if (threads < 32 || threads > PYMOE_MAX_BLOCK || (threads & (threads - 1)) != 0)
        return PYMOE_ERR_SIZE;
    t_block = threads;
    return 0;
}

int pymoe_cuda_get_block_size(void) { return t_block; }

int pymoe_cuda_assign_slots(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                            const int64_t *expert_index, const int64_t *token_order, int64_t T,
                            int64_t K, int64_t E, int64_t C, int *status, void *stream) {
    moe_sizes s;
    int err = check_sizes(&s, T, K, E, C, 0);
    if (err) return err;
    REQUIRE(position, s.TK); REQUIRE(expert_index, s.TK);
    REQUIRE(slot_owner, s.EC); REQUIRE(expert_load, E);
    const PairOrder po{expert_index, token_order, nullptr, s.TK, T, K, E};
    return sort_pairs(po, C, position, slot_owner, expert_load, nullptr, nullptr, status, stream);
}

int pymoe_cuda_assign_slots_ordered(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                                    const int64_t *expert_index, const int64_t *order, int64_t N,
                                    int64_t T, int64_t K, int64_t E, int64_t C, int *status,
                                    void *stream) {
    moe_sizes s;
    int err = check_ordered(&s, expert_index, order, N, T, K, E, C);
    if (err) return err;
    REQUIRE(position, s.TK); REQUIRE(slot_owner, s.EC); REQUIRE(expert_load, E);
    const PairOrder po{expert_index, nullptr, order, N, T, K, E};
    return sort_pairs(po, C, position, slot_owner, expert_load, nullptr, nullptr, status, stream);
}

int pymoe_cuda_keep_by_score(uint8_t *keep, const int64_t *expert_index, const int64_t *order,
                             const double *score, int64_t N, int64_t T, int64_t K, int64_t E,
                             int64_t C, int *status, void *stream) {
    moe_sizes s;
    int err = check_ordered(&s, expert_index, order, N, T, K, E, C);
    if (err) return err;
    REQUIRE(keep, s.TK); REQUIRE(score, s.TK);
    const PairOrder po{expert_index, nullptr, order, N, T, K, E};
    return sort_pairs(po, C, nullptr, nullptr, nullptr, keep, score, status, stream);
}

// The float operations of pymoe_cuda.h, for float (_f32) and double (_f64): each a call of its
// template above with the header's parameters.
#define PYMOE_CUDA_DEFINE_FLOAT_OPS(REAL, SFX)                                                     \
    int pymoe_cuda_softmax_top_k##SFX(REAL *probs, int64_t *expert_index, REAL *gate,              \
                                      const REAL *router_logits, int64_t T, int64_t K, int64_t E,  \
                                      int normalize, int *status, void *stream) {                  \
        return softmax_top_k<REAL>(probs, expert_index, gate, router_logits, T, K, E, normalize,   \
                                   status, stream);                                                \
    }                                                                                              \
    int pymoe_cuda_top_k##SFX(int64_t *expert_index, int64_t *expert_load, REAL *prob_sum,         \
                              const REAL *score, const REAL *bias, const REAL *probs, int64_t T,   \
                              int64_t K, int64_t E, int *status, void *stream) {                   \
        return top_k<REAL>(expert_index, expert_load, prob_sum, score, bias, probs, T, K, E,       \
                           status, stream);                                                        \
    }                                                                                              \
    int pymoe_cuda_dispatch##SFX(REAL *expert_in, const REAL *x, const int64_t *slot_owner,        \
                                 const REAL *weight, int64_t T, int64_t K, int64_t E, int64_t C,   \
                                 int64_t D, int *status, void *stream) {                           \
        return dispatch<REAL>(expert_in, x, slot_owner, weight, T, K, E, C, D, status, stream);    \
    }                                                                                              \
    int pymoe_cuda_combine##SFX(REAL *y, const REAL *expert_out, const int64_t *expert_index,      \
                                const int64_t *position, const REAL *weight, int64_t T, int64_t K, \
                                int64_t E, int64_t C, int64_t D, int *status, void *stream) {      \
        return combine<REAL>(y, expert_out, expert_index, position, weight, T, K, E, C, D, status, \
                             stream);                                                              \
    }                                                                                              \
    int pymoe_cuda_gate_grad##SFX(REAL *dgate, const REAL *dy, const REAL *expert_out,             \
                                  const int64_t *expert_index, const int64_t *position, int64_t T, \
                                  int64_t K, int64_t E, int64_t C, int64_t D, int *status,         \
                                  void *stream) {                                                  \
        return gate_grad<REAL>(dgate, dy, expert_out, expert_index, position, T, K, E, C, D,       \
                               status, stream);                                                    \
    }
PYMOE_CUDA_DEFINE_FLOAT_OPS(float, _f32)
PYMOE_CUDA_DEFINE_FLOAT_OPS(double, _f64)
#undef PYMOE_CUDA_DEFINE_FLOAT_OPS

}  // extern "C"
