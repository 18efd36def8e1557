// CPU emulation of the CUDA features pymoe's kernels use, so that csrc/cuda/kernels.cuh and the
// host API in csrc/cuda/pymoe_cuda.cu compile as plain C++20 (g++ -DPYMOE_EMULATE) and run under
// pytest on a machine without a GPU. Not a general CUDA emulator: just enough, and strict.
//
// Execution model. Blocks run one after another. Inside a block:
//  - Loop mode (PYMOE_LAUNCH: kernels without barriers or warp primitives): threads run to
//    completion one after another, in a seeded random order. A __syncthreads or a warp primitive
//    in this mode fails the launch, so a kernel cannot silently run without its synchronisation.
//  - Fiber mode (PYMOE_LAUNCH_SYNC): each CUDA thread is a ucontext fiber with its own stack. A
//    fiber runs until it reaches __syncthreads or a warp primitive; the runnable fibers are
//    resumed in a seeded random order (a new order each round), so code that is right only when
//    threads happen to run in ascending order fails. __syncthreads releases when every thread of
//    the block has reached it; a block whose threads do not all reach it fails the launch.
// Warps are lanes 32w..32w+31 of the block (blockDim.x a multiple of 32 is required). The lanes
// of a warp run independently (Volta's independent thread scheduling) and meet only in the
// *_sync primitives: __shfl_sync/_up/_down/_xor, __ballot_sync, __any_sync, __all_sync,
// __match_any_sync, __syncwarp. Each checks its mask as the CUDA programming guide requires:
// the calling lane must be in the mask, every lane of the mask must reach the same primitive with
// the same mask (else the launch fails: lanes that never arrive are a deadlock on a GPU), and a
// shuffle may only read a lane that is in the mask.
// Shared memory is declared with PYMOE_SHARED / PYMOE_SHARED_DYN (kernels.cuh). Every access is
// bounds-checked and shadowed: two different threads touching the same element with at least
// one write, with no __syncthreads (or, inside a warp, a __syncwarp over both) between them, is a
// race and fails the launch. (Shuffles and votes do not order memory, as on a GPU.)
// Devices: the emulator has kDevices fake devices (cudaSetDevice/cudaGetDevice); cudaMalloc tags
// memory with the current device, and an atomic on memory of another device than the one the
// kernel runs on fails the launch (pymoe's status word is the one thing written by atomics).
// Streams are accepted and ignored: every launch runs to completion, in call order.
//
// PYMOE_EMU_NOOP_BARRIER makes __syncthreads and __syncwarp no-ops (everything else as usual):
// the tests build that variant once to show that the kernels' barriers are needed.
// PYMOE_EMU_SEED (environment) changes the thread order seed.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)

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
    cudaErrorInvalidDevice = 101,
    cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };

namespace emu {

constexpr int kDevices = 2;                // fake devices, for the multi-device logic
constexpr size_t kFiberStack = 16 * 1024;  // kernels keep small frames; less TLB traffic
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without the opt-in attribute, as on a GPU

enum class Wait : uint8_t { Run, Barrier, Warp, Done };
enum class Op : uint8_t { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Match, SyncWarp };
inline const char *op_name(Op op) {
    static const char *names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                  "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync",
                                  "__match_any_sync", "__syncwarp"};
    return names[(int)op];
}

struct Thread {
    Wait wait = Wait::Run;
    Op op = Op::Shfl;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
    uint32_t clock[32];  // vector clock over the lanes of its warp (shared-memory race check)
};

// Switching fibers: on x86-64 a six-register switch (swapcontext also saves the signal mask, a
// system call per switch, which made 1024-thread blocks with warp shuffles ~10x slower);
// elsewhere ucontext. Include this header in one translation unit per binary (global asm).
#if defined(__x86_64__) && !defined(PYMOE_EMU_UCONTEXT)
extern "C" void pymoe_emu_switch(void **save_sp, void *sp);
__asm__(R"(
    .text
    .globl pymoe_emu_switch
    .hidden pymoe_emu_switch
    .type pymoe_emu_switch, @function
pymoe_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pymoe_emu_switch, .-pymoe_emu_switch
)");
struct FiberContext {
    void *sp = nullptr;
};
[[noreturn]] inline void fiber_entry();
inline void switch_to(FiberContext &from, FiberContext &to) { pymoe_emu_switch(&from.sp, to.sp); }
inline void make_fiber(FiberContext &f, char *stack, size_t size) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;                      // fake return address: entry sees rsp % 16 == 8
    *--sp = (void *)&fiber_entry;         // where the first switch "returns" to
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp, rbx, r12-r15
    f.sp = sp;
}
#else
struct FiberContext {
    ucontext_t uc;
};
inline void switch_to(FiberContext &from, FiberContext &to) { swapcontext(&from.uc, &to.uc); }
#endif

