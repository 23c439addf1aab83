// Residual add and scale: out = alpha * a + beta * b over n elements (b may be null: out = alpha * a).
// The same kernel is its own backward: d(a) = alpha * d(out), d(b) = beta * d(out); with a == out it accumulates.
#include "common.cuh"

#ifndef ELEMENTWISE_BLOCK
#define ELEMENTWISE_BLOCK 256
#endif

template <typename T>
__device__ void axpby_impl(T* out, const T* a, const T* b, float alpha, float beta, long long n)
{
    FOR_EACH(i, n)
    {
        float v = alpha * load(a, i);
        if (b != nullptr) v += beta * load(b, i);
        store(out, i, v);
    }
}
INSTANTIATE_F32_BF16(axpby, ELEMENTWISE_BLOCK, (T* out, const T* a, const T* b, float alpha, float beta, long long n), (out, a, b, alpha, beta, n))

// The same, 16 bytes at a time (packs = n / Packed128<T>::size; the host checks sizes and alignment). Both loads are
// issued before the store, and each element's arithmetic is axpby's. No __restrict__: out may be a or b (accumulation).
template <typename T>
__device__ void axpby_vec_impl(T* out, const T* a, const T* b, float alpha, float beta, long long packs)
{
    FOR_EACH(i, packs)
    {
        const Packed128<T> x = load128(a, i);
        Packed128<T> y;
        if (b != nullptr) y = load128(b, i);
        Packed128<T> o;
#pragma unroll
        for (int k = 0; k < Packed128<T>::size; k++)
        {
            float v = alpha * x.get(k);
            if (b != nullptr) v += beta * y.get(k);
            o.set(k, v);
        }
        store128(out, i, o);
    }
}
INSTANTIATE_F32_BF16(axpby_vec, ELEMENTWISE_BLOCK, (T* out, const T* a, const T* b, float alpha, float beta, long long packs), (out, a, b, alpha, beta, packs))

// Storage conversions (bf16 activations <-> fp32 gradients and master weights).
extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK) convert_f32_to_bf16(bf16* out, const float* x, long long n)
{
    FOR_EACH(i, n) out[i] = float_to_bf16(x[i]);
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_BLOCK) convert_bf16_to_f32(float* out, const bf16* x, long long n)
{
    FOR_EACH(i, n) out[i] = to_float(x[i]);
}
