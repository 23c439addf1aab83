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

// Pass 1 of dbias: one thread per (column, chunk of COLUMN_CHUNK_ROWS rows), coalesced across the warp; pass 2 sums
// the chunks in order (bias_backward_sum). Deterministic, no atomics, and the whole GPU busy whatever the width.
template <typename T>
__device__ void bias_backward_partial_impl(float* partial, const T* dy, int rows, int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (c >= cols) return;
    const int r1 = min(rows, (k + 1) * COLUMN_CHUNK_ROWS);
    float s = 0.0f;
    for (int r = k * COLUMN_CHUNK_ROWS; r < r1; r++) s += load(dy, (long long)r * cols + c);
    partial[(long long)k * cols + c] = s;
}
INSTANTIATE_F32_BF16(bias_backward_partial, BIAS_BLOCK, (float* partial, const T* dy, int rows, int cols), (partial, dy, rows, cols))

extern "C" __global__ void __launch_bounds__(BIAS_BLOCK) bias_backward_sum(float* dbias, const float* partial, int chunks, int cols, int accumulate)
{
    column_chunks_sum(dbias, partial, chunks, cols, accumulate);
}

// One thread per column walks every row (the single-pass form, kept as a variant).
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
