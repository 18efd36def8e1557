// pymoe CUDA kernels: the GPU twin of pymoe/indexed.py, pymoe.topk and csrc/pymoe.h.
//
// Legend (shared with the Python docstrings and the C core), sizes always in this order:
//   T tokens, K choices per token, E experts, C expert capacity, D model dim.
// Layouts are row-major; index arrays are int64:
//   expert_index [T, K], position [T, K] (-1 = dropped), slot_owner [E, C] (t*K + j, -1 = empty).
//
// This file is compiled twice from the same source: by nvcc for the GPU library, and by g++ with
// emu/cuda_emu.h for the CPU emulation that the tests run. The emulator runs warps as 32 fibers
// and checks every *_sync mask and every shared-memory access (PYMOE_SHARED), so the warp-level
// code below is tested here, not only compiled. Launch shapes are chosen by pymoe_cuda.cu.
//
// Invalid indices never cause an out-of-bounds access: the entry is treated as dropped/empty and a
// PYMOE_BAD_* bit is OR-ed into *status (when status is not NULL), which the caller reads back.
// Floating point: the library is built with -fmad=false so that products and sums round like the
// NumPy reference (dispatch and combine then match it bit for bit).
//
// Napkin math (H100 SXM: 132 SMs, ~3.35 TB/s HBM3, 4 warp schedulers per SM, 228 KB shared per
// SM, 64K registers per SM; A100: 108 SMs, ~2.0 TB/s). Nothing here has been timed on a GPU: the
// figures are design estimates, the benchmark (python -m pymoe.bench --backend cuda) measures.
//  - Memory-bound kernels reach ~90% of copy bandwidth only with enough bytes in flight: Little's
//    law, 3.35 TB/s * ~600 ns latency ~ 2 MB in flight, ~15 KB per SM. A 256-thread block moving
//    four 16-byte vectors per thread has 16 KB in flight, so 1-2 resident blocks per SM suffice;
//    one 16-byte load per thread would leave only 4 KB per block in flight.
//  - Dispatch at T=65536, D=4096, E=64, K=2, capacity factor 1.25, float32 (C = 2560): it reads
//    up to T*K = 131072 rows of 16 KiB (2 GiB) and writes E*C = 163840 rows (2.5 GiB): ~1.4 ms
//    at copy speed; combine reads the kept rows and writes T rows (~3 GiB, ~1 ms). Index traffic
//    (8 B per slot or pair) is < 0.1% of that.
//  - Slot assignment at T*K = 131072 pairs, E=64: the counting sort reads the 1 MiB of indices
//    twice and writes 2 MiB; ~2 us of bandwidth, so launch latency (~3 x 3 us) dominates. One
//    block per expert, each reading all pairs, would do O(E*T*K) work with 8 busy SMs at E=8.
#pragma once

#include <stdint.h>

#include "pymoe_cuda.h"  // the PYMOE_BAD_* status bits

#define PYMOE_MAX_BLOCK 1024        // threads per block, at most
#define PYMOE_MAX_K 1024            // choices per token for combine / gate_grad (shared memory)
#define PYMOE_ROUTER_MAX_E 512      // experts per token row in the warp router (16 per lane)
#define PYMOE_SLOT_ROUNDS 8         // rounds of 32 pairs per warp per slot chunk
#define PYMOE_SLOT_SMEM (48 * 1024) // per-warp expert histograms of one slot block, at most
#define PYMOE_UNROLL 4              // 16-byte vectors in flight per thread in the row kernels
#define PYMOE_FULL 0xffffffffu

#ifndef PYMOE_EMULATE
#define PYMOE_SHARED(T, name, n) __shared__ T name[n]
#define PYMOE_SHARED_DYN(T, name)                                       \
    extern __shared__ __align__(16) unsigned char pymoe_dynamic_smem[]; \
    T *name = reinterpret_cast<T *>(pymoe_dynamic_smem)
#endif

__device__ __forceinline__ void flag(int *status, int bit) {
    if (status) atomicOr(status, bit);
}

// 16-byte vectors: rows move as float4 / double2 where the pointers allow it.
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
    __device__ static float dot(float4 a, float4 b) {
        return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
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
    __device__ static double dot(double2 a, double2 b) { return a.x * b.x + a.y * b.y; }
};

__device__ __forceinline__ float exp_real(float v) { return expf(v); }
__device__ __forceinline__ double exp_real(double v) { return exp(v); }

// Elements before p is 16-byte aligned (p is aligned to its element size).
template <typename REAL>
__device__ __forceinline__ int64_t head_of(const REAL *p) {
    return (int64_t)((16 - ((uintptr_t)p & 15)) & 15) / (int64_t)sizeof(REAL);
}