// Shadow of one shared-memory element: who touched it since the last block-wide barrier.
struct Shadow {
    uint64_t generation = 0;
    int32_t writer = -1;
    uint32_t writer_clock = 0;
    std::vector<std::pair<int32_t, uint32_t>> readers;  // since the last write
};

struct State {
    uint3 thread{0, 0, 0}, block{0, 0, 0};
    dim3 block_dim, grid_dim;
    bool fibers = false, failed = false;
    int device = 0;        // the device the running kernel was launched on
    std::string error;     // why the last launch failed
    std::vector<Thread> th;
    std::vector<FiberContext> ctx;
    std::vector<char> stacks;
    int current = 0;
    unsigned nthreads = 0;
    FiberContext scheduler;
    const std::function<void()> *body = nullptr;
    uint64_t generation = 1;  // a new value at each block start and each __syncthreads release
    uint64_t rng = 0;
    uint64_t launches = 0;
    std::vector<unsigned char> dynamic_shared;
    std::vector<Shadow> dynamic_shadow;
};
// One emulated GPU state for the process: launches from several host threads take turns
// (launch_mutex); the current device is per host thread, as in the CUDA runtime. (A
// thread_local state cost a TLS lookup per threadIdx read: half the emulator's time.)
inline State state;
inline std::mutex launch_mutex;
inline thread_local int current_device = 0;

inline uint64_t next_random() {  // splitmix64
    uint64_t z = (state.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

inline void shuffle(std::vector<unsigned> &v) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[next_random() % i]);
}

// Record the first failure of the running launch (later ones would only be consequences).
inline void fail(const std::string &why) {
    if (!state.failed) {
        state.failed = true;
        state.error = why;
    }
}

inline std::string describe_thread(unsigned i) {
    return "thread " + std::to_string(i) + " (warp " + std::to_string(i / 32) + ", lane " +
           std::to_string(i % 32) + ") of block " + std::to_string(state.block.x);
}

// ------------------------------------------------------------------ device memory
struct Allocation {
    size_t size;
    int device;
};
inline std::mutex memory_mutex;
inline std::map<uintptr_t, Allocation> memory;  // cudaMalloc'd ranges and their device

inline int device_of(const void *p) {  // -1: not cudaMalloc'd (host memory, NumPy arrays)
    std::lock_guard<std::mutex> lock(memory_mutex);
    auto it = memory.upper_bound((uintptr_t)p);
    if (it == memory.begin()) return -1;
    --it;
    return (uintptr_t)p < it->first + it->second.size ? it->second.device : -1;
}

// False (and the launch fails) when p is memory of another device than the kernel's.
inline bool check_device(const void *p, const char *what) {
    int d = device_of(p);
    if (d < 0 || d == state.device) return true;
    fail(std::string(what) + " on memory of device " + std::to_string(d) +
         " by a kernel running on device " + std::to_string(state.device));
    return false;
}

// ------------------------------------------------------------------ shared-memory race check
inline uint32_t own_clock(unsigned i) { return state.th[i].clock[i % 32]; }

// Is thread y's access at its clock cy ordered before thread x's current access?
inline bool ordered(int32_t y, uint32_t cy, unsigned x) {
    return (unsigned)y == x || ((unsigned)y / 32 == x / 32 && state.th[x].clock[y % 32] > cy);
}

inline void shadow_access(Shadow &s, bool write, const char *name, size_t index) {
    const unsigned x = (unsigned)state.current;
    if (s.generation != state.generation) {
        s.generation = state.generation;
        s.writer = -1;
        s.readers.clear();
    }
    auto race = [&](int32_t other, const char *kinds) {
        fail(std::string("shared-memory race on ") + name + "[" + std::to_string(index) + "]: " +
             describe_thread((unsigned)other) + " and " + describe_thread(x) + " (" + kinds +
             ") with no __syncthreads or __syncwarp between them");
    };
    if (s.writer >= 0 && !ordered(s.writer, s.writer_clock, x))
        race(s.writer, write ? "write, write" : "write, read");
    if (write) {
        for (auto &r : s.readers)
            if (!ordered(r.first, r.second, x)) race(r.first, "read, write");
        s.writer = (int32_t)x;
        s.writer_clock = own_clock(x);
        s.readers.clear();
    } else if (s.readers.empty() || s.readers.back().first != (int32_t)x) {
        s.readers.emplace_back((int32_t)x, own_clock(x));
    } else {
        s.readers.back().second = own_clock(x);
    }
}

