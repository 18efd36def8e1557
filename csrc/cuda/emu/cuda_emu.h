// CPU emulation of the CUDA features pymoe's kernels use, so that csrc/cuda/kernels.cuh and the
// host API in csrc/cuda/pymoe_cuda.cu compile as plain C++20 (g++ -DPYMOE_EMULATE) and run under
// pytest on a machine without a GPU. Not a general CUDA emulator: just enough, and strict.
//
// Execution model. Blocks run one after another. Inside a block:
//  - Loop mode (kernels without barriers): threads run to completion one after another. A
//    __syncthreads() in this mode is an error (the launch fails), so a kernel that needs a
//    barrier cannot silently run without one.
//  - Fiber mode (kernels with __syncthreads): each CUDA thread is a ucontext fiber with its own
//    stack; a barrier suspends the fiber until every thread of the block has reached it. A block
//    whose threads do not all reach the same barrier (divergent __syncthreads, undefined on a GPU)
//    fails the launch.
// __shared__ variables become function statics: one copy, shared by the threads of the block that
// is running. Atomics are plain read-modify-writes (only one fiber runs at a time). Warp-level
// primitives (shuffles, votes) are deliberately absent: kernels meant to be tested here use
// block-level patterns.
//
// PYMOE_EMU_NOOP_BARRIER makes __syncthreads a no-op and runs everything in loop mode: the tests
// build that variant once to show that the kernels' results really depend on the barriers.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ------------------------------------------------------------------ runtime subset
typedef int cudaError_t;
enum : int {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };

namespace emu {

enum class Mode { Loop, Fibers };

struct State {
    uint3 thread{0, 0, 0}, block{0, 0, 0};
    dim3 block_dim, grid_dim;
    Mode mode = Mode::Loop;
    cudaError_t last_error = cudaSuccess;
    // fiber bookkeeping
    ucontext_t scheduler;
    std::vector<ucontext_t> fibers;
    std::vector<int> fiber_state;  // 0 runnable, 1 waiting at a barrier, 2 finished
    std::vector<char> stacks;
    int current = 0;
    bool barrier_misuse = false;
    const std::function<void()> *body = nullptr;
};
inline State state;
constexpr size_t kFiberStack = 64 * 1024;

inline uint3 unflatten(unsigned i, dim3 d) { return {i % d.x, (i / d.x) % d.y, i / (d.x * d.y)}; }

inline void syncthreads() {
#ifdef PYMOE_EMU_NOOP_BARRIER
    return;
#else
    if (state.mode == Mode::Loop) {  // a barrier in a kernel launched without barrier support
        state.barrier_misuse = true;
        return;
    }
    state.fiber_state[state.current] = 1;
    swapcontext(&state.fibers[state.current], &state.scheduler);
#endif
}

inline void fiber_main() {
    (*state.body)();
    state.fiber_state[state.current] = 2;  // returning resumes the scheduler (uc_link)
}

// Run one block in fiber mode; returns false on a divergent barrier.
inline bool run_block_fibers(unsigned nthreads) {
    state.fibers.resize(nthreads);
    state.fiber_state.assign(nthreads, 0);
    if (state.stacks.size() < nthreads * kFiberStack) state.stacks.resize(nthreads * kFiberStack);
    for (unsigned i = 0; i < nthreads; i++) {
        ucontext_t &f = state.fibers[i];
        getcontext(&f);
        f.uc_stack.ss_sp = state.stacks.data() + i * kFiberStack;
        f.uc_stack.ss_size = kFiberStack;
        f.uc_link = &state.scheduler;
        makecontext(&f, fiber_main, 0);
    }
    for (;;) {
        for (unsigned i = 0; i < nthreads; i++) {
            if (state.fiber_state[i] != 0) continue;
            state.current = (int)i;
            state.thread = unflatten(i, state.block_dim);
            swapcontext(&state.scheduler, &state.fibers[i]);
        }
        unsigned done = 0, waiting = 0;
        for (int s : state.fiber_state) { done += s == 2; waiting += s == 1; }
        if (done == nthreads) return true;
        if (done > 0) return false;  // some threads finished while others wait at a barrier
        for (int &s : state.fiber_state) s = 0;  // everyone arrived: release the barrier
        (void)waiting;
    }
}

// Launch `body` (a call of the kernel) over grid x block; sets the error cudaGetLastError reads.
inline void launch(dim3 grid, dim3 block, bool barriers, const std::function<void()> &body) {
    unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        state.last_error = cudaErrorInvalidConfiguration;
        return;
    }
#ifdef PYMOE_EMU_NOOP_BARRIER
    barriers = false;
#endif
    state.block_dim = block;
    state.grid_dim = grid;
    state.mode = barriers ? Mode::Fibers : Mode::Loop;
    state.body = &body;
    state.barrier_misuse = false;
    unsigned nblocks = grid.x * grid.y * grid.z;
    for (unsigned b = 0; b < nblocks; b++) {
        state.block = unflatten(b, grid);
        if (barriers) {
            if (!run_block_fibers(nthreads)) {
                state.last_error = cudaErrorLaunchFailure;
                return;
            }
        } else {
            for (unsigned i = 0; i < nthreads; i++) {
                state.thread = unflatten(i, block);
                body();
            }
        }
        if (state.barrier_misuse) {
            state.last_error = cudaErrorLaunchFailure;
            return;
        }
    }
}

}  // namespace emu

#define threadIdx (::emu::state.thread)
#define blockIdx (::emu::state.block)
#define blockDim (::emu::state.block_dim)
#define gridDim (::emu::state.grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline int atomicOr(int *address, int val) {
    int old = *address;
    *address = old | val;
    return old;
}

inline cudaError_t cudaGetLastError() {
    cudaError_t e = emu::state.last_error;
    emu::state.last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;  // the emulated device
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void *ptr, int value, size_t n, cudaStream_t = nullptr) {
    std::memset(ptr, value, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
    std::memmove(dst, src, n);
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void **ptr, size_t n) {
    *ptr = std::malloc(n ? n : 1);
    return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void *ptr) {
    std::free(ptr);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *ptr, int value, size_t n) { return cudaMemsetAsync(ptr, value, n); }
inline const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaErrorUnknown";
    }
}
inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorLaunchFailure:
            return "unspecified launch failure (emulator: a barrier in a kernel launched without "
                   "barrier support, or a divergent __syncthreads)";
        default: return "emulated CUDA error";
    }
}

// Kernel launches: the host API writes PYMOE_LAUNCH(kernel, grid, block, stream, args...) and
// PYMOE_LAUNCH_BARRIER for kernels that call __syncthreads; under nvcc both are kernel<<<...>>>.
// The stream is accepted and ignored: the emulator runs every launch to completion in order.
#define PYMOE_LAUNCH(kernel, grid, block, stream, ...) \
    ((void)(stream), ::emu::launch((grid), (block), false, [&] { kernel(__VA_ARGS__); }))
#define PYMOE_LAUNCH_BARRIER(kernel, grid, block, stream, ...) \
    ((void)(stream), ::emu::launch((grid), (block), true, [&] { kernel(__VA_ARGS__); }))
