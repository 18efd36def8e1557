// pymoe CUDA kernels: the GPU twin of pymoe/indexed.py and csrc/moe_ops.h.
//
// Legend (shared with the Python docstrings and the C core):
//   T tokens, D model dim, E experts, K choices per token, C expert capacity.
// Layouts are row-major; index arrays are int64:
//   expert_index [T, K], position [T, K] (-1 = dropped), slot_owner [E, C] (t*K + j, -1 = empty).
//
// This file is compiled twice from the same source: by nvcc for the GPU library, and by g++ with
// emu/cuda_emu.h for the CPU emulation that the tests run. So it uses block-level patterns only
// (shared memory + __syncthreads, no warp shuffles), and every kernel's launch shape is chosen by
// the host code in pymoe_cuda.cu, which both builds share.
//
// Invalid indices never cause an out-of-bounds access: the entry is treated as dropped/empty and a
// bit is set in *status (when status is not NULL), which the caller reads back.
// Floating point: the library is built with -fmad=false so that products and sums round like the
// NumPy reference (dispatch and combine then match it bit for bit).
#pragma once

#define PYMOE_BAD_EXPERT 1    // an expert_index entry outside [0, E)
#define PYMOE_BAD_POSITION 2  // a position entry outside [-1, C)
#define PYMOE_BAD_OWNER 4     // a slot_owner entry outside [-1, T*K)
#define PYMOE_BAD_ORDER 8     // a token_order entry outside [0, T)

#define PYMOE_ROUTER_SMEM_BYTES (32 * 1024)  // logits staged per block by router_kernel
#define PYMOE_MAX_BLOCK 1024                  // threads per block, at most

__device__ __forceinline__ void flag(int *status, int bit) {
    if (status) atomicOr(status, bit);
}

// 16-byte vectors: rows move as float4 / double2 when D and the pointers allow it.
template <typename REAL> struct Vec;
template <> struct Vec<float> {
    typedef float4 type;
    static constexpr int n = 4;
    __device__ static float4 zero() { return make_float4(0.f, 0.f, 0.f, 0.f); }
    __device__ static float4 scale(float w, float4 a) {
        return make_float4(w * a.x, w * a.y, w * a.z, w * a.w);
    }
    __device__ static float4 axpy(float w, float4 a, float4 acc) {  // acc + w * a, unfused
        return make_float4(acc.x + w * a.x, acc.y + w * a.y, acc.z + w * a.z, acc.w + w * a.w);
    }
};
template <> struct Vec<double> {
    typedef double2 type;
    static constexpr int n = 2;
    __device__ static double2 zero() { return make_double2(0.0, 0.0); }
    __device__ static double2 scale(double w, double2 a) { return make_double2(w * a.x, w * a.y); }
    __device__ static double2 axpy(double w, double2 a, double2 acc) {
        return make_double2(acc.x + w * a.x, acc.y + w * a.y);
    }
};

__device__ __forceinline__ float exp_real(float v) { return expf(v); }
__device__ __forceinline__ double exp_real(double v) { return exp(v); }

