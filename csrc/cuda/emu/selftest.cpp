// Self-test of the CUDA emulation shim (run by tests/test_cuda_emulator.py):
//   g++ -std=c++20 -DPYMOE_EMULATE csrc/cuda/emu/selftest.cpp -o selftest && ./selftest
// It checks the three behaviours the kernel tests rely on: a barrier really synchronises the
// block (a tree reduction is right), a barrier in a kernel launched without barrier support fails
// the launch, and a divergent barrier fails the launch. Exit code 0 = all good.
#include <cstdio>

#include "cuda_emu.h"

__global__ void block_sum(const int *in, int *out) {  // tree reduction over one block
    __shared__ int partial[256];
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

int main() {
    int in[512], out[2] = {0, 0}, ones[64];
    for (int i = 0; i < 512; i++) in[i] = i;
    int failures = 0;

    PYMOE_LAUNCH_BARRIER(block_sum, dim3(2), dim3(256), nullptr, in, out);
    int want0 = 255 * 256 / 2, want1 = (256 + 511) * 256 / 2;
    if (cudaGetLastError() != cudaSuccess || out[0] != want0 || out[1] != want1) {
        std::printf("FAIL: reduction with barriers gave %d %d, want %d %d\n", out[0], out[1],
                    want0, want1);
        failures++;
    }
    PYMOE_LAUNCH(block_sum, dim3(2), dim3(256), nullptr, in, out);  // barriers not honoured
    if (cudaGetLastError() != cudaErrorLaunchFailure) {
        std::printf("FAIL: a barrier in loop mode did not fail the launch\n");
        failures++;
    }
    PYMOE_LAUNCH_BARRIER(divergent, dim3(1), dim3(64), nullptr, ones);
    if (cudaGetLastError() != cudaErrorLaunchFailure) {
        std::printf("FAIL: a divergent barrier did not fail the launch\n");
        failures++;
    }
    PYMOE_LAUNCH(block_sum, dim3(1), dim3(2048), nullptr, in, out);  // > 1024 threads
    if (cudaGetLastError() != cudaErrorInvalidConfiguration) {
        std::printf("FAIL: 2048 threads per block were accepted\n");
        failures++;
    }
    if (!failures) std::printf("emulator self-test passed\n");
    return failures;
}