template <typename REAL>
__device__ __forceinline__ REAL warp_sum(REAL v) {  // butterfly: every lane gets the same bits
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(PYMOE_FULL, v, off);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Warp top-K: the K best of a token's E values held in registers (lane l holds entries
// e = l + 32*i, i < NPL), best first, ties to the lower index; NaN ranks below every number.
// fn(j, e, v) is called on every lane with the j-th pick (the same on all lanes).
// Why: one warp per token keeps the row in registers: the max/sum need 5 shuffles each and each
// of the K picks one local scan of NPL registers plus a 5-step shuffle argmax (10 shuffles),
// instead of a shared-memory row per thread with E-stride bank conflicts.
template <typename REAL>
__device__ __forceinline__ bool beats(REAL av, int64_t ae, REAL bv, int64_t be, int64_t E) {
    if (ae >= E) return false;  // "no candidate" never wins
    if (be >= E) return true;
    const bool an = av != av, bn = bv != bv;
    if (an != bn) return bn;  // a number beats NaN
    if (!an && av != bv) return av > bv;
    return ae < be;  // equal (or both NaN): the lower index
}

template <typename REAL, int NPL, typename F>
__device__ __forceinline__ void warp_top_k(const REAL (&v)[NPL], int64_t E, int64_t K, F fn) {
    const int lane = threadIdx.x % 32;
    unsigned taken = 0;  // bit i: entry lane + 32*i already picked
    for (int64_t j = 0; j < K; j++) {
        REAL bv = 0;
        int64_t be = E;
#pragma unroll
        for (int i = 0; i < NPL; i++) {
            const int64_t e = lane + 32 * i;
            if (e < E && !(taken >> i & 1u) && beats(v[i], e, bv, be, E)) { bv = v[i]; be = e; }
        }
        for (int off = 16; off > 0; off /= 2) {  // argmax butterfly: a total order, so all
            const REAL ov = __shfl_xor_sync(PYMOE_FULL, bv, off);  // lanes end with the same pick
            const int64_t oe = __shfl_xor_sync(PYMOE_FULL, be, off);
            if (beats(ov, oe, bv, be, E)) { bv = ov; be = oe; }
        }
        if (be % 32 == lane) taken |= 1u << (be / 32);
        fn(j, be, bv);
    }
}

// Load row[0..E) into the lanes' registers (missing entries -inf), coalesced; NaN flagged.
template <typename REAL, int NPL>
__device__ __forceinline__ void load_row(REAL (&v)[NPL], const REAL *__restrict__ row,
                                         const REAL *__restrict__ bias, int64_t E, int *status) {
    const int lane = threadIdx.x % 32;
    bool nan = false;
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int64_t e = lane + 32 * i;
        v[i] = e < E ? __ldg(row + e) : (REAL)-INFINITY;
        if (bias && e < E) v[i] = v[i] + __ldg(bias + e);
        nan |= v[i] != v[i];
    }
    if (__any_sync(PYMOE_FULL, nan) && lane == 0) flag(status, PYMOE_BAD_NAN);
}

// One warp per token, grid-stride over the T tokens: fn(t, v) with token t's row
// rows[t, 0..E) (+ bias) in the lanes' registers (load_row). The loop of both router kernels.
template <typename REAL, int NPL, typename F>
__device__ __forceinline__ void for_each_token_row(const REAL *__restrict__ rows,
                                                   const REAL *__restrict__ bias, int64_t T,
                                                   int64_t E, int *status, F fn) {
    const int64_t warps = (int64_t)blockDim.x / 32;
    for (int64_t t = (int64_t)blockIdx.x * warps + threadIdx.x / 32; t < T;
         t += (int64_t)gridDim.x * warps) {
        REAL v[NPL];
        load_row<REAL, NPL>(v, rows + t * E, bias, E, status);
        fn(t, v);
    }
}

// softmax_top_k_kernel: per token, softmax over the E experts and the top-K experts by logit
// (ties to the lower expert index, as pymoe.topk.top_k), with raw or renormalised gates
// (pymoe.topk.gates): steps 2-4 of pymoe.route fused.
// Out: probs [T, E], expert_index [T, K], gate [T, K]. In: router_logits [T, E].
// Launch: grid = ceil(T / warps per block) (grid-stride beyond), block = B; one warp per token.
// Registers: NPL values per lane; at NPL = 16 (E > 256) a 1024-thread block's 64-register cap
// spills (ptxas), so those instantiations allow 128 registers and run at most 512 threads.
// Bytes (s = sizeof(REAL)): read T*E*s, write T*E*s + T*K*(8 + s): at E=64, K=2, float32 the
// 128 MB of a T=2^19 batch move in ~40 us at copy speed; the K shuffle rounds (10 shuffles each,
// ~32 cycles) stay below that for K <= 8.
template <int NPL>
constexpr int router_max_block() { return NPL >= 16 ? 512 : PYMOE_MAX_BLOCK; }

template <typename REAL, int NPL>
__global__ void __launch_bounds__(router_max_block<NPL>())
softmax_top_k_kernel(REAL *__restrict__ probs, int64_t *__restrict__ expert_index,
                     REAL *__restrict__ gate, const REAL *__restrict__ router_logits, int64_t T,
                     int64_t K, int64_t E, int normalize, int *status) {
    const int lane = threadIdx.x % 32;
    for_each_token_row<REAL, NPL>(router_logits, nullptr, T, E, status, [&](int64_t t,
                                                                           REAL(&v)[NPL]) {
        REAL m = v[0];
#pragma unroll
        for (int i = 1; i < NPL; i++) m = v[i] > m ? v[i] : m;
        for (int off = 16; off > 0; off /= 2) {
            const REAL o = __shfl_xor_sync(PYMOE_FULL, m, off);
            m = o > m ? o : m;
        }
        REAL sum = 0;
#pragma unroll
        for (int i = 0; i < NPL; i++)
            if (lane + 32 * i < E) sum += exp_real(v[i] - m);
        sum = warp_sum(sum);
#pragma unroll
        for (int i = 0; i < NPL; i++)
            if (lane + 32 * i < E) probs[t * E + lane + 32 * i] = exp_real(v[i] - m) / sum;
        REAL sel = 0;
        warp_top_k<REAL, NPL>(v, E, K, [&](int64_t j, int64_t e, REAL ve) {
            const REAL p = exp_real(ve - m) / sum;  // the same bits as probs[t, e]
            sel += p;
            if (lane == j % 32) {  // the lane that writes gate[t, j] also renormalises it
                expert_index[t * K + j] = e;
                gate[t * K + j] = p;
            }
        });
        if (normalize)
            for (int64_t j = lane; j < K; j += 32) gate[t * K + j] = gate[t * K + j] / sel;
    });
}

