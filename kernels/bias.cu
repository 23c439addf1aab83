// Bias of a linear layer. Forward: y[t, c] += bias[c]; backward: dbias[c] (+)= sum_t dy[t, c].
// y, dy: [T, C] storage dtype; bias: [C] storage dtype; dbias: [C] fp32 (fp32 sums keep small late-token gradients).
#include "common.cuh"

#ifndef BIAS_BLOCK
#define BIAS_BLOCK 256
#endif

template <typename T>
__device__ void bias_add_impl(T* y, const T* bias, int rows, int cols)
{
    FOR_EACH(i, (long long)rows * cols) store(y, i, load(y, i) + load(bias, i % cols));
}
INSTANTIATE_F32_BF16(bias_add, BIAS_BLOCK, (T* y, const T* bias, int rows, int cols), (y, bias, rows, cols))

// One thread per column walks the rows: coalesced across the warp and deterministic (no atomics).
template <typename T>
__device__ void bias_backward_impl(float* dbias, const T* dy, int rows, int cols, int accumulate)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s += load(dy, (long long)r * cols + c);
    dbias[c] = accumulate ? dbias[c] + s : s;
}
INSTANTIATE_F32_BF16(bias_backward, BIAS_BLOCK, (float* dbias, const T* dy, int rows, int cols, int accumulate), (dbias, dy, rows, cols, accumulate))
