// Rotary position embedding, Qwen2 rotate-half form, with explicit position ids (packed sequences restart them).
// x, y, dy, dx: [T, H, D] storage dtype (q or k, heads contiguous); pos: [T] int32. For i < D/2:
//   f = theta^(-2i/D), a = pos * f (fp32, as the HF reference computes it)
//   y[i] = x[i] cos a - x[i + D/2] sin a;  y[i + D/2] = x[i + D/2] cos a + x[i] sin a
// Backward is the rotation by -a. In-place (y == x) is allowed: each thread owns its pair.
// table: [table_rows, D/2] (cos a, sin a) pairs computed on the host (the exactly rounded cosine and sine of the fp32
// angle), read for positions below table_rows; other positions (or no table) compute powf and sincosf as HF does.
#include "common.cuh"

#ifndef ROPE_BLOCK
#define ROPE_BLOCK 256
#endif

template <typename T>
__device__ void rope_impl(T* y, const T* x, const int* __restrict__ pos, const float2* __restrict__ table, int table_rows, int tokens, int heads,
    int dim, float theta, float direction)
{
    const int half = dim / 2;
    FOR_EACH(idx, (long long)tokens * heads * half)
    {
        const int i = (int)(idx % half);
        const long long th = idx / half;           // token * heads + head
        const int t = (int)(th / heads), p = pos[t];
        float s, c;
        if (p >= 0 && p < table_rows)
        {
            const float2 cs = table[(long long)p * half + i];
            c = cs.x; s = cs.y;
        }
        else
        {
            const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)dim);
            sincosf((float)p * inv_freq, &s, &c);
        }
        s *= direction;
        const long long base = th * dim;
        const float x1 = load(x, base + i), x2 = load(x, base + i + half);
        store(y, base + i, x1 * c - x2 * s);
        store(y, base + i + half, x2 * c + x1 * s);
    }
}

template <typename T>
__device__ void rope_forward_impl(T* y, const T* x, const int* pos, const float2* table, int table_rows, int tokens, int heads, int dim, float theta)
{
    rope_impl(y, x, pos, table, table_rows, tokens, heads, dim, theta, 1.0f);
}
INSTANTIATE_F32_BF16(rope_forward, ROPE_BLOCK, (T* y, const T* x, const int* pos, const float2* table, int table_rows, int tokens, int heads, int dim, float theta),
    (y, x, pos, table, table_rows, tokens, heads, dim, theta))

template <typename T>
__device__ void rope_backward_impl(T* dx, const T* dy, const int* pos, const float2* table, int table_rows, int tokens, int heads, int dim, float theta)
{
    rope_impl(dx, dy, pos, table, table_rows, tokens, heads, dim, theta, -1.0f);
}
INSTANTIATE_F32_BF16(rope_backward, ROPE_BLOCK, (T* dx, const T* dy, const int* pos, const float2* table, int table_rows, int tokens, int heads, int dim, float theta),
    (dx, dy, pos, table, table_rows, tokens, heads, dim, theta))
