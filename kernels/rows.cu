// Row movement and per-column scales, for image-feature merging, pixel shuffle and LayerScale.
// scatter_rows: dst[idx[r], :] = src[r, :] (a set, not an add: every destination row is written by at most one r).
//   src [R, C], idx [R] int32 (validated on the host), dst [N, C]. Gathers are embedding lookups (embedding.cu).
// scale_columns: y[t, c] = x[t, c] * s[c]; its backward is dx = dy * s (the same kernel) and
// scale_columns_backward: ds[c] (+)= sum_t dy[t, c] * x[t, c] (fp32, one thread per column, deterministic).
#include "common.cuh"

#ifndef ROWS_BLOCK
#define ROWS_BLOCK 256
#endif

template <typename T>
__device__ void scatter_rows_impl(T* dst, const T* src, const int* idx, int rows, int cols)
{
    FOR_EACH(i, (long long)rows * cols)
    {
        const int r = (int)(i / cols), c = (int)(i % cols);
        dst[(long long)idx[r] * cols + c] = src[i];
    }
}
INSTANTIATE_F32_BF16(scatter_rows, ROWS_BLOCK, (T* dst, const T* src, const int* idx, int rows, int cols), (dst, src, idx, rows, cols))

template <typename T>
__device__ void scale_columns_impl(T* y, const T* x, const T* s, int rows, int cols)
{
    FOR_EACH(i, (long long)rows * cols) store(y, i, load(x, i) * load(s, i % cols));
}
INSTANTIATE_F32_BF16(scale_columns, ROWS_BLOCK, (T* y, const T* x, const T* s, int rows, int cols), (y, x, s, rows, cols))

template <typename T>
__device__ void scale_columns_backward_impl(float* ds, const T* dy, const T* x, int rows, int cols, int accumulate)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sum = 0.0f;
    for (int r = 0; r < rows; r++) { const long long i = (long long)r * cols + c; sum += load(dy, i) * load(x, i); }
    ds[c] = accumulate ? ds[c] + sum : sum;
}
INSTANTIATE_F32_BF16(scale_columns_backward, ROWS_BLOCK, (float* ds, const T* dy, const T* x, int rows, int cols, int accumulate), (ds, dy, x, rows, cols, accumulate))