template <typename T>
struct SharedRef {
    T *p;
    Shadow *s;
    const char *name;
    size_t index;
    operator T() const {
        shadow_access(*s, false, name, index);
        return *p;
    }
    SharedRef &operator=(T v) {
        shadow_access(*s, true, name, index);
        *p = v;
        return *this;
    }
    SharedRef &operator=(const SharedRef &o) { return *this = (T)o; }
    SharedRef &operator+=(T v) { return *this = (T)*this + v; }
    SharedRef &operator-=(T v) { return *this = (T)*this - v; }
};

template <typename T>
struct SharedSpan {  // n elements of T in shared memory, each with its shadow
    T *data;
    Shadow *shadow;
    size_t n;
    const char *name;
    T dummy;
    Shadow dummy_shadow;
    SharedRef<T> operator[](size_t i) {
        if (i >= n) {
            fail(std::string("shared-memory index ") + std::to_string(i) + " out of bounds [0, " +
                 std::to_string(n) + ") in " + name + " by " +
                 describe_thread((unsigned)state.current));
            return {&dummy, &dummy_shadow, name, i};
        }
        return {data + i, shadow + i, name, i};
    }
};

template <typename T, size_t N>
struct SharedArray : SharedSpan<T> {  // a static __shared__ T name[N]
    T storage[N];
    Shadow shadows[N];
    explicit SharedArray(const char *name) : SharedSpan<T>{storage, shadows, N, name, T(), {}} {}
};

// The launch's dynamic shared memory (extern __shared__), viewed as T; one shadow per element.
template <typename T>
inline SharedSpan<T> dynamic_shared(const char *name) {
    return {reinterpret_cast<T *>(state.dynamic_shared.data()), state.dynamic_shadow.data(),
            state.dynamic_shared.size() / sizeof(T), name, T(), {}};
}

// ------------------------------------------------------------------ fibers and warps
inline void yield_to_scheduler() { switch_to(state.ctx[state.current], state.scheduler); }

inline void syncthreads() {
#ifndef PYMOE_EMU_NOOP_BARRIER
    if (!state.fibers) {
        fail("__syncthreads in a kernel launched without barrier support (PYMOE_LAUNCH)");
        return;
    }
    state.th[state.current].wait = Wait::Barrier;
    yield_to_scheduler();
#endif
}

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// A warp primitive: park this lane until every lane of `mask` has arrived, then return its result.
inline uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg = 0, int width = 32) {
#ifdef PYMOE_EMU_NOOP_BARRIER
    if (op == Op::SyncWarp) return 0;
#endif
    const unsigned me = (unsigned)state.current, lane = me % 32;
    if (!state.fibers) {
        fail(std::string(op_name(op)) + " in a kernel launched without warp support (PYMOE_LAUNCH)");
        return 0;
    }
    if (!(mask >> lane & 1u)) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s with mask 0x%08x called by lane %u, which is not in it",
                      op_name(op), mask, lane);
        fail(std::string(buf) + " (" + describe_thread(me) + ")");
        return 0;
    }
    Thread &t = state.th[me];
    t.wait = Wait::Warp;
    t.op = op;
    t.mask = mask;
    t.value = value;
    t.arg = arg;
    t.width = width;
    yield_to_scheduler();
    return state.th[me].result;
}