// ---------------------------------------------------------------------------------------------
// router_kernel: per token, softmax over the E experts and the top-K experts by logit (ties to
// the lower expert index, as pymoe.topk.top_k), with raw or renormalised gates (pymoe.topk.gates).
// Out: probs [T, E], expert_index [T, K], gate [T, K]. In: logits [T, E].
// Launch: grid = ceil(T / rows), block = B; rows = min(B, PYMOE_ROUTER_SMEM_BYTES / (E * size)).
// Why: E is small (8..256), so one thread per token does the softmax and the K selection passes;
// the block first stages its rows in shared memory with coalesced loads (consecutive threads read
// consecutive logits) and writes probs back the same way, instead of each thread striding by E.
// Bytes (s = sizeof(REAL)): read T*E*s, write T*E*s + T*K*(8 + s). Uses __syncthreads.
template <typename REAL>
__global__ void router_kernel(REAL *probs, int64_t *expert_index, REAL *gate, const REAL *logits,
                              int64_t T, int64_t E, int64_t K, int normalize, int64_t rows) {
    __shared__ double smem_raw[PYMOE_ROUTER_SMEM_BYTES / sizeof(double)];
    REAL *tile = reinterpret_cast<REAL *>(smem_raw);
    const int64_t row0 = (int64_t)blockIdx.x * rows;
    const int64_t nrows = T - row0 < rows ? T - row0 : rows;
    const int64_t n = nrows * E;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) tile[i] = logits[row0 * E + i];
    __syncthreads();
    if ((int64_t)threadIdx.x < nrows) {
        const int64_t t = row0 + threadIdx.x;
        REAL *l = tile + threadIdx.x * E;
        REAL m = l[0];
        for (int64_t e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
        REAL sum = 0;
        for (int64_t e = 0; e < E; e++) sum += exp_real(l[e] - m);
        // K selection passes: each takes the best logit strictly below the previous pick in the
        // order (logit descending, expert ascending), so ties go to the lower expert index.
        REAL prev_v = 0, sel = 0;
        int64_t prev_e = -1;
        for (int64_t j = 0; j < K; j++) {
            int64_t best = -1;
            REAL bv = 0;
            for (int64_t e = 0; e < E; e++) {
                REAL v = l[e];
                bool below = prev_e < 0 || v < prev_v || (v == prev_v && e > prev_e);
                if (below && (best < 0 || v > bv)) { best = e; bv = v; }
            }
            REAL p = exp_real(bv - m) / sum;
            expert_index[t * K + j] = best;
            gate[t * K + j] = p;
            sel += p;
            prev_v = bv;
            prev_e = best;
        }
        if (normalize)
            for (int64_t j = 0; j < K; j++) gate[t * K + j] = gate[t * K + j] / sel;
        for (int64_t e = 0; e < E; e++) l[e] = exp_real(l[e] - m) / sum;  // probs, in place
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) probs[row0 * E + i] = tile[i];
}

// ---------------------------------------------------------------------------------------------
// slots_kernel: choice-major slot assignment with capacity drop (pymoe.priority + capacity).
// The K*T pairs are numbered in priority order s = j*T + i (token t = token_order[i], or i when
// token_order is NULL); block e numbers the pairs that chose expert e: the n-th gets slot n if
// n < C, else it is dropped. Out: position [T, K] (pre-filled with -1 by the host), slot_owner
// [E, C], expert_load [E] (pairs per expert before dropping).
// Launch: grid = E + 1, block = B (a power of two). Block E only validates the indices.
// Why: one block per expert walks the pairs in order, tile by tile; each thread counts matches
// in SLOT_ITEMS consecutive pairs, and a block-wide scan of those counts (shared memory,
// __syncthreads) gives every thread the number of its first match. No atomic decides an order,
// so the positions are exactly the reference's, run after run.
// Bytes: each of the E+1 blocks reads the T*K int64 indices (8*T*K, from L2 after the first);
// the pairs' positions and slot owners are written once: 8*(T*K + E*C + E).
#define SLOT_ITEMS 8

__device__ __forceinline__ int64_t pair_expert(const int64_t *expert_index,
                                               const int64_t *token_order, int64_t s, int64_t T,
                                               int64_t K, int64_t *t_out, int64_t *j_out) {
    const int64_t j = s / T, i = s - j * T;
    const int64_t t = token_order ? token_order[i] : i;
    *t_out = t;
    *j_out = j;
    if (t < 0 || t >= T) return -1;
    return expert_index[t * K + j];
}