// top_k_kernel: the CUDA twin of C's pymoe_top_k: expert_index[t] = the K largest
// v[t, e] = score[t, e] (+ bias[e], rounded in REAL), ties to the lower expert; expert_load[e]
// (may be NULL) counts the picks (integer atomics: any order gives the same counts). A NaN
// sets PYMOE_BAD_NAN (the host turns it into an error, as the C core does).
// Launch: as softmax_top_k_kernel. Bytes: read T*E*s, write T*K*8 (+ E*8 of counts).
template <typename REAL, int NPL>
__global__ void __launch_bounds__(router_max_block<NPL>())
top_k_kernel(int64_t *__restrict__ expert_index, unsigned long long *__restrict__ expert_load,
             const REAL *__restrict__ score, const REAL *__restrict__ bias, int64_t T, int64_t K,
             int64_t E, int *status) {
    const int lane = threadIdx.x % 32;
    for_each_token_row<REAL, NPL>(score, bias, T, E, status, [&](int64_t t, REAL(&v)[NPL]) {
        warp_top_k<REAL, NPL>(v, E, K, [&](int64_t j, int64_t e, REAL) {
            if (lane == j % 32) {
                expert_index[t * K + j] = e;
                if (expert_load) atomicAdd(expert_load + e, 1ull);
            }
        });
    });
}

// column_sum_kernel: prob_sum[e] = sum over t = 0, 1, ..., T-1 of probs[t, e], from 0, in that
// order (bit for bit the C core's pymoe_top_k, and NumPy's cumsum along t). One thread per
// column: the adds form one dependent chain per column (~4 cycles each, so ~40 us at T=16384),
// the price of the fixed order; consecutive threads read consecutive columns (coalesced).
// Launch: grid = ceil(E / B), block = B.
template <typename REAL>
__global__ void column_sum_kernel(REAL *__restrict__ prob_sum, const REAL *__restrict__ probs,
                                  int64_t T, int64_t E) {
    const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    REAL acc = 0;
    for (int64_t t = 0; t < T; t++) acc += __ldg(probs + t * E + e);
    prob_sum[e] = acc;
}

// ---------------------------------------------------------------------------------------------
// Slot assignment as a deterministic counting sort (pymoe.slots and C's pymoe_assign_slots,
// pymoe_assign_slots_ordered, pymoe_keep_by_score). The N pairs are numbered in priority order s:
//   choice-major (assign_slots): s = j*T + i, token t = token_order[i] (NULL: t = i), N = T*K;
//   explicit (assign_slots_ordered, keep_by_score): pair order[s] = t*K + j, N <= T*K
// (token-major and every other slot rule is an explicit order). The position of pair s in expert
// e is the number of earlier pairs that chose e; positions >= C are dropped. Three kernels:
//   1. slots_count: block b takes chunk b (B * PYMOE_SLOT_ROUNDS consecutive pairs) and writes
//      its expert histogram hist[e * chunks + b]; each warp counts 32 pairs per round with
//      __match_any_sync (lanes with the same expert find each other; the lowest adds __popc).
//   2. slots_scan: one block, an exclusive scan of hist over [E x chunks] (expert-major), so
//      offset[e * chunks + b] = pairs of experts < e, plus pairs of expert e in chunks < b.
//   3. slots_scatter: recounts its chunk, turns the per-warp histograms into per-warp starting
//      offsets, and gives each pair offset + rank among its warp's earlier lanes with the same
//      expert (__popc of the lower lanes of its __match_any_sync group). No atomic decides an
//      order, so the integers are the reference's for any order, run after run.
// Work O(N + E*chunks); all SMs busy once N > 132 * chunk. Shared memory: one int counter per
// (warp, expert), W*E*4 bytes (dynamic; the host shrinks the block until it fits 48 KB).
// Validation rides along: a bad expert, token_order or order entry is flagged and the pair
// skipped; a repeat is caught by counting in `seen` (zeroed): each token's j = 0 pair [T]
// (choice-major), or each listed pair [T*K] (explicit).
struct PairOrder {
    const int64_t *expert_index, *token_order, *order;  // order NULL: choice-major
    int64_t N, T, K, E;