// Complete the primitive of warp lanes waiting with `mask` (all of them have arrived).
inline void resolve(unsigned base, unsigned mask) {
    Thread *w = &state.th[base];
    const Op op = w[__builtin_ctz(mask)].op;
    uint64_t ballot = 0;
    for (unsigned l = 0; l < 32; l++)
        if (mask >> l & 1u) ballot |= (uint64_t)(w[l].value != 0) << l;
    uint32_t merged[32] = {0};
    if (op == Op::SyncWarp) {  // memory ordering: everyone sees everyone's clock, plus one
        for (unsigned l = 0; l < 32; l++)
            if (mask >> l & 1u) w[l].clock[l]++;
        for (unsigned l = 0; l < 32; l++)
            if (mask >> l & 1u)
                for (unsigned q = 0; q < 32; q++) merged[q] = std::max(merged[q], w[l].clock[q]);
    }
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        Thread &t = w[l];
        const unsigned seg = l & ~(unsigned)(t.width - 1);  // first lane of l's width segment
        int src = -1;
        switch (op) {
            case Op::Shfl: src = (int)(seg + ((unsigned)t.arg & (unsigned)(t.width - 1))); break;
            case Op::ShflUp: src = (int)l - t.arg >= (int)seg ? (int)l - t.arg : (int)l; break;
            case Op::ShflDown:
                src = (int)l + t.arg < (int)(seg + t.width) ? (int)l + t.arg : (int)l;
                break;
            case Op::ShflXor: {
                unsigned s = l ^ (unsigned)t.arg;
                src = s < seg + (unsigned)t.width && s >= seg ? (int)s : (int)l;
                break;
            }
            case Op::Ballot: t.result = ballot; break;
            case Op::Any: t.result = ballot != 0; break;
            case Op::All: t.result = ballot == (uint64_t)mask; break;
            case Op::Match: {
                uint64_t m = 0;
                for (unsigned q = 0; q < 32; q++)
                    if ((mask >> q & 1u) && w[q].value == t.value) m |= 1ull << q;
                t.result = m;
                break;
            }
            case Op::SyncWarp: std::memcpy(t.clock, merged, sizeof merged); break;
        }
        if (src >= 0) {
            if (!(mask >> src & 1u)) {
                char buf[200];
                std::snprintf(buf, sizeof buf, "%s with mask 0x%08x: lane %u reads lane %d, which "
                              "is not in the mask (undefined value)", op_name(op), mask, l, src);
                fail(std::string(buf) + " in warp " + std::to_string(base / 32) + " of block " +
                     std::to_string(state.block.x));
            }
            t.result = w[src].value;
        }
    }
    for (unsigned l = 0; l < 32; l++)
        if (mask >> l & 1u) w[l].wait = Wait::Run;
}

// Complete every warp primitive whose lanes have all arrived; on a deadlock, fail with a reason.
inline bool resolve_warps() {
    bool progress = false;
    std::string stuck;
    for (unsigned base = 0; base < state.nthreads; base += 32) {
        for (unsigned l = 0; l < 32 && base + l < state.nthreads; l++) {
            Thread &t = state.th[base + l];
            if (t.wait != Wait::Warp) continue;
            bool complete = true;
            for (unsigned q = 0; q < 32 && complete; q++) {
                if (!(t.mask >> q & 1u)) continue;
                const Thread *o = base + q < state.nthreads ? &state.th[base + q] : nullptr;
                if (o && o->wait == Wait::Warp && o->op == t.op && o->mask == t.mask) continue;
                complete = false;
                if (!stuck.empty()) continue;
                char buf[320];
                const char *where = !o ? "does not exist (past blockDim.x)"
                                    : o->wait == Wait::Done ? "has finished"
                                    : o->wait == Wait::Barrier ? "waits at __syncthreads"
                                    : o->op != t.op ? op_name(o->op) : "uses another mask";
                std::snprintf(buf, sizeof buf, "%s with mask 0x%08x: lane %u waits for lane %u, "
                              "which %s%s", op_name(t.op), t.mask, l, q, where,
                              o && o->wait == Wait::Warp && o->op != t.op ? " instead" : "");
                stuck = std::string(buf) + " (warp " + std::to_string(base / 32) + " of block " +
                        std::to_string(state.block.x) + ")";
            }
            if (complete) {
                resolve(base, t.mask);
                progress = true;
            }
        }
    }
    if (!progress && !stuck.empty()) fail(stuck);
    return progress;
}

inline void fiber_main() {
    (*state.body)();
    state.th[state.current].wait = Wait::Done;
}

#if defined(__x86_64__) && !defined(PYMOE_EMU_UCONTEXT)
[[noreturn]] inline void fiber_entry() {
    fiber_main();
    FiberContext finished;  // never resumed
    switch_to(finished, state.scheduler);
    __builtin_unreachable();
}
#endif

inline void new_generation() {  // after a block-wide barrier every earlier access is ordered
    state.generation++;
    for (unsigned i = 0; i < state.nthreads; i++) std::memset(state.th[i].clock, 0, 128);
}