__global__ void slots_kernel(int64_t *position, int64_t *slot_owner, int64_t *expert_load,
                             const int64_t *expert_index, const int64_t *token_order, int64_t T,
                             int64_t K, int64_t E, int64_t C, int *status) {
    __shared__ int64_t scan[PYMOE_MAX_BLOCK];
    const int64_t e = blockIdx.x, N = T * K;
    int64_t t, j;
    if (e == E) {  // the validation block
        for (int64_t s = threadIdx.x; s < N; s += blockDim.x) {
            int64_t ex = pair_expert(expert_index, token_order, s, T, K, &t, &j);
            if (t < 0 || t >= T) flag(status, PYMOE_BAD_ORDER);
            else if (ex < 0 || ex >= E) flag(status, PYMOE_BAD_EXPERT);
        }
        return;
    }
    const int64_t tile = (int64_t)blockDim.x * SLOT_ITEMS;
    int64_t base = 0;  // pairs of expert e numbered so far
    for (int64_t start = 0; start < N; start += tile) {
        const int64_t first = start + (int64_t)threadIdx.x * SLOT_ITEMS;
        int64_t count = 0;
        for (int u = 0; u < SLOT_ITEMS; u++)
            if (first + u < N && pair_expert(expert_index, token_order, first + u, T, K, &t, &j) == e)
                count++;
        scan[threadIdx.x] = count;
        __syncthreads();
        for (unsigned off = 1; off < blockDim.x; off <<= 1) {  // inclusive Hillis-Steele scan
            int64_t v = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
            __syncthreads();
            scan[threadIdx.x] += v;
            __syncthreads();
        }
        int64_t p = base + scan[threadIdx.x] - count;  // number of this thread's first match
        for (int u = 0; u < SLOT_ITEMS; u++) {
            if (first + u >= N || pair_expert(expert_index, token_order, first + u, T, K, &t, &j) != e)
                continue;
            position[t * K + j] = p < C ? p : -1;
            if (p < C) slot_owner[e * C + p] = t * K + j;
            p++;
        }
        base += scan[blockDim.x - 1];
        __syncthreads();  // everyone has read scan[] before the next tile overwrites it
    }
    if (threadIdx.x == 0) expert_load[e] = base;
    for (int64_t p = (base < C ? base : C) + threadIdx.x; p < C; p += blockDim.x)
        slot_owner[e * C + p] = -1;  // slots past the load stay empty
}

