// Fused log-softmax + per-token log-prob gather + NLL over the vocabulary, without a probabilities tensor.
// logits, dlogits: [T, V] storage dtype (dlogits may alias logits); targets: [T] int32; logprob, lse, dlogprob: [T] fp32.
// Forward: lse[t] = log sum_v exp(x[t, v]); logprob[t] = x[t, target] - lse[t] (the NLL is -logprob).
// Backward: dx[t, v] = dlogprob[t] * (1[v == target] - exp(x[t, v] - lse[t])), recomputing p from the saved lse.
// A target equal to ignore_index gives logprob 0 and a zero gradient row; any other target outside [0, V) is
// reported in error[0..1] (row, value) and its row is treated as ignored.
#include "common.cuh"

#ifndef CROSS_ENTROPY_BLOCK
#define CROSS_ENTROPY_BLOCK 512
#endif

// One block per row: each thread keeps an online (max, sum) over its columns, then the block merges them.
template <typename T>
__device__ void cross_entropy_forward_impl(float* logprob, float* lse, const T* logits, const int* targets, int rows, int vocab, int ignore_index, int* error)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = logits + row * vocab;
    float m = -INFINITY, s = 0.0f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x)
    {
        const float x = load(xr, v);
        if (x > m) { s = s * __expf(m - x) + 1.0f; m = x; }
        else if (x > -INFINITY) s += __expf(x - m); // a -inf logit (masked entry) adds nothing, even before any finite one
    }
    const float gm = block_max(m, scratch);
    s = m == -INFINITY ? 0.0f : s * __expf(m - gm);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0)
    {
        const float l = gm + logf(s);
        lse[row] = l;
        const int target = targets[row];
        if (target == ignore_index) logprob[row] = 0.0f;
        else if (target < 0 || target >= vocab)
        {
            if (atomicCAS(&error[0], -1, (int)row) == -1) error[1] = target;
            logprob[row] = 0.0f;
        }
        else logprob[row] = load(xr, target) - l;
    }
}
INSTANTIATE_F32_BF16(cross_entropy_forward, CROSS_ENTROPY_BLOCK, (float* logprob, float* lse, const T* logits, const int* targets, int rows, int vocab, int ignore_index, int* error), (logprob, lse, logits, targets, rows, vocab, ignore_index, error))

template <typename T>
__device__ void cross_entropy_backward_impl(T* dlogits, const T* logits, const float* lse, const int* targets, const float* dlogprob, int rows, int vocab, int ignore_index)
{
    const long long row = blockIdx.x;
    const int target = targets[row];
    const bool ignored = target == ignore_index || target < 0 || target >= vocab;
    const float g = ignored ? 0.0f : dlogprob[row], l = lse[row];
    for (int v = threadIdx.x; v < vocab; v += blockDim.x)
    {
        const long long i = row * vocab + v;
        const float p = __expf(load(logits, i) - l);
        store(dlogits, i, g * ((v == target ? 1.0f : 0.0f) - p));
    }
}
INSTANTIATE_F32_BF16(cross_entropy_backward, CROSS_ENTROPY_BLOCK, (T* dlogits, const T* logits, const float* lse, const int* targets, const float* dlogprob, int rows, int vocab, int ignore_index), (dlogits, logits, lse, targets, dlogprob, rows, vocab, ignore_index))
