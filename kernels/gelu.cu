// GELU, exact (erf) and tanh approximation (InternViT and the adapter use the exact form).
// x, y, dy, dx: [n] storage dtype. approximate: 0 = erf, 1 = tanh.
#include "common.cuh"

#ifndef GELU_BLOCK
#define GELU_BLOCK 256
#endif

#define GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_INV_SQRT_2 0.7071067811865476f
#define GELU_INV_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float gelu_value(float x, int approximate)
{
    if (approximate) return 0.5f * x * (1.0f + tanhf(GELU_SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
    return 0.5f * x * (1.0f + erff(x * GELU_INV_SQRT_2));
}

__device__ __forceinline__ float gelu_derivative(float x, int approximate)
{
    if (approximate)
    {
        float u = GELU_SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        float du = GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    return 0.5f * (1.0f + erff(x * GELU_INV_SQRT_2)) + x * GELU_INV_SQRT_2PI * __expf(-0.5f * x * x);
}

template <typename T>
__device__ void gelu_forward_impl(T* y, const T* x, long long n, int approximate)
{
    FOR_EACH(i, n) store(y, i, gelu_value(load(x, i), approximate));
}
INSTANTIATE_F32_BF16(gelu_forward, GELU_BLOCK, (T* y, const T* x, long long n, int approximate), (y, x, n, approximate))

template <typename T>
__device__ void gelu_backward_impl(T* dx, const T* dy, const T* x, long long n, int approximate)
{
    FOR_EACH(i, n) store(dx, i, load(dy, i) * gelu_derivative(load(x, i), approximate));
}
INSTANTIATE_F32_BF16(gelu_backward, GELU_BLOCK, (T* dx, const T* dy, const T* x, long long n, int approximate), (dx, dy, x, n, approximate))
