// LayerNorm (InternViT-300M, adapter): y = (x - mean) * rstd * w + b.
// x, y, dy, dx: [T, C] storage dtype; w, b: [C] storage dtype; mean, rstd: [T] fp32 (saved); dw, db: [C] fp32.
#include "common.cuh"

#ifndef LAYERNORM_BLOCK
#define LAYERNORM_BLOCK 256
#endif

#ifndef LAYERNORM_KEPT
#define LAYERNORM_KEPT 32   // values of its row a thread keeps in registers: rows up to LAYERNORM_KEPT x block wide are read once
#endif

// One block per row; two passes over the row (mean, then centred variance) for accuracy with large offsets. A row that
// fits is read from memory once into registers; the sums add the same values in the same order either way.
template <typename T>
__device__ void layernorm_forward_impl(T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, const T* __restrict__ x, const T* __restrict__ w,
    const T* __restrict__ b, int rows, int cols, float eps)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const bool fits = cols <= LAYERNORM_KEPT * (int)blockDim.x;
    float kept[LAYERNORM_KEPT];
    float s = 0.0f;
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < LAYERNORM_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            kept[k] = c < cols ? load(xr, c) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < LAYERNORM_KEPT; k++) s += kept[k];
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) s += load(xr, c);
    const float mu = block_sum(s, scratch) / cols;
    float ss = 0.0f;
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < LAYERNORM_KEPT; k++)
            if (threadIdx.x + k * blockDim.x < cols) { float d = kept[k] - mu; ss += d * d; }
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x) { float d = load(xr, c) - mu; ss += d * d; }
    const float r = rsqrtf(block_sum(ss, scratch) / cols + eps);
    if (threadIdx.x == 0) { mean[row] = mu; rstd[row] = r; }
    if (fits)
    {
#pragma unroll
        for (int k = 0; k < LAYERNORM_KEPT; k++)
        {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < cols) store(y + row * cols, c, (kept[k] - mu) * r * load(w, c) + (b != nullptr ? load(b, c) : 0.0f));
        }
    }
    else
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            store(y + row * cols, c, (load(xr, c) - mu) * r * load(w, c) + (b != nullptr ? load(b, c) : 0.0f));
}
INSTANTIATE_F32_BF16(layernorm_forward, LAYERNORM_BLOCK, (T* y, float* mean, float* rstd, const T* x, const T* w, const T* b, int rows, int cols, float eps), (y, mean, rstd, x, w, b, rows, cols, eps))

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * dy.
template <typename T>
__device__ void layernorm_backward_impl(T* dx, const T* dy, const T* x, const T* w, const float* mean, const float* rstd, int rows, int cols)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    const float mu = mean[row], r = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
    {
        float g = load(w, c) * load(dyr, c);
        sg += g;
        sgx += g * (load(xr, c) - mu) * r;
    }
    sg = block_sum(sg, scratch) / cols;
    sgx = block_sum(sgx, scratch) / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
    {
        float xhat = (load(xr, c) - mu) * r;
        store(dx + row * cols, c, r * (load(w, c) * load(dyr, c) - sg - xhat * sgx));
    }
}
INSTANTIATE_F32_BF16(layernorm_backward, LAYERNORM_BLOCK, (T* dx, const T* dy, const T* x, const T* w, const float* mean, const float* rstd, int rows, int cols), (dx, dy, x, w, mean, rstd, rows, cols))

// dw[c] (+)= sum_t dy * xhat, db[c] (+)= sum_t dy. One thread per column, deterministic.
template <typename T>
__device__ void layernorm_backward_params_impl(float* dw, float* db, const T* dy, const T* x, const float* mean, const float* rstd, int rows, int cols, int accumulate)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sw = 0.0f, sb = 0.0f;
    for (int r = 0; r < rows; r++)
    {
        long long i = (long long)r * cols + c;
        float g = load(dy, i);
        sw += g * (load(x, i) - mean[r]) * rstd[r];
        sb += g;
    }
    dw[c] = accumulate ? dw[c] + sw : sw;
    if (db != nullptr) db[c] = accumulate ? db[c] + sb : sb;
}
// Pass 1 of dw and db: (column, chunk of COLUMN_CHUNK_ROWS rows) partials of each; pass 2 adds them in chunk order.
template <typename T>
__device__ void layernorm_backward_params_partial_impl(float* pw, float* pb, const T* dy, const T* x, const float* mean, const float* rstd, int rows, int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (c >= cols) return;
    const int r1 = min(rows, (k + 1) * COLUMN_CHUNK_ROWS);
    float sw = 0.0f, sb = 0.0f;
    for (int r = k * COLUMN_CHUNK_ROWS; r < r1; r++)
    {
        long long i = (long long)r * cols + c;
        float g = load(dy, i);
        sw += g * (load(x, i) - mean[r]) * rstd[r];
        sb += g;
    }
    pw[(long long)k * cols + c] = sw;
    if (pb != nullptr) pb[(long long)k * cols + c] = sb;
}
INSTANTIATE_F32_BF16(layernorm_backward_params_partial, LAYERNORM_BLOCK, (float* pw, float* pb, const T* dy, const T* x, const float* mean, const float* rstd, int rows, int cols), (pw, pb, dy, x, mean, rstd, rows, cols))