    // Pair s's flat id t*K + j and expert e, with e = -1 for a pair to skip (past the end or
    // invalid); *seen_id = the entry of `seen` it counts in (-1: none).
    __device__ __forceinline__ void at(int64_t s, int64_t *pair, int64_t *e, int64_t *seen_id,
                                       int *status) const {
        *pair = -1;
        *e = -1;
        *seen_id = -1;
        if (s >= N) return;
        if (order) {
            *pair = __ldg(order + s);
            if (*pair < 0 || *pair >= T * K) {
                flag(status, PYMOE_BAD_PAIRS);
                return;
            }
            *seen_id = *pair;
        } else {
            const int64_t i = s % T, j = s / T;
            const int64_t t = token_order ? __ldg(token_order + i) : i;
            if (t < 0 || t >= T) {
                flag(status, PYMOE_BAD_ORDER);
                return;
            }
            *pair = t * K + j;
            *seen_id = j == 0 ? t : -1;
        }
        *e = __ldg(expert_index + *pair);
        if (*e < 0 || *e >= E) {
            flag(status, PYMOE_BAD_EXPERT);
            *e = -1;
        }
    }
};

// One warp's rounds over its 32 * PYMOE_SLOT_ROUNDS pairs: counts[w*E + e] += pairs of e, and
// fn(pair, e, seen_id, rank) for each valid pair with rank = counts[w*E + e] before it (the pairs
// of e that came earlier in this warp, plus the starting value of the counter).
template <typename Counts, typename F>
__device__ __forceinline__ void warp_rounds(const PairOrder &po, Counts &counts, int64_t first,
                                            int *status, F fn) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    for (int r = 0; r < PYMOE_SLOT_ROUNDS; r++) {
        int64_t pair, e, seen_id;
        po.at(first + r * 32 + lane, &pair, &e, &seen_id, status);
        const unsigned peers = __match_any_sync(PYMOE_FULL, e);
        const int leader = __ffs(peers) - 1;
        int base = 0;
        if (e >= 0 && lane == leader) {  // only the leader touches the counter of e
            base = counts[w * po.E + e];
            counts[w * po.E + e] = base + __popc(peers);
        }
        base = __shfl_sync(peers, base, leader);  // within the group of lanes with this e
        if (e >= 0) fn(pair, e, seen_id, base + __popc(peers & ((1u << lane) - 1u)));
        __syncwarp();  // the next round's leader may be another lane
    }
}

// Zero the block's per-warp counters and count its chunk.
template <typename Counts, typename F>
__device__ __forceinline__ void count_chunk(const PairOrder &po, Counts &counts, int *status,
                                            F fn) {
    const int64_t W = blockDim.x / 32;
    for (int64_t i = threadIdx.x; i < W * po.E; i += blockDim.x) counts[i] = 0;
    __syncthreads();
    const int64_t first = ((int64_t)blockIdx.x * W + threadIdx.x / 32) * 32 * PYMOE_SLOT_ROUNDS;
    warp_rounds(po, counts, first, status, fn);
    __syncthreads();
}

__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
slots_count_kernel(int64_t *__restrict__ hist, int *__restrict__ seen, PairOrder po,
                   int64_t chunks, int *status) {
    PYMOE_SHARED_DYN(int, counts);
    count_chunk(po, counts, status, [&](int64_t, int64_t, int64_t seen_id, int) {
        if (seen_id >= 0 && atomicAdd(seen + seen_id, 1) != 0)
            flag(status, po.order ? PYMOE_BAD_PAIRS : PYMOE_BAD_ORDER);
    });
    const int64_t W = blockDim.x / 32;
    for (int64_t e = threadIdx.x; e < po.E; e += blockDim.x) {
        int64_t n = 0;
        for (int64_t w = 0; w < W; w++) n += counts[w * po.E + e];
        hist[e * chunks + blockIdx.x] = n;
    }
}

// Exclusive scan of in[0..n) into out with one block; returns the total (on every thread).
// Per tile of B entries: a 5-step __shfl_up_sync scan in each warp, the warp totals scanned by
// warp 0, then each entry gets carry + earlier warps + earlier lanes.
__device__ __forceinline__ int64_t block_exclusive_scan(const int64_t *__restrict__ in,
                                                        int64_t *__restrict__ out, int64_t n) {
    PYMOE_SHARED(int64_t, warp_total, 32);
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, W = blockDim.x / 32;
    int64_t carry = 0;
    for (int64_t base = 0; base < n; base += blockDim.x) {
        const int64_t i = base + threadIdx.x;
        const int64_t v = i < n ? in[i] : 0;
        int64_t x = v;
        for (int off = 1; off < 32; off *= 2) {
            const int64_t y = __shfl_up_sync(PYMOE_FULL, x, off);
            if (lane >= off) x += y;
        }
        if (lane == 31) warp_total[w] = x;
        __syncthreads();
        if (w == 0) {
            int64_t s = lane < W ? (int64_t)warp_total[lane] : 0;
            for (int off = 1; off < 32; off *= 2) {
                const int64_t y = __shfl_up_sync(PYMOE_FULL, s, off);
                if (lane >= off) s += y;
            }
            if (lane < W) warp_total[lane] = s;  // inclusive over warps
        }
        __syncthreads();
        const int64_t before = w > 0 ? (int64_t)warp_total[w - 1] : 0;
        if (i < n) out[i] = carry + before + x - v;
        carry += warp_total[W - 1];
        __syncthreads();  // everyone has read warp_total before the next tile overwrites it
    }
    return carry;
}

