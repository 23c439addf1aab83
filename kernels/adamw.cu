// AdamW on fp32 master weights, with an optional bf16 working copy written in the same pass.
// p, g, m, v: [n] fp32; p_bf16: [n] bf16 or null. bc1 = 1 - beta1^t, bc2 = 1 - beta2^t (bias correction, from the host).
// grad_scale multiplies the gradient first (global-norm clipping without another pass over the gradients).
// Decoupled weight decay: p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p).
#include "common.cuh"

#ifndef ADAMW_BLOCK
#define ADAMW_BLOCK 256
#endif

extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK) adamw_update(float* p, bf16* p_bf16, const float* g, float* m, float* v, long long n,
    float lr, float beta1, float beta2, float eps, float weight_decay, float bc1, float bc2, float grad_scale)
{
    FOR_EACH(i, n)
    {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float mhat = mi / bc1, vhat = vi / bc2;
        const float pi = p[i] - lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * p[i]);
        p[i] = pi;
        if (p_bf16 != nullptr) p_bf16[i] = float_to_bf16(pi);
    }
}
