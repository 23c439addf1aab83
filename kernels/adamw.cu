// AdamW on fp32 master weights, with an optional bf16 working copy written in the same pass.
// p, g, m, v: [n] fp32; p_bf16: [n] bf16 or null. The host folds the bias corrections into scalars:
// step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t), decay = lr * weight_decay, so each element
// takes one division: p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps) + decay * p (decoupled weight decay).
// grad_scale multiplies the gradient first (global-norm clipping without another pass over the gradients).
// adamw_update4: the same per element, four at a time with 16-byte loads and stores (n a multiple of 4, every array
// 16-byte aligned and the copy 8-byte aligned: the host checks); the arithmetic of each element is unchanged.
#include "common.cuh"

#ifndef ADAMW_BLOCK
#define ADAMW_BLOCK 256
#endif

__device__ __forceinline__ float adamw_one(float p, float g, float& m, float& v, float beta1, float beta2, float eps, float step_size,
    float inv_sqrt_bc2, float decay, float grad_scale)
{
    const float gi = g * grad_scale;
    m = beta1 * m + (1.0f - beta1) * gi;
    v = beta2 * v + (1.0f - beta2) * gi * gi;
    return p - step_size * m / (sqrtf(v) * inv_sqrt_bc2 + eps) - decay * p;
}

// Element i: moments and weight updated in place, the bf16 copy written when there is one.
__device__ __forceinline__ void adamw_at(float* __restrict__ p, bf16* __restrict__ p_bf16, const float* __restrict__ g, float* __restrict__ m,
    float* __restrict__ v, long long i, float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay, float grad_scale)
{
    float mi = m[i], vi = v[i];
    const float pi = adamw_one(p[i], g[i], mi, vi, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if (p_bf16 != nullptr) p_bf16[i] = float_to_bf16(pi);
}

// Four elements at index i of float4 views (every load issued before any store); the copy gets four bf16 in 8 bytes.
__device__ __forceinline__ void adamw_four(float4* __restrict__ p, uint2* __restrict__ p_bf16, const float4* __restrict__ g, float4* __restrict__ m,
    float4* __restrict__ v, long long i, float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay, float grad_scale)
{
        const float4 pi = p[i], gi = g[i];
        float4 mi = m[i], vi = v[i];
        float4 out;
        out.x = adamw_one(pi.x, gi.x, mi.x, vi.x, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
        out.y = adamw_one(pi.y, gi.y, mi.y, vi.y, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
        out.z = adamw_one(pi.z, gi.z, mi.z, vi.z, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
        out.w = adamw_one(pi.w, gi.w, mi.w, vi.w, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
        m[i] = mi;
        v[i] = vi;
        p[i] = out;
        if (p_bf16 != nullptr)
        {
            uint2 packed;
            packed.x = (unsigned int)float_to_bf16(out.x).bits | ((unsigned int)float_to_bf16(out.y).bits << 16);
            packed.y = (unsigned int)float_to_bf16(out.z).bits | ((unsigned int)float_to_bf16(out.w).bits << 16);
            p_bf16[i] = packed;
        }
}

extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK) adamw_update(float* __restrict__ p, bf16* __restrict__ p_bf16, const float* __restrict__ g,
    float* __restrict__ m, float* __restrict__ v, long long n, float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay,
    float grad_scale)
{
    FOR_EACH(i, n) adamw_at(p, p_bf16, g, m, v, i, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
}

extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK) adamw_update4(float4* __restrict__ p, uint2* __restrict__ p_bf16, const float4* __restrict__ g,
    float4* __restrict__ m, float4* __restrict__ v, long long n4, float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay,
    float grad_scale)
{
    FOR_EACH(i, n4)
    {
        adamw_four(p, p_bf16, g, m, v, i, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
    }
}

// All parameters in one launch: a table of tensors (host-made, 64 bytes each) whose elements are cut into chunks of
// ADAMW_CHUNK; a block takes chunks in a grid-stride loop, finds each chunk's tensor by binary search over first_chunk,
// and updates it four elements a thread where the tensor allows (vector != 0: the adamw_update4 conditions), one
// otherwise. Each element's arithmetic is adamw_one, as in the one-tensor kernels: the results are the same bits.
#define ADAMW_CHUNK 16384

struct AdamWTensor
{
    float* p;
    bf16* copy;
    const float* g;
    float* m;
    float* v;
    long long n;
    long long first_chunk;
    int vector;
    int pad;
};

extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK) adamw_multi(const AdamWTensor* __restrict__ tensors, int count, long long chunks,
    float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay, float grad_scale)
{
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x)
    {
        int lo = 0, hi = count;
        while (hi - lo > 1) { const int mid = (lo + hi) >> 1; if (tensors[mid].first_chunk <= c) lo = mid; else hi = mid; }
        const AdamWTensor t = tensors[lo];
        const long long begin = (c - t.first_chunk) * ADAMW_CHUNK, end = min(begin + ADAMW_CHUNK, t.n);
        if (t.vector)
        {
            for (long long i = begin / 4 + threadIdx.x; i < end / 4; i += blockDim.x)
                adamw_four(reinterpret_cast<float4*>(t.p), reinterpret_cast<uint2*>(t.copy), reinterpret_cast<const float4*>(t.g), reinterpret_cast<float4*>(t.m),
                    reinterpret_cast<float4*>(t.v), i, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
        }
        else
            for (long long i = begin + threadIdx.x; i < end; i += blockDim.x)
                adamw_at(t.p, t.copy, t.g, t.m, t.v, i, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
    }
}