// Launch: grid = 1, block = B. Also expert_load[e] = pairs of e (before dropping).
__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
slots_scan_kernel(int64_t *__restrict__ offset, int64_t *__restrict__ expert_load,
                  const int64_t *__restrict__ hist, int64_t E, int64_t chunks) {
    const int64_t total = block_exclusive_scan(hist, offset, E * chunks);
    __syncthreads();  // offset[] written by other threads is read below
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
        expert_load[e] = (e + 1 < E ? offset[(e + 1) * chunks] : total) - offset[e * chunks];
}

// Launch: grid = chunks, block = B (as slots_count). position and slot_owner are -1 beforehand.
// sorted != NULL (keep_by_score): instead of positions, sorted[offset] = t*K + j lists each
// expert's pairs contiguously, in priority order, for keep_by_score_kernel.
__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
slots_scatter_kernel(int64_t *__restrict__ position, int64_t *__restrict__ slot_owner,
                     int64_t *__restrict__ sorted, const int64_t *__restrict__ offset,
                     PairOrder po, int64_t C, int64_t chunks) {
    PYMOE_SHARED_DYN(int, counts);
    count_chunk(po, counts, nullptr, [](int64_t, int64_t, int64_t, int) {});
    const int64_t W = blockDim.x / 32;
    for (int64_t e = threadIdx.x; e < po.E; e += blockDim.x) {  // counts -> starting ranks
        int64_t run = offset[e * chunks + blockIdx.x] - (sorted ? 0 : offset[e * chunks]);
        for (int64_t w = 0; w < W; w++) {
            const int n = counts[w * po.E + e];
            counts[w * po.E + e] = (int)run;  // < B * PYMOE_SLOT_ROUNDS + N: fits (host checks)
            run += n;
        }
    }
    __syncthreads();
    const int64_t first = ((int64_t)blockIdx.x * W + threadIdx.x / 32) * 32 * PYMOE_SLOT_ROUNDS;
    warp_rounds(po, counts, first, nullptr, [&](int64_t pair, int64_t e, int64_t, int p) {
        if (sorted) {
            sorted[p] = pair;
        } else if (p < C) {
            position[pair] = p;
            slot_owner[e * C + p] = pair;
        }  // else dropped: position stays -1
    });
}

// ---------------------------------------------------------------------------------------------
// keep_by_score_kernel: drop policy "probs" (Megatron) and expert choice, C's
// pymoe_keep_by_score. Expert e keeps the C of its listed pairs with the highest score (the gate
// at selection), ties to the pair listed earlier: keep[pair] = 1 (keep is zeroed beforehand).
// Block e reads its pairs from sorted (already in priority order): a bitwise binary search finds
// the C-th largest score tau (64 block-wide counts over the pairs), then one ordered pass keeps
// every pair above tau and the first C - count(score > tau) pairs equal to tau, ranking the ties
// with a block scan (__ballot_sync + __popc per warp). Work O(64 * N); one block per expert.
// Scores are doubles, as in C (a float32 score converts exactly). Launch: grid = E, block = B.

// An unsigned key with the order of the doubles (-0.0 as 0.0; NaN is flagged by the caller).
__device__ __forceinline__ unsigned long long ordered_key(double v) {
    if (v == 0) v = 0;
    unsigned long long b;
    memcpy(&b, &v, sizeof b);
    const unsigned long long sign = 1ull << 63;
    return (b & sign) ? ~b : (b | sign);
}

// Sum of v over the block, the same on every thread (warp butterflies, then the warps in order).
__device__ __forceinline__ int64_t block_count(int64_t v) {
    PYMOE_SHARED(int64_t, warp_part, 32);
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, W = blockDim.x / 32;
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(PYMOE_FULL, v, off);
    if (lane == 0) warp_part[w] = v;
    __syncthreads();
    int64_t total = 0;
    for (int i = 0; i < W; i++) total += warp_part[i];
    __syncthreads();  // read before the next call overwrites warp_part
    return total;
}

// Exclusive count of p over the block's threads in order; *total = the block's count.
__device__ __forceinline__ int64_t block_rank(bool p, int64_t *total) {
    PYMOE_SHARED(int, warp_n, 32);
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, W = blockDim.x / 32;
    const unsigned ballot = __ballot_sync(PYMOE_FULL, p);
    if (lane == 0) warp_n[w] = __popc(ballot);
    __syncthreads();
    int64_t before = 0, all = 0;
    for (int i = 0; i < W; i++) {
        before += i < w ? warp_n[i] : 0;
        all += warp_n[i];
    }
    __syncthreads();
    *total = all;
    return before + __popc(ballot & ((1u << lane) - 1u));
}

