// Fused LM head + GRPO loss over vocabulary chunks: the logits of a chunk [T, Vc] are made by a GEMM on the host side,
// these kernels fold each chunk into a running log-sum-exp and gather the target logit (pass 1), compute the per-token
// clipped policy loss, KL and d loss / d logprob (once), then turn a recomputed chunk into its logit gradient in place
// (pass 2), so [T, V] never exists. Logits are divided by the sampling temperature first.
// Shapes: chunk [T, Vc] storage dtype (columns col_offset .. col_offset + Vc of the vocabulary); m, s, target_logit,
// logp, loss, dlogp, old_logp, ref_logp, advantage, weight: [T] fp32; targets [T] int32 (-100: not a response token).
#include "common.cuh"

#ifndef GRPO_LOSS_BLOCK
#define GRPO_LOSS_BLOCK 256
#endif

// One block per row: merge the chunk's (max, sum exp) into the running (m, s); take the target's logit if it is here.
template <typename T>
__device__ void chunk_lse_update_impl(float* m, float* s, float* target_logit, const T* chunk, const int* targets, int rows, int cols,
    int col_offset, float inv_temp)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* x = chunk + row * cols;
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, load(x, c) * inv_temp);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += __expf(load(x, c) * inv_temp - mx);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0)
    {
        const float mo = m[row], mn = fmaxf(mo, mx);
        s[row] = (mo == -INFINITY ? 0.0f : s[row] * __expf(mo - mn)) + sum * __expf(mx - mn);
        m[row] = mn;
        const int t = targets[row] - col_offset;
        if (t >= 0 && t < cols) target_logit[row] = load(x, t) * inv_temp;
    }
}
INSTANTIATE_F32_BF16(chunk_lse_update, GRPO_LOSS_BLOCK,
    (float* m, float* s, float* target_logit, const T* chunk, const int* targets, int rows, int cols, int col_offset, float inv_temp),
    (m, s, target_logit, chunk, targets, rows, cols, col_offset, inv_temp))

// Per token: logp = target_logit - lse; r = exp(logp - old); objective J = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
// with dual clip (c > 1, A < 0) J = max(J, c A); KL to the reference with d = ref - logp: k2 = d^2 / 2 (its gradient is an
// unbiased estimate of the gradient of KL(pi || ref) on the policy's samples), k3 = exp(d) - d - 1 (low variance; its gradient
// follows KL(ref || pi)), k3 alone clamped to [-10, 10]; loss = weight (-J + kl_coef KL); dlogp = d loss / d logp. kl_type 0: none, 2: k2, 3: k3 (k1 = -d has
// zero expected gradient as a loss term: the trainer applies it as a reward penalty instead).
extern "C" __global__ void __launch_bounds__(GRPO_LOSS_BLOCK) grpo_token_loss(float* loss, float* dlogp, float* logp_out, const float* m, const float* s,
    const float* target_logit, const int* targets, const float* old_logp, const float* ref_logp, const float* advantage, const float* weight,
    int rows, float eps_low, float eps_high, float dual_clip, float kl_coef, int kl_type)
{
    FOR_EACH(t, rows)
    {
        if (targets[t] < 0) { loss[t] = 0.0f; dlogp[t] = 0.0f; logp_out[t] = 0.0f; continue; }
        const float lp = target_logit[t] - (m[t] + logf(s[t]));
        const float a = advantage[t], w = weight[t];
        const float r = __expf(lp - old_logp[t]);
        const float unclipped = r * a, clipped = fminf(fmaxf(r, 1.0f - eps_low), 1.0f + eps_high) * a;
        float j = fminf(unclipped, clipped);
        float dj = unclipped <= clipped ? r * a : 0.0f; // the clipped branch is flat in logp
        if (dual_clip > 1.0f && a < 0.0f && dual_clip * a > j) { j = dual_clip * a; dj = 0.0f; }
        float kl = 0.0f, dkl = 0.0f;
        if (kl_type != 0 && ref_logp != nullptr)
        {
            const float d = ref_logp[t] - lp;
            if (kl_type == 2) { kl = 0.5f * d * d; dkl = -d; }
            else
            {
                kl = __expf(d) - d - 1.0f;
                dkl = 1.0f - __expf(d);
                if (kl > 10.0f || kl < -10.0f) { kl = fminf(fmaxf(kl, -10.0f), 10.0f); dkl = 0.0f; }
            }
        }
        loss[t] = w * (-j + kl_coef * kl);
        dlogp[t] = w * (-dj + kl_coef * dkl);
        logp_out[t] = lp;
    }
}

// One block per row: chunk <- dlogp * inv_temp * (1[v == target] - exp(x inv_temp - lse)), in place.
template <typename T>
__device__ void chunk_logit_grad_impl(T* chunk, const float* m, const float* s, const int* targets, const float* dlogp, int rows, int cols,
    int col_offset, float inv_temp)
{
    const long long row = blockIdx.x;
    const float g = targets[row] < 0 ? 0.0f : dlogp[row] * inv_temp, lse = m[row] + logf(s[row]);
    const int t = targets[row] - col_offset;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
    {
        const long long i = row * cols + c;
        store(chunk, i, g * ((c == t ? 1.0f : 0.0f) - __expf(load(chunk, i) * inv_temp - lse)));
    }
}
INSTANTIATE_F32_BF16(chunk_logit_grad, GRPO_LOSS_BLOCK,
    (T* chunk, const float* m, const float* s, const int* targets, const float* dlogp, int rows, int cols, int col_offset, float inv_temp),
    (chunk, m, s, targets, dlogp, rows, cols, col_offset, inv_temp))
