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

// The same, 16 bytes at a time (packs = n / Packed128<T>::size; the host checks sizes and alignment).
template <typename T>
__device__ void swiglu_forward_vec_impl(T* __restrict__ y, const T* __restrict__ g, const T* __restrict__ u, long long packs)
{
    FOR_EACH(i, packs)
    {
        const Packed128<T> gp = load128(g, i), up = load128(u, i);
        Packed128<T> o;
#pragma unroll
        for (int k = 0; k < Packed128<T>::size; k++)
        {
            const float gv = gp.get(k);
            o.set(k, gv * sigmoidf_(gv) * up.get(k));
        }
        store128(y, i, o);
    }
}
INSTANTIATE_F32_BF16(swiglu_forward_vec, SWIGLU_BLOCK, (T* y, const T* g, const T* u, long long packs), (y, g, u, packs))

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
