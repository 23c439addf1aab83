// SwiGLU (Qwen2 MLP): y = silu(g) * u, silu(g) = g * sigmoid(g).
// g, u, y, dy, dg, du: [T, F] storage dtype.
#include "common.cuh"

#ifndef SWIGLU_BLOCK
#define SWIGLU_BLOCK 256
#endif

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T>
__device__ void swiglu_forward_impl(T* y, const T* g, const T* u, long long n)
{
    FOR_EACH(i, n)
    {
        float gv = load(g, i);
        store(y, i, gv * sigmoidf_(gv) * load(u, i));
    }
}
INSTANTIATE_F32_BF16(swiglu_forward, SWIGLU_BLOCK, (T* y, const T* g, const T* u, long long n), (y, g, u, n))

// dg = dy * u * s * (1 + g (1 - s)), du = dy * g * s, with s = sigmoid(g).
template <typename T>
__device__ void swiglu_backward_impl(T* dg, T* du, const T* dy, const T* g, const T* u, long long n)
{
    FOR_EACH(i, n)
    {
        float gv = load(g, i), uv = load(u, i), d = load(dy, i);
        float s = sigmoidf_(gv);
        store(dg, i, d * uv * s * (1.0f + gv * (1.0f - s)));
        store(du, i, d * gv * s);
    }
}
INSTANTIATE_F32_BF16(swiglu_backward, SWIGLU_BLOCK, (T* dg, T* du, const T* dy, const T* g, const T* u, long long n), (dg, du, dy, g, u, n))
