// Global gradient norm in two deterministic passes: per-block partial sums of squares, then one block sums the
// partials (no atomics, so the norm is bit-identical run to run). x: [n] storage dtype; partial: [gridDim.x] fp32.
#include "common.cuh"

#ifndef GRAD_NORM_BLOCK
#define GRAD_NORM_BLOCK 512
#endif

template <typename T>
__device__ void sumsq_partial_impl(float* partial, const T* x, long long n)
{
    __shared__ float scratch[32];
    float s = 0.0f;
    FOR_EACH(i, n) { float v = load(x, i); s += v * v; }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
INSTANTIATE_F32_BF16(sumsq_partial, GRAD_NORM_BLOCK, (float* partial, const T* x, long long n), (partial, x, n))

// out[0] (+)= sum(partial[0..count)). Launched with one block.
extern "C" __global__ void __launch_bounds__(GRAD_NORM_BLOCK) sum_partials(float* out, const float* partial, int count, int accumulate)
{
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + s : s;
}