// Run one block in fiber mode; false when the launch must fail (state.error says why).
inline bool run_block_fibers() {
    const unsigned n = state.nthreads;
    state.ctx.resize(n);
    if (state.stacks.size() < n * kFiberStack) state.stacks.resize(n * kFiberStack);
    for (unsigned i = 0; i < n; i++) {
#if defined(__x86_64__) && !defined(PYMOE_EMU_UCONTEXT)
        make_fiber(state.ctx[i], state.stacks.data() + i * kFiberStack, kFiberStack);
#else
        ucontext_t &f = state.ctx[i].uc;
        getcontext(&f);
        f.uc_stack.ss_sp = state.stacks.data() + i * kFiberStack;
        f.uc_stack.ss_size = kFiberStack;
        f.uc_link = &state.scheduler.uc;  // returning from fiber_main resumes the scheduler
        makecontext(&f, fiber_main, 0);
#endif
    }
    std::vector<unsigned> order;
    for (;;) {
        order.clear();
        for (unsigned i = 0; i < n; i++)
            if (state.th[i].wait == Wait::Run) order.push_back(i);
        shuffle(order);
        for (unsigned i : order) {
            state.current = (int)i;
            state.thread = {i % state.block_dim.x, 0, 0};
            switch_to(state.scheduler, state.ctx[i]);
            if (state.failed) return false;
        }
        if (!order.empty()) continue;
        if (resolve_warps()) continue;
        if (state.failed) return false;
        unsigned done = 0, barrier = 0;
        for (unsigned i = 0; i < n; i++) {
            done += state.th[i].wait == Wait::Done;
            barrier += state.th[i].wait == Wait::Barrier;
        }
        if (done == n) return true;
        if (barrier == n) {  // everyone arrived: release the barrier
            for (unsigned i = 0; i < n; i++) state.th[i].wait = Wait::Run;
            new_generation();
            continue;
        }
        fail("divergent __syncthreads: some threads of block " + std::to_string(state.block.x) +
             " finished while others wait at a barrier");
        return false;
    }
}

inline uint64_t seed() {
    const char *s = std::getenv("PYMOE_EMU_SEED");
    return s ? std::strtoull(s, nullptr, 10) : 20261201ull;
}

// Launch `body` (a call of the kernel) over grid x block; returns what cudaLaunchKernelEx would.
inline cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared, bool fibers,
                          const std::function<void()> &body) {
    const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || block.y != 1 || block.z != 1)
        return cudaErrorInvalidConfiguration;  // (the kernels here use 1-D blocks only)
    if (dynamic_shared > kMaxDynamicShared) return cudaErrorInvalidValue;
    if (fibers && block.x % 32 != 0) return cudaErrorInvalidConfiguration;  // whole warps
    std::lock_guard<std::mutex> lock(launch_mutex);
    state.block_dim = block;
    state.grid_dim = grid;
    state.fibers = fibers;
    state.body = &body;
    state.failed = false;
    state.error.clear();
    state.nthreads = (unsigned)nthreads;
    state.th.assign(nthreads, Thread());
    state.device = current_device;
    state.rng = seed() * 0x2545f4914f6cdd1dull + ++state.launches;
    state.dynamic_shared.assign(dynamic_shared, 0xcd);  // uninitialised, as on a GPU
    state.dynamic_shadow.assign(dynamic_shared, Shadow());
    std::vector<unsigned> order(nthreads);
    for (uint64_t b = 0; b < (uint64_t)grid.x * grid.y * grid.z; b++) {
        state.block = {(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                       (unsigned)(b / ((uint64_t)grid.x * grid.y))};
        for (unsigned i = 0; i < nthreads; i++) state.th[i] = Thread();
        new_generation();
        if (fibers) {
            if (!run_block_fibers()) return cudaErrorLaunchFailure;
        } else {
            for (unsigned i = 0; i < nthreads; i++) order[i] = i;
            shuffle(order);
            for (unsigned i : order) {
                state.current = (int)i;
                state.thread = {i, 0, 0};
                body();
                if (state.failed) return cudaErrorLaunchFailure;
            }
        }
    }
    return cudaSuccess;
}

}  // namespace emu