// ---------------------------------------------------------------------------------------------
// dispatch_kernel: expert_in[r, :] = w * x[t, :] for the pair (t, j) in slot r = e*C + c
// (w = weight[t, j], or a plain copy without weight); empty slots are zeroed.
// Dispatch's backward is combine_kernel with weight = NULL; with weight = gate and x = dy this is
// the first half of combine's backward.
// Launch: grid = min(E*C, 65535) blocks striding over slot rows, block = B threads over D.
// Why: one output row per block, so every row is written by one block in full: coalesced 16-byte
// loads and stores (float4 / double2 when `vec`), no atomics, no read-modify-write.
// Bytes (s = sizeof(REAL)): read filled*D*s + write E*C*D*s, plus 8*E*C of indices.
template <typename REAL>
__global__ void dispatch_kernel(REAL *expert_in, const REAL *x, const REAL *weight,
                                const int64_t *slot_owner, int64_t T, int64_t K, int64_t EC,
                                int64_t D, int vec, int *status) {
    typedef Vec<REAL> V;
    for (int64_t r = blockIdx.x; r < EC; r += gridDim.x) {
        int64_t o = slot_owner[r];
        if (o < -1 || o >= T * K) {
            if (threadIdx.x == 0) flag(status, PYMOE_BAD_OWNER);
            o = -1;
        }
        REAL *dst = expert_in + r * D;
        const REAL *src = o >= 0 ? x + (o / K) * D : nullptr;
        const REAL w = (o >= 0 && weight) ? weight[o] : (REAL)1;
        if (vec) {
            typename V::type *dv = reinterpret_cast<typename V::type *>(dst);
            const typename V::type *sv = reinterpret_cast<const typename V::type *>(src);
            for (int64_t i = threadIdx.x; i < D / V::n; i += blockDim.x)
                dv[i] = !src ? V::zero() : weight ? V::scale(w, sv[i]) : sv[i];
        } else {
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
                dst[d] = !src ? (REAL)0 : weight ? w * src[d] : src[d];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// combine_kernel: y[t, :] = sum over kept j, in order j = 0..K-1, of w * expert_out[e_tj, p_tj, :]
// (w = weight[t, j], or 1 without weight); a token whose choices were all dropped gets zeros.
// Launch: grid = min(T, 65535) blocks striding over tokens, block = B threads over D.
// Why: one output row per block; each thread keeps its accumulator in registers over the K
// choices and stores once (no atomics, so the sum order is fixed: 0 + w0*r0 + w1*r1 ...).
// Bytes (s = sizeof(REAL)): read kept*D*s + write T*D*s, plus T*K*(16 + s) of indices and gates.
template <typename REAL>
__global__ void combine_kernel(REAL *y, const REAL *expert_out, const REAL *weight,
                               const int64_t *expert_index, const int64_t *position, int64_t T,
                               int64_t K, int64_t E, int64_t C, int64_t D, int vec, int *status) {
    typedef Vec<REAL> V;
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        if (threadIdx.x == 0) {
            for (int64_t j = 0; j < K; j++) {
                int64_t e = expert_index[t * K + j], p = position[t * K + j];
                if (e < 0 || e >= E) flag(status, PYMOE_BAD_EXPERT);
                if (p < -1 || p >= C) flag(status, PYMOE_BAD_POSITION);
            }
        }
        if (vec) {
            typename V::type *dv = reinterpret_cast<typename V::type *>(y + t * D);
            for (int64_t i = threadIdx.x; i < D / V::n; i += blockDim.x) {
                typename V::type acc = V::zero();
                for (int64_t j = 0; j < K; j++) {
                    const int64_t e = expert_index[t * K + j], p = position[t * K + j];
                    if (e < 0 || e >= E || p < 0 || p >= C) continue;  // dropped or invalid
                    const typename V::type *sv =
                        reinterpret_cast<const typename V::type *>(expert_out + (e * C + p) * D);
                    acc = V::axpy(weight ? weight[t * K + j] : (REAL)1, sv[i], acc);
                }
                dv[i] = acc;
            }
        } else {
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
                REAL acc = 0;
                for (int64_t j = 0; j < K; j++) {
                    const int64_t e = expert_index[t * K + j], p = position[t * K + j];
                    if (e < 0 || e >= E || p < 0 || p >= C) continue;
                    acc = acc + (weight ? weight[t * K + j] : (REAL)1) * expert_out[(e * C + p) * D + d];
                }
                y[t * D + d] = acc;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gate_grad_kernel: dgate[t, j] = <dy[t, :], expert_out[e_tj, p_tj, :]> for kept pairs, 0 for
// dropped ones (the second half of combine's backward).
// Launch: grid = min(T, 65535) blocks striding over tokens, block = B threads (a power of two).
// Why: a block reads the token's dy row once per choice with coalesced loads; each thread sums a
// fixed strided subset of d, then a shared-memory tree (__syncthreads between levels) adds the B
// partial sums in a fixed order, so the result never depends on timing.
// Bytes (s = sizeof(REAL)): read (T + kept)*D*s, write T*K*s, plus T*K*16 of indices.
template <typename REAL>
__global__ void gate_grad_kernel(REAL *dgate, const REAL *dy, const REAL *expert_out,
                                 const int64_t *expert_index, const int64_t *position, int64_t T,
                                 int64_t K, int64_t E, int64_t C, int64_t D, int *status) {
    __shared__ REAL partial[PYMOE_MAX_BLOCK];
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        for (int64_t j = 0; j < K; j++) {
            const int64_t e = expert_index[t * K + j], p = position[t * K + j];
            const bool bad = e < 0 || e >= E || p < -1 || p >= C;
            if (bad && threadIdx.x == 0) flag(status, e < 0 || e >= E ? PYMOE_BAD_EXPERT
                                                                      : PYMOE_BAD_POSITION);
            REAL sum = 0;
            if (!bad && p >= 0) {
                const REAL *row = expert_out + (e * C + p) * D;
                for (int64_t d = threadIdx.x; d < D; d += blockDim.x) sum += dy[t * D + d] * row[d];
            }
            partial[threadIdx.x] = sum;
            __syncthreads();
            for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
                if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
                __syncthreads();
            }
            if (threadIdx.x == 0) dgate[t * K + j] = partial[0];
            __syncthreads();  // partial[0] is read before the next choice overwrites it
        }
    }
}