__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
keep_by_score_kernel(uint8_t *__restrict__ keep, const int64_t *__restrict__ sorted,
                     const int64_t *__restrict__ offset, const int64_t *__restrict__ expert_load,
                     const double *__restrict__ score, int64_t E, int64_t C, int64_t chunks,
                     int *status) {
    for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
        const int64_t *pairs = sorted + offset[e * chunks];
        const int64_t n = expert_load[e];
        unsigned long long tau = 0;  // the C-th largest key (0 when everything is kept)
        int64_t above = 0;
        if (n > C) {
            bool nan = false;
            for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
                const double v = score[pairs[i]];
                nan |= v != v;
            }
            if (nan) flag(status, PYMOE_BAD_NAN);
            for (int b = 63; b >= 0 && C > 0; b--) {
                const unsigned long long cand = tau | (1ull << b);
                int64_t mine = 0;
                for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
                    mine += ordered_key(score[pairs[i]]) >= cand;
                if (block_count(mine) >= C) tau = cand;
            }
            int64_t mine = 0;
            for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
                mine += ordered_key(score[pairs[i]]) > tau;
            above = C > 0 ? block_count(mine) : n;
        }
        int64_t ties = 0;  // pairs equal to tau so far, in priority order
        for (int64_t base = 0; base < n; base += blockDim.x) {
            const int64_t i = base + threadIdx.x;
            bool keep_it = i < n;
            if (n > C) {
                const unsigned long long key = i < n ? ordered_key(score[pairs[i]]) : 0;
                const bool tie = i < n && C > 0 && key == tau;
                int64_t tile_ties;
                const int64_t tie_rank = ties + block_rank(tie, &tile_ties);
                ties += tile_ties;
                keep_it = i < n && C > 0 && (key > tau || (tie && tie_rank < C - above));
            }
            if (keep_it) keep[pairs[i]] = 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row movers shared by dispatch, combine and gate_grad. A row of D elements moves as a scalar
// head (until the destination is 16-byte aligned), a body of 16-byte vectors with PYMOE_UNROLL
// loads in flight per thread, and a scalar tail, whenever all rows involved have the same
// alignment (always when D * sizeof(REAL) % 16 == 0 and the bases are aligned); otherwise the
// whole row goes element by element (still coalesced). Each output element is computed by one
// thread with the same operations in the same order on every path, so the bits never depend on
// the path, the block size or D.

// dispatch_kernel: expert_in[r, :] = w * x[t, :] for the pair (t, j) in slot r = e*C + c
// (w = weight[t, j], or a plain copy without weight); empty slots are zeroed.
// Dispatch's backward is combine_kernel with weight = NULL; with weight = gate and x = dy this is
// the first half of combine's backward.
// Launch: block = B threads in B/G row groups of G threads (G a power of two in [32, B], the
// host's choice: about D / (4 * UNROLL) vectors' worth, so each thread has PYMOE_UNROLL loads in
// flight even for narrow rows: at D = 1024 floats, 4 rows per 256-thread block instead of one
// row with one load per thread); grid = min(ceil(E*C / (B/G)), 2^31 - 1), striding over rows.
// Each group loads the next row's owner while it moves the current row, so the index load's
// latency hides behind the data. An owner outside [-1, T*K) is flagged and its row zeroed.
// Bytes (s = sizeof(REAL)): read filled*D*s + write E*C*D*s, plus 8*E*C of indices.
template <typename REAL>
__device__ __forceinline__ void move_row(REAL *__restrict__ dst, const REAL *__restrict__ src,
                                         REAL w, bool scale, int64_t D, int64_t g, int64_t B) {
    typedef Vec<REAL> V;
    typedef typename V::type VT;
    int64_t head = head_of(dst);
    const bool vec = src == nullptr || head == head_of(src);
    if (!vec || head > D) head = D;
    for (int64_t d = g; d < head; d += B)
        dst[d] = !src ? (REAL)0 : scale ? w * __ldg(src + d) : __ldg(src + d);
    const int64_t nv = (D - head) / V::n;
    VT *dv = reinterpret_cast<VT *>(dst + head);
    const VT *sv = reinterpret_cast<const VT *>(src ? src + head : nullptr);
    for (int64_t i0 = g; i0 < nv; i0 += B * PYMOE_UNROLL) {
        VT a[PYMOE_UNROLL];
#pragma unroll
        for (int u = 0; u < PYMOE_UNROLL; u++)
            if (i0 + u * B < nv) a[u] = !sv ? V::zero() : __ldg(sv + i0 + u * B);
#pragma unroll
        for (int u = 0; u < PYMOE_UNROLL; u++)
            if (i0 + u * B < nv) dv[i0 + u * B] = scale && sv ? V::scale(w, a[u]) : a[u];
    }
    for (int64_t d = head + nv * V::n + g; d < D; d += B)
        dst[d] = !src ? (REAL)0 : scale ? w * __ldg(src + d) : __ldg(src + d);
}

template <typename REAL>
__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
dispatch_kernel(REAL *__restrict__ expert_in, const REAL *__restrict__ x,
                const int64_t *__restrict__ slot_owner, const REAL *__restrict__ weight,
                int64_t T, int64_t K, int64_t E, int64_t C, int64_t D, int group,
                int *status) {
    const int64_t EC = E * C, TK = T * K, rows = blockDim.x / group;
    const int64_t g = threadIdx.x % group, stride = (int64_t)gridDim.x * rows;
    int64_t r = (int64_t)blockIdx.x * rows + threadIdx.x / group;
    int64_t o = r < EC ? __ldg(slot_owner + r) : -1;
    for (; r < EC; r += stride) {
        const int64_t next = r + stride < EC ? __ldg(slot_owner + r + stride) : -1;
        if (o < -1 || o >= TK) {
            if (g == 0) flag(status, PYMOE_BAD_OWNER);
            o = -1;
        }
        const REAL w = o >= 0 && weight ? __ldg(weight + o) : (REAL)1;
        move_row<REAL>(expert_in + r * D, o >= 0 ? x + (o / K) * D : nullptr, w,
                       weight != nullptr, D, g, group);
        o = next;
    }
}

// The kept choices of tokens t0 .. t0 + n - 1 in shared memory: row[i*K + j] = e*C + p (-1:
// dropped, invalid, or past T) and w[i*K + j]; invalid entries flagged.
template <typename REAL, typename RowArray, typename WeightArray>
__device__ __forceinline__ void load_pairs(RowArray &row, WeightArray &w, int64_t t0, int64_t n,
                                           const int64_t *__restrict__ expert_index,
                                           const int64_t *__restrict__ position,
                                           const REAL *__restrict__ weight, int64_t T, int64_t K,
                                           int64_t E, int64_t C, int *status) {
    for (int64_t i = threadIdx.x; i < n * K; i += blockDim.x) {
        const int64_t t = t0 + i / K, j = i % K;
        int64_t r = -1;
        REAL wj = 1;
        if (t < T) {
            const int64_t e = __ldg(expert_index + t * K + j), p = __ldg(position + t * K + j);
            const bool bad_e = e < 0 || e >= E, bad_p = p < -1 || p >= C;
            if (bad_e) flag(status, PYMOE_BAD_EXPERT);
            if (bad_p) flag(status, PYMOE_BAD_POSITION);
            r = bad_e || bad_p || p < 0 ? (int64_t)-1 : e * C + p;
            if (weight) wj = __ldg(weight + t * K + j);
        }
        row[i] = r;
        w[i] = wj;
    }
}

// combine_kernel: y[t, :] = sum over kept j, in order j = 0..K-1, of w * expert_out[e_tj, p_tj, :]
// (w = weight[t, j], or 1 without weight); a token whose choices were all dropped gets zeros.
// Launch: block = B threads in B/G token groups of G threads (G as for dispatch, and large enough
// that (B/G)*K pairs fit PYMOE_MAX_K), grid = min(ceil(T / (B/G)), 2^31 - 1) striding over tokens.
// The block loads its tokens' K (row, weight) pairs once into shared memory (one barrier), then
// each thread keeps PYMOE_UNROLL vector accumulators in registers over the K choices and stores
// once (no atomics, so the sum order is fixed: 0 + w0*r0 + w1*r1 ...), K*UNROLL loads in flight.
// Bytes (s = sizeof(REAL)): read kept*D*s + write T*D*s, plus T*K*(16 + s) of indices and gates.
template <typename REAL>
__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
combine_kernel(REAL *__restrict__ y, const REAL *__restrict__ expert_out,
               const int64_t *__restrict__ expert_index, const int64_t *__restrict__ position,
               const REAL *__restrict__ weight, int64_t T, int64_t K, int64_t E, int64_t C,
               int64_t D, int group, int *status) {
    typedef Vec<REAL> V;
    typedef typename V::type VT;
    PYMOE_SHARED(int64_t, row, PYMOE_MAX_K);
    PYMOE_SHARED(REAL, w, PYMOE_MAX_K);
    const int64_t B = group, rows = blockDim.x / group, g = threadIdx.x % group;
    const int64_t mine = threadIdx.x / group * K;  // this group's pairs in row[] and w[]
    for (int64_t t0 = (int64_t)blockIdx.x * rows; t0 < T; t0 += (int64_t)gridDim.x * rows) {
        load_pairs<REAL>(row, w, t0, rows, expert_index, position, weight, T, K, E, C, status);
        __syncthreads();
        const int64_t t = t0 + threadIdx.x / group;
        if (t < T) {  // (not an early continue: every thread must reach the same barrier)
            REAL *out = y + t * D;
            int64_t head = head_of(out);
            bool vec = true;
            for (int64_t j = 0; j < K; j++)
                vec = vec &&
                      (row[mine + j] < 0 || head_of(expert_out + row[mine + j] * D) == head);
            if (!vec || head > D) head = D;
            for (int64_t d = g; d < head; d += B) {
                REAL acc = 0;
                for (int64_t j = 0; j < K; j++)
                    if (row[mine + j] >= 0)
                        acc = acc + w[mine + j] * __ldg(expert_out + row[mine + j] * D + d);
                out[d] = acc;
            }
            const int64_t nv = (D - head) / V::n;
            for (int64_t i0 = g; i0 < nv; i0 += B * PYMOE_UNROLL) {
                VT acc[PYMOE_UNROLL];
#pragma unroll
                for (int u = 0; u < PYMOE_UNROLL; u++) acc[u] = V::zero();
                for (int64_t j = 0; j < K; j++) {
                    const int64_t r = row[mine + j];
                    if (r < 0) continue;
                    const REAL wj = w[mine + j];
                    const VT *src = reinterpret_cast<const VT *>(expert_out + r * D + head);
                    VT a[PYMOE_UNROLL];
#pragma unroll
                    for (int u = 0; u < PYMOE_UNROLL; u++)
                        if (i0 + u * B < nv) a[u] = __ldg(src + i0 + u * B);
#pragma unroll
                    for (int u = 0; u < PYMOE_UNROLL; u++)
                        if (i0 + u * B < nv) acc[u] = V::axpy(wj, a[u], acc[u]);
                }
                VT *dv = reinterpret_cast<VT *>(out + head);
#pragma unroll
                for (int u = 0; u < PYMOE_UNROLL; u++)
                    if (i0 + u * B < nv) dv[i0 + u * B] = acc[u];
            }
            for (int64_t d = head + nv * V::n + g; d < D; d += B) {
                REAL acc = 0;
                for (int64_t j = 0; j < K; j++)
                    if (row[mine + j] >= 0)
                        acc = acc + w[mine + j] * __ldg(expert_out + row[mine + j] * D + d);
                out[d] = acc;
            }
        }
        __syncthreads();  // row/w are read before the next tokens overwrite them
    }
}

// ---------------------------------------------------------------------------------------------
// gate_grad_kernel: dgate[t, j] = <dy[t, :], expert_out[e_tj, p_tj, :]> for kept pairs, 0 for
// dropped ones (the second half of combine's backward).
// Launch: grid = min(T, 2^31 - 1) blocks striding over tokens, block = B threads.
// The token's pairs are loaded once (shared memory); then choices go in groups of 4: one pass
// over D loads each dy vector once and dots it with the group's 4 rows (4 partial sums in
// registers), so dy is read ceil(K / 4) times, from L1 after the first (a group of 8 spilled on
// sm_80 under the 64-register cap of 1024-thread blocks). Each partial is reduced by a warp
// butterfly, then the warps' sums are added in warp order by one thread per
// choice: a fixed order, so the result never depends on timing.
// Bytes (s = sizeof(REAL)): read (T + kept)*D*s, write T*K*s, plus T*K*16 of indices.
#define PYMOE_GATE_GROUP 4
template <typename REAL>
__global__ void __launch_bounds__(PYMOE_MAX_BLOCK)
gate_grad_kernel(REAL *__restrict__ dgate, const REAL *__restrict__ dy,
                 const REAL *__restrict__ expert_out, const int64_t *__restrict__ expert_index,
                 const int64_t *__restrict__ position, int64_t T, int64_t K, int64_t E,
                 int64_t C, int64_t D, int *status) {
    typedef Vec<REAL> V;
    typedef typename V::type VT;
    PYMOE_SHARED(int64_t, row, PYMOE_MAX_K);
    PYMOE_SHARED(REAL, unit_weight, PYMOE_MAX_K);  // load_pairs fills it with 1s (no weight)
    PYMOE_SHARED(REAL, part, PYMOE_GATE_GROUP * 32);
    const int64_t B = blockDim.x;
    const int lane = threadIdx.x % 32, wp = threadIdx.x / 32, W = blockDim.x / 32;
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        load_pairs<REAL>(row, unit_weight, t, 1, expert_index, position, (const REAL *)nullptr, T,
                         K, E, C, status);
        __syncthreads();
        const REAL *g = dy + t * D;
        for (int64_t j0 = 0; j0 < K; j0 += PYMOE_GATE_GROUP) {
            const int64_t nj = K - j0 < PYMOE_GATE_GROUP ? K - j0 : PYMOE_GATE_GROUP;
            const REAL *src[PYMOE_GATE_GROUP];  // the group's rows (NULL: dropped / absent)
            int64_t head = head_of(g);
            bool vec = true;
#pragma unroll
            for (int u = 0; u < PYMOE_GATE_GROUP; u++) {
                const int64_t r = u < nj ? (int64_t)row[j0 + u] : -1;
                src[u] = r >= 0 ? expert_out + r * D : nullptr;
                vec = vec && (!src[u] || head_of(src[u]) == head);
            }
            if (!vec || head > D) head = D;
            const int64_t nv = (D - head) / V::n;
            REAL acc[PYMOE_GATE_GROUP];
#pragma unroll
            for (int u = 0; u < PYMOE_GATE_GROUP; u++) acc[u] = 0;
            for (int64_t d = threadIdx.x; d < head; d += B) {
                const REAL a = __ldg(g + d);
#pragma unroll
                for (int u = 0; u < PYMOE_GATE_GROUP; u++)
                    if (src[u]) acc[u] += a * __ldg(src[u] + d);
            }
            const VT *gv = reinterpret_cast<const VT *>(g + head);
            for (int64_t i = threadIdx.x; i < nv; i += B) {
                const VT a = __ldg(gv + i);
#pragma unroll
                for (int u = 0; u < PYMOE_GATE_GROUP; u++)
                    if (src[u])
                        acc[u] += V::dot(a, __ldg(reinterpret_cast<const VT *>(src[u] + head) + i));
            }
            for (int64_t d = head + nv * V::n + threadIdx.x; d < D; d += B) {
                const REAL a = __ldg(g + d);
#pragma unroll
                for (int u = 0; u < PYMOE_GATE_GROUP; u++)
                    if (src[u]) acc[u] += a * __ldg(src[u] + d);
            }
#pragma unroll
            for (int u = 0; u < PYMOE_GATE_GROUP; u++) {
                if (u >= nj) break;  // uniform over the block
                const REAL s = warp_sum(acc[u]);
                if (lane == 0) part[u * 32 + wp] = s;
            }
            __syncthreads();
            if (threadIdx.x < nj) {
                REAL s = 0;
                for (int i = 0; i < W; i++) s += part[threadIdx.x * 32 + i];
                dgate[t * K + j0 + threadIdx.x] = row[j0 + threadIdx.x] >= 0 ? s : (REAL)0;
            }
            __syncthreads();  // part is read before the next group overwrites it
        }
    }
}