#define threadIdx (::emu::state.thread)
#define blockIdx (::emu::state.block)
#define blockDim (::emu::state.block_dim)
#define gridDim (::emu::state.grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::Op::SyncWarp, mask, 0); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::from_bits<T>(emu::warp_op(emu::Op::Shfl, mask, emu::to_bits(v), src, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::from_bits<T>(emu::warp_op(emu::Op::ShflUp, mask, emu::to_bits(v), (int)delta,
                                          width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::from_bits<T>(emu::warp_op(emu::Op::ShflDown, mask, emu::to_bits(v), (int)delta,
                                          width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::from_bits<T>(emu::warp_op(emu::Op::ShflXor, mask, emu::to_bits(v), lane_mask,
                                          width));
}
inline unsigned __ballot_sync(unsigned mask, int p) {
    return (unsigned)emu::warp_op(emu::Op::Ballot, mask, p != 0);
}
inline int __any_sync(unsigned mask, int p) { return (int)emu::warp_op(emu::Op::Any, mask, p != 0); }
inline int __all_sync(unsigned mask, int p) { return (int)emu::warp_op(emu::Op::All, mask, p != 0); }
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
    return (unsigned)emu::warp_op(emu::Op::Match, mask, emu::to_bits(v));
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
template <typename T>
inline T __ldg(const T *p) { return *p; }

inline int atomicOr(int *address, int val) {
    if (!emu::check_device(address, "atomicOr")) return 0;
    int old = *address;
    *address = old | val;
    return old;
}
inline int atomicAdd(int *address, int val) {
    if (!emu::check_device(address, "atomicAdd")) return 0;
    int old = *address;
    *address = old + val;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long *address, unsigned long long val) {
    if (!emu::check_device(address, "atomicAdd")) return 0;
    unsigned long long old = *address;
    *address = old + val;
    return old;
}

// Shared memory: under nvcc these are `__shared__ T name[n]` and `extern __shared__` arrays.
#define PYMOE_SHARED(T, name, n) static ::emu::SharedArray<T, (n)> name(#name)
#define PYMOE_SHARED_DYN(T, name) ::emu::SharedSpan<T> name = ::emu::dynamic_shared<T>(#name)

// ------------------------------------------------------------------ runtime functions
inline cudaError_t cudaGetDeviceCount(int *count) {
    *count = emu::kDevices;
    return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int *device) {
    *device = emu::current_device;
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= emu::kDevices) return cudaErrorInvalidDevice;
    emu::current_device = device;
    return cudaSuccess;
}
inline cudaError_t cudaMalloc(void **ptr, size_t n) {
    *ptr = std::malloc(n ? n : 1);
    if (!*ptr) return cudaErrorMemoryAllocation;
    std::lock_guard<std::mutex> lock(emu::memory_mutex);
    emu::memory[(uintptr_t)*ptr] = {n ? n : 1, emu::current_device};
    return cudaSuccess;
}
inline cudaError_t cudaFree(void *ptr) {
    if (ptr) {
        std::lock_guard<std::mutex> lock(emu::memory_mutex);
        emu::memory.erase((uintptr_t)ptr);
    }
    std::free(ptr);
    return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void **ptr, size_t n, cudaStream_t) { return cudaMalloc(ptr, n); }
inline cudaError_t cudaFreeAsync(void *ptr, cudaStream_t) { return cudaFree(ptr); }
inline cudaError_t cudaMemsetAsync(void *ptr, int value, size_t n, cudaStream_t = nullptr) {
    int d = emu::device_of(ptr);
    if (d >= 0 && d != emu::current_device) return cudaErrorInvalidValue;
    std::memset(ptr, value, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
    std::memmove(dst, src, n);
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaErrorUnknown";
    }
}
inline const char *cudaGetErrorString(cudaError_t e) {
    static thread_local std::string msg;
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorLaunchFailure:
            msg = "unspecified launch failure (emulator: " + emu::state.error + ")";
            return msg.c_str();
        default: return "emulated CUDA error";
    }
}

// Kernel launches: the host API writes PYMOE_LAUNCH(kernel, grid, block, smem, stream, args...)
// and PYMOE_LAUNCH_SYNC for kernels with __syncthreads or warp primitives; both return the
// launch's cudaError_t (under nvcc: cudaLaunchKernelEx).
#define PYMOE_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ((void)(stream), ::emu::launch(dim3(grid), dim3(block), (smem), false, [&] { kernel(__VA_ARGS__); }))
#define PYMOE_LAUNCH_SYNC(kernel, grid, block, smem, stream, ...) \
    ((void)(stream), ::emu::launch(dim3(grid), dim3(block), (smem), true, [&] { kernel(__VA_ARGS__); }))
