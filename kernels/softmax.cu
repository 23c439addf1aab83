// Row softmax with a scale: y = softmax(scale * x) along the last dim.
// x, y, dy, dx: [rows, cols] storage dtype. Backward: dx = scale * y * (dy - sum(dy * y)).
#include "common.cuh"

#ifndef SOFTMAX_BLOCK
#define SOFTMAX_BLOCK 256
#endif

#ifndef SOFTMAX_KEPT
#define SOFTMAX_KEPT 32   // values of its row a thread keeps in registers: rows up to SOFTMAX_KEPT x block wide are read once
#endif

// One block per row: max, then sum of exponentials, then the normalised write. A row that fits is read once into
// registers, which then hold its exponentials; the max and the sum see the same values in the same order either way.
template <typename T>
__device__ void softmax_forward_impl(T* __restrict__ y, const T* __restrict__ x, int rows, int cols, float scale)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const bool fits = cols <= SOFTMAX_KEPT * (int)blockDim.x;
    float kept[SOFTMAX_KEPT];
    float m = -INFINITY;
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < SOFTMAX_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            kept[k] = c < cols ? scale * load(xr, c) : -INFINITY;
        }
#pragma unroll
        for (int k = 0; k < SOFTMAX_KEPT; k++) m = fmaxf(m, kept[k]);
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, scale * load(xr, c));
    m = block_max(m, scratch);
    float s = 0.0f;
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < SOFTMAX_KEPT; k++)
            if (threadIdx.x + k * blockDim.x < cols) { kept[k] = __expf(kept[k] - m); s += kept[k]; }
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) s += __expf(scale * load(xr, c) - m);
    const float inv = 1.0f / block_sum(s, scratch);
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < SOFTMAX_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < cols) store(y + row * cols, c, kept[k] * inv);
        }
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) store(y + row * cols, c, __expf(scale * load(xr, c) - m) * inv);
}
INSTANTIATE_F32_BF16(softmax_forward, SOFTMAX_BLOCK, (T* y, const T* x, int rows, int cols, float scale), (y, x, rows, cols, scale))

#ifndef SOFTMAX_BWD_KEPT
#define SOFTMAX_BWD_KEPT (8192 / SOFTMAX_BLOCK < 32 ? 8192 / SOFTMAX_BLOCK : 32) // values of y and of dy a thread keeps
#endif

// dx = scale * y * (dy - sum(dy * y)). A row that fits (SOFTMAX_BWD_KEPT values a thread) is read once into registers;
// the dot adds the same terms in the same order either way (a padded slot adds 0). dx may alias dy.
template <typename T>
__device__ void softmax_backward_impl(T* dx, const T* dy, const T* y, int rows, int cols, float scale)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* yr = y + row * cols;
    const T* dyr = dy + row * cols;
    const bool fits = cols <= SOFTMAX_BWD_KEPT * (int)blockDim.x;
    float dot = 0.0f;
    if (fits)
    {
        float yv[SOFTMAX_BWD_KEPT], gv[SOFTMAX_BWD_KEPT];
#pragma unroll
        for (int k = 0; k < SOFTMAX_BWD_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            yv[k] = c < cols ? load(yr, c) : 0.0f;
            gv[k] = c < cols ? load(dyr, c) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < SOFTMAX_BWD_KEPT; k++) dot += gv[k] * yv[k];
        dot = block_sum(dot, scratch);
#pragma unroll
        for (int k = 0; k < SOFTMAX_BWD_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < cols) store(dx + row * cols, c, scale * yv[k] * (gv[k] - dot));
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += load(dyr, c) * load(yr, c);
    dot = block_sum(dot, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) store(dx + row * cols, c, scale * load(yr, c) * (load(dyr, c) - dot));
}
INSTANTIATE_F32_BF16(softmax_backward, SOFTMAX_BLOCK, (T* dx, const T* dy, const T* y, int rows, int cols, float scale), (dx, dy, y, rows, cols, scale))