#ifndef LAYERNORM_BWD_KEPT
// Columns a thread keeps of x and dy (and its partials) in the fused backward: rows up to 6144 wide (QwQ-32B: 5120,
// InternViT-6B: 3200) at 256 threads or more; fewer threads keep at most 24 each.
#define LAYERNORM_BWD_KEPT (6144 / LAYERNORM_BLOCK < 24 ? 6144 / LAYERNORM_BLOCK : 24)
#endif

// dx and the dw/db partials of one chunk of COLUMN_CHUNK_ROWS rows in one pass (as rmsnorm_backward_fused): each row
// read once into registers; the sums are layernorm_backward's and layernorm_backward_params_partial's, term for term and
// in order. pw null: no parameter gradients; pb null: no bias. dx may alias dy.
template <typename T>
__device__ void layernorm_backward_fused_impl(T* dx, float* __restrict__ pw, float* __restrict__ pb, const T* dy, const T* __restrict__ x,
    const T* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd, int rows, int cols)
{
    __shared__ float scratch[32];
    const int k = blockIdx.x, r1 = min(rows, (k + 1) * COLUMN_CHUNK_ROWS);
    float aw[LAYERNORM_BWD_KEPT], ab[LAYERNORM_BWD_KEPT];
#pragma unroll
    for (int j = 0; j < LAYERNORM_BWD_KEPT; j++) aw[j] = ab[j] = 0.0f;
    for (int row = k * COLUMN_CHUNK_ROWS; row < r1; row++)
    {
        const long long base = (long long)row * cols;
        const float mu = mean[row], r = rstd[row];
        float xv[LAYERNORM_BWD_KEPT], gv[LAYERNORM_BWD_KEPT];
#pragma unroll
        for (int j = 0; j < LAYERNORM_BWD_KEPT; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            xv[j] = c < cols ? load(x, base + c) : 0.0f;
            gv[j] = c < cols ? load(dy, base + c) : 0.0f;
        }
        float sg = 0.0f, sgx = 0.0f;
#pragma unroll
        for (int j = 0; j < LAYERNORM_BWD_KEPT; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            if (c >= cols) continue;
            const float g = load(w, c) * gv[j];
            sg += g;
            sgx += g * (xv[j] - mu) * r;
        }
        sg = block_sum(sg, scratch) / cols;
        sgx = block_sum(sgx, scratch) / cols;
#pragma unroll
        for (int j = 0; j < LAYERNORM_BWD_KEPT; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            if (c >= cols) continue;
            const float xhat = (xv[j] - mu) * r;
            store(dx, base + c, r * (load(w, c) * gv[j] - sg - xhat * sgx));
            aw[j] += gv[j] * (xv[j] - mu) * r;
            ab[j] += gv[j];
        }
    }
    if (pw == nullptr) return;
#pragma unroll
    for (int j = 0; j < LAYERNORM_BWD_KEPT; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        if (c >= cols) continue;
        pw[(long long)k * cols + c] = aw[j];
        if (pb != nullptr) pb[(long long)k * cols + c] = ab[j];
    }
}
INSTANTIATE_F32_BF16(layernorm_backward_fused, LAYERNORM_BLOCK, (T* dx, float* pw, float* pb, const T* dy, const T* x, const T* w, const float* mean, const float* rstd, int rows, int cols),
    (dx, pw, pb, dy, x, w, mean, rstd, rows, cols))

extern "C" __global__ void __launch_bounds__(LAYERNORM_BLOCK) layernorm_backward_params_sum(float* dw, float* db, const float* pw, const float* pb, int chunks, int cols,
    int accumulate)
{
    column_chunks_sum(dw, pw, chunks, cols, accumulate);
    if (db != nullptr) column_chunks_sum(db, pb, chunks, cols, accumulate);
}

INSTANTIATE_F32_BF16(layernorm_backward_params, LAYERNORM_BLOCK, (float* dw, float* db, const T* dy, const T* x, const float* mean, const float* rstd, int rows, int cols, int accumulate), (dw, db, dy, x, mean, rstd, rows, cols, accumulate))
