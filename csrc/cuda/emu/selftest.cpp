// Self-test of the CUDA emulation shim (run by tests/backend/test_cuda_emulator.py):
//   g++ -std=c++20 -DPYMOE_EMULATE csrc/cuda/emu/selftest.cpp -o selftest && ./selftest [CASE]
// Each case launches a small kernel and checks what the emulator must do with it: compute the
// right answer when the kernel is right, and fail the launch, naming the reason, when it has a
// bug a GPU would punish (a missing barrier, a missing __syncwarp, a wrong shuffle mask, a
// shared-memory race, a write to another device's memory). Without CASE every case runs.
// Prints one line per case, "ok CASE: detail"; exit code = number of failed cases.
#include <cstdio>
#include <string>

#include "cuda_emu.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;

__global__ void block_sum(const int *in, int *out) {  // tree reduction over one block
    PYMOE_SHARED(int, partial, 256);
    partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

__global__ void divergent(int *out) {  // only even threads reach the barrier: undefined on a GPU
    if (threadIdx.x % 2 == 0) __syncthreads();
    out[threadIdx.x] = 1;
}

// Warp primitives computing known answers.
__global__ void warp_ops(int *out) {
    const unsigned lane = threadIdx.x % 32;
    int v = (int)lane;
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
    out[threadIdx.x * 4 + 0] = v;                                   // 0 + ... + 31 = 496
    out[threadIdx.x * 4 + 1] = (int)__ballot_sync(kFull, lane % 3 == 0);
    out[threadIdx.x * 4 + 2] = (int)__match_any_sync(kFull, lane % 4);
    int up = __shfl_up_sync(kFull, (int)lane * 10, 1);              // lane 0 keeps its own
    out[threadIdx.x * 4 + 3] = up + __shfl_sync(kFull, 7, 31) * 1000;  // every lane reads lane 31
}

// Warp-synchronous reduction through shared memory, written as before Volta: the lanes of a
// warp are assumed to run in lockstep. `sync` puts the __syncwarp between the steps that Volta's
// independent thread scheduling needs.
template <bool sync>
__global__ void warp_smem_sum(int *out) {  // 1 + 2 + ... + 32 = 528
    PYMOE_SHARED(int, s, 32);
    const unsigned lane = threadIdx.x;
    s[lane] = (int)lane + 1;
    if (sync) __syncwarp();
    for (unsigned half = 16; half > 0; half /= 2) {
        int v = lane < half ? (int)s[lane + half] : 0;
        if (sync) __syncwarp();
        if (lane < half) s[lane] += v;
        if (sync) __syncwarp();
    }
    if (lane == 0) out[0] = s[0];
}

// Sum over the lower half-warp with a half-warp mask. Right: width 16, so lane 8 + 8 stays in
// its segment (it keeps its own value). Wrong: width 32, so lane 8 reads lane 16, outside the mask.
template <bool wrong>
__global__ void half_warp_sum(int *out) {
    const unsigned lane = threadIdx.x % 32;
    if (lane >= 16) return;
    int v = (int)lane;
    const unsigned mask = 0x0000ffffu;
    for (int off = 8; off > 0; off /= 2) v += __shfl_down_sync(mask, v, off, wrong ? 32 : 16);
    if (lane == 0) out[0] = v;  // 0 + ... + 15 = 120
}

__global__ void full_mask_in_branch(int *out) {  // only half the warp reaches a full-mask shuffle
    const unsigned lane = threadIdx.x % 32;
    if (lane < 16) out[lane] = __shfl_sync(kFull, (int)lane, 0);
}

__global__ void mask_without_me(int *out) {  // lane 0 names a mask that excludes itself
    out[threadIdx.x] = __shfl_sync(0xfffffffeu, (int)threadIdx.x, 1);
}

// Each thread writes its slot, then reads its neighbour's: right only with the barrier.
template <bool barrier>
__global__ void neighbour(int *out) {
    PYMOE_SHARED(int, s, 1024);
    s[threadIdx.x] = (int)threadIdx.x * 2;
    if (barrier) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void record_order(int *order, int *next) { order[(*next)++] = (int)threadIdx.x; }

__global__ void set_status(int *status) { atomicOr(status, 1); }

__global__ void out_of_bounds(int *out) {
    PYMOE_SHARED(int, s, 32);
    s[threadIdx.x] = 1;  // launched with 64 threads
    out[0] = 0;
}

struct Result {
    bool ok;
    std::string detail;
};

cudaError_t err;
std::string why() { return cudaGetErrorString(err); }
Result caught(const char *needle) {  // the launch failed, naming `needle`
    if (err != cudaErrorLaunchFailure) return {false, "the launch did not fail"};
    return {why().find(needle) != std::string::npos, why()};
}

Result case_barrier() {
    int in[512], out[2] = {0, 0};
    for (int i = 0; i < 512; i++) in[i] = i;
    err = PYMOE_LAUNCH_SYNC(block_sum, 2, 256, 0, nullptr, in, out);
    int want0 = 255 * 256 / 2, want1 = (256 + 511) * 256 / 2;
    if (err || out[0] != want0 || out[1] != want1)
        return {false, "reduction gave " + std::to_string(out[0]) + " " + std::to_string(out[1])};
    return {true, "a tree reduction with barriers is right"};
}
Result case_barrier_in_loop_mode() {
    int in[512] = {0}, out[2];
    err = PYMOE_LAUNCH(block_sum, 2, 256, 0, nullptr, in, out);
    return caught("without barrier support");
}
// The one-block launches below: kernel(block_out) on `threads` threads, waited for.
int block_out[1024];
void run_block(void (*kernel)(int *), unsigned threads) {
    err = PYMOE_LAUNCH_SYNC(kernel, 1, threads, 0, nullptr, block_out);
}
Result fails(void (*kernel)(int *), unsigned threads, const char *needle) {
    run_block(kernel, threads);
    return caught(needle);
}
Result works(bool right, const char *detail) {  // after run_block: no error, and right
    return {err == cudaSuccess && right, err ? why() : detail};
}

Result case_divergent_barrier() { return fails(divergent, 64, "divergent __syncthreads"); }
Result case_oversized_block() {
    run_block(divergent, 2048);
    return {err == cudaErrorInvalidConfiguration, cudaGetErrorName(err)};
}
Result case_warp_primitives() {
    run_block(warp_ops, 64);
    if (err) return {false, why()};
    const int *out = block_out;
    for (unsigned t = 0; t < 64; t++) {
        unsigned lane = t % 32, ballot = 0, match = 0;
        for (unsigned l = 0; l < 32; l++) {
            ballot |= (l % 3 == 0 ? 1u : 0u) << l;
            match |= (l % 4 == lane % 4 ? 1u : 0u) << l;
        }
        int up = lane == 0 ? 0 : (int)(lane - 1) * 10;
        if (out[t * 4] != 496 || (unsigned)out[t * 4 + 1] != ballot ||
            (unsigned)out[t * 4 + 2] != match || out[t * 4 + 3] != up + 7000)
            return {false, "wrong result in thread " + std::to_string(t)};
    }
    return {true, "shuffles, ballot and match_any give the documented results"};
}
Result case_syncwarp_present() {
    run_block(warp_smem_sum<true>, 32);
    return works(block_out[0] == 528, "with __syncwarp: sum is right");
}
Result case_missing_syncwarp() {
    return fails(warp_smem_sum<false>, 32, "shared-memory race on s[");
}
Result case_right_shuffle_mask() {
    run_block(half_warp_sum<false>, 32);
    return works(block_out[0] == 120, "half-warp mask: sum is right");
}
Result case_wrong_shuffle_mask() {
    return fails(half_warp_sum<true>, 32, "which is not in the mask");
}
Result case_mask_names_absent_lanes() {
    return fails(full_mask_in_branch, 32, "which has finished");
}
Result case_mask_without_caller() { return fails(mask_without_me, 32, "which is not in it"); }
Result case_barrier_orders_shared() {
    run_block(neighbour<true>, 256);
    bool right = true;
    for (int i = 0; i < 256; i++) right &= block_out[i] == (i + 1) % 256 * 2;
    return works(right, "with __syncthreads: no race, right values");
}
Result case_shared_race() { return fails(neighbour<false>, 256, "shared-memory race on s["); }
Result case_shared_out_of_bounds() {
    err = PYMOE_LAUNCH(out_of_bounds, 1, 64, 0, nullptr, block_out);
    return caught("out of bounds [0, 32) in s");
}
Result case_random_order() {  // threads do not run in ascending order, and the seed fixes it
    int order[256], next = 0, again[256];
    err = PYMOE_LAUNCH(record_order, 1, 256, 0, nullptr, order, &next);
    bool ascending = true;
    for (int i = 0; i < 256; i++) ascending &= order[i] == i;
    next = 0;
    emu::state.launches--;  // the same launch number: the same order
    err = PYMOE_LAUNCH(record_order, 1, 256, 0, nullptr, again, &next);
    bool same = std::equal(order, order + 256, again);
    return {!ascending && same && !err, ascending ? "ascending order" : "random, reproducible"};
}
Result case_other_device_memory() {
    int *status = nullptr;
    cudaSetDevice(0);
    cudaMalloc((void **)&status, sizeof(int));
    cudaSetDevice(1);
    err = PYMOE_LAUNCH(set_status, 1, 32, 0, nullptr, status);
    Result r = caught("atomicOr on memory of device 0 by a kernel running on device 1");
    cudaSetDevice(0);
    cudaError_t same = PYMOE_LAUNCH(set_status, 1, 32, 0, nullptr, status);
    cudaFree(status);
    if (same != cudaSuccess) return {false, "same-device atomic failed"};
    return r;
}

struct Case {
    const char *name;
    Result (*run)();
};
const Case kCases[] = {
    {"barrier", case_barrier},
    {"barrier_in_loop_mode", case_barrier_in_loop_mode},
    {"divergent_barrier", case_divergent_barrier},
    {"oversized_block", case_oversized_block},
    {"warp_primitives", case_warp_primitives},
    {"syncwarp_present", case_syncwarp_present},
    {"missing_syncwarp", case_missing_syncwarp},
    {"right_shuffle_mask", case_right_shuffle_mask},
    {"wrong_shuffle_mask", case_wrong_shuffle_mask},
    {"mask_names_absent_lanes", case_mask_names_absent_lanes},
    {"mask_without_caller", case_mask_without_caller},
    {"barrier_orders_shared", case_barrier_orders_shared},
    {"shared_race", case_shared_race},
    {"shared_out_of_bounds", case_shared_out_of_bounds},
    {"random_order", case_random_order},
    {"other_device_memory", case_other_device_memory},
};

}  // namespace

int main(int argc, char **argv) {
    int failures = 0, ran = 0;
    for (const Case &c : kCases) {
        if (argc > 1 && std::string(argv[1]) != c.name) continue;
        Result r = c.run();
        std::printf("%s %s: %s\n", r.ok ? "ok" : "FAIL", c.name, r.detail.c_str());
        failures += !r.ok;
        ran++;
    }
    if (ran == 0) {
        std::printf("FAIL no case named %s\n", argv[1]);
        return 1;
    }
    if (!failures) std::printf("emulator self-test passed\n");
    return failures;
}
