// RMSNorm (Qwen2, InternViT-6B): y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
// x, y, dy, dx: [T, C] storage dtype; w: [C] storage dtype; rstd: [T] fp32 (saved for backward); dw: [C] fp32.
#include "common.cuh"

#ifndef RMSNORM_BLOCK
#define RMSNORM_BLOCK 256
#endif

#ifndef RMSNORM_KEPT
#define RMSNORM_KEPT 32   // values of its row a thread keeps in registers: rows up to RMSNORM_KEPT x block wide are read once
#endif

// One block per row. A row that fits is read once: every load is issued into registers before the reduction, then
// scaled from there. The sum of squares adds the same values in the same order either way (a padded slot adds 0).
template <typename T>
__device__ void rmsnorm_forward_impl(T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x, const T* __restrict__ w, int rows, int cols, float eps)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const bool fits = cols <= RMSNORM_KEPT * (int)blockDim.x;
    float kept[RMSNORM_KEPT];
    float ss = 0.0f;
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < RMSNORM_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            kept[k] = c < cols ? load(xr, c) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < RMSNORM_KEPT; k++) ss += kept[k] * kept[k];
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) { float v = load(xr, c); ss += v * v; }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < RMSNORM_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < cols) store(y + row * cols, c, load(w, c) * (kept[k] * r));
        }
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) store(y + row * cols, c, load(w, c) * (load(xr, c) * r));
}
INSTANTIATE_F32_BF16(rmsnorm_forward, RMSNORM_BLOCK, (T* y, float* rstd, const T* x, const T* w, int rows, int cols, float eps), (y, rstd, x, w, rows, cols, eps))

// dx = rstd * (g - xhat * mean(g * xhat)), g = w * dy, xhat = x * rstd. One block per row.
template <typename T>
__device__ void rmsnorm_backward_impl(T* dx, const T* dy, const T* x, const T* w, const float* rstd, int rows, int cols)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += load(w, c) * load(dyr, c) * load(xr, c) * r;
    dot = block_sum(dot, scratch) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
    {
        float xhat = load(xr, c) * r;
        store(dx + row * cols, c, r * (load(w, c) * load(dyr, c) - xhat * dot));
    }
}
INSTANTIATE_F32_BF16(rmsnorm_backward, RMSNORM_BLOCK, (T* dx, const T* dy, const T* x, const T* w, const float* rstd, int rows, int cols), (dx, dy, x, w, rstd, rows, cols))

// dw[c] (+)= sum_t dy[t, c] * x[t, c] * rstd[t]. One thread per column: deterministic, no atomics.
template <typename T>
__device__ void rmsnorm_backward_weight_impl(float* dw, const T* dy, const T* x, const float* rstd, int rows, int cols, int accumulate)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) { long long i = (long long)r * cols + c; s += load(dy, i) * load(x, i) * rstd[r]; }
    dw[c] = accumulate ? dw[c] + s : s;
}
// Pass 1 of dw: (column, chunk of COLUMN_CHUNK_ROWS rows) partials; pass 2 (rmsnorm_backward_weight_sum) adds them in order.
template <typename T>
__device__ void rmsnorm_backward_weight_partial_impl(float* partial, const T* dy, const T* x, const float* rstd, int rows, int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (c >= cols) return;
    const int r1 = min(rows, (k + 1) * COLUMN_CHUNK_ROWS);
    float s = 0.0f;
    for (int r = k * COLUMN_CHUNK_ROWS; r < r1; r++) { long long i = (long long)r * cols + c; s += load(dy, i) * load(x, i) * rstd[r]; }
    partial[(long long)k * cols + c] = s;
}
INSTANTIATE_F32_BF16(rmsnorm_backward_weight_partial, RMSNORM_BLOCK, (float* partial, const T* dy, const T* x, const float* rstd, int rows, int cols), (partial, dy, x, rstd, rows, cols))

#ifndef RMSNORM_BWD_KEPT
// Columns a thread keeps of x and dy (and its partials) in the fused backward: rows up to 6144 wide (QwQ-32B: 5120,
// InternViT-6B: 3200) at 256 threads or more; fewer threads keep at most 24 each.
#define RMSNORM_BWD_KEPT (6144 / RMSNORM_BLOCK < 24 ? 6144 / RMSNORM_BLOCK : 24)
#endif

// dx and the dw partial of one chunk of COLUMN_CHUNK_ROWS rows in one pass: one block per chunk walks its rows in order,
// reads each row once into registers (x and dy), writes dx from them, and keeps its columns' dw partial in registers,
// written once at the end (partial null: no dw). The sums are rmsnorm_backward's and rmsnorm_backward_weight_partial's,
// term for term and in the same order, so the results are those two kernels' bits. dx may alias dy (each thread
// reads its columns of a row before it writes them). The host launches it where cols <= RMSNORM_BWD_KEPT * block.
template <typename T>
__device__ void rmsnorm_backward_fused_impl(T* dx, float* __restrict__ partial, const T* dy, const T* __restrict__ x, const T* __restrict__ w,
    const float* __restrict__ rstd, int rows, int cols)
{
    __shared__ float scratch[32];
    const int k = blockIdx.x, r1 = min(rows, (k + 1) * COLUMN_CHUNK_ROWS);
    float pw[RMSNORM_BWD_KEPT];
#pragma unroll
    for (int j = 0; j < RMSNORM_BWD_KEPT; j++) pw[j] = 0.0f;
    for (int row = k * COLUMN_CHUNK_ROWS; row < r1; row++)
    {
        const long long base = (long long)row * cols;
        const float r = rstd[row];
        float xv[RMSNORM_BWD_KEPT], gv[RMSNORM_BWD_KEPT];
#pragma unroll
        for (int j = 0; j < RMSNORM_BWD_KEPT; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            xv[j] = c < cols ? load(x, base + c) : 0.0f;
            gv[j] = c < cols ? load(dy, base + c) : 0.0f;
        }
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < RMSNORM_BWD_KEPT; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            dot += (c < cols ? load(w, c) : 0.0f) * gv[j] * xv[j] * r;
        }
        dot = block_sum(dot, scratch) / cols;
#pragma unroll
        for (int j = 0; j < RMSNORM_BWD_KEPT; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            if (c >= cols) continue;
            const float xhat = xv[j] * r;
            store(dx, base + c, r * (load(w, c) * gv[j] - xhat * dot));
            pw[j] += gv[j] * xv[j] * r;
        }
    }
    if (partial == nullptr) return;
#pragma unroll
    for (int j = 0; j < RMSNORM_BWD_KEPT; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < cols) partial[(long long)k * cols + c] = pw[j];
    }
}
INSTANTIATE_F32_BF16(rmsnorm_backward_fused, RMSNORM_BLOCK, (T* dx, float* partial, const T* dy, const T* x, const T* w, const float* rstd, int rows, int cols),
    (dx, partial, dy, x, w, rstd, rows, cols))

extern "C" __global__ void __launch_bounds__(RMSNORM_BLOCK) rmsnorm_backward_weight_sum(float* dw, const float* partial, int chunks, int cols, int accumulate)
{
    column_chunks_sum(dw, partial, chunks, cols, accumulate);
}

INSTANTIATE_F32_BF16(rmsnorm_backward_weight, RMSNORM_BLOCK, (float* dw, const T* dy, const T* x, const float* rstd, int rows, int cols, int accumulate), (dw, dy, x, rstd, rows, cols, accumulate))
