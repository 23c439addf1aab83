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

// One block per row: each thread keeps an online (max, sum) over its columns, then the block merges them. Packed
// (the host's choice: 16-byte aligned rows, vocab a multiple of the vector): each thread reads 16-byte vectors and
// rescales its sum once per vector, by the vector's max, instead of once per new maximum.
template <typename T>
__device__ void cross_entropy_forward_impl(float* __restrict__ logprob, float* __restrict__ lse, const T* __restrict__ logits,
    const int* __restrict__ targets, int rows, int vocab, int ignore_index, int* error, int packed)
{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = logits + row * vocab;
    float m = -INFINITY, s = 0.0f;
    if (packed)
    {
        constexpr int N = Packed128<T>::size;
        for (int p = threadIdx.x; p < vocab / N; p += blockDim.x)
        {
            const Packed128<T> x = load128(xr, p);
            float vm = x.get(0);
#pragma unroll
            for (int k = 1; k < N; k++) vm = fmaxf(vm, x.get(k));
            if (!(vm > -INFINITY)) continue; // an all -inf vector (masked entries) adds nothing
            if (vm > m) { s *= __expf(m - vm); m = vm; }
#pragma unroll
            for (int k = 0; k < N; k++) s += __expf(x.get(k) - m);
        }
    }
    else
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
INSTANTIATE_F32_BF16(cross_entropy_forward, CROSS_ENTROPY_BLOCK, (float* logprob, float* lse, const T* logits, const int* targets, int rows, int vocab, int ignore_index, int* error, int packed), (logprob, lse, logits, targets, rows, vocab, ignore_index, error, packed))

// dlogits may alias logits (each vector is read before it is written), so neither is __restrict__.
template <typename T>
__device__ void cross_entropy_backward_impl(T* dlogits, const T* logits, const float* lse, const int* targets, const float* dlogprob, int rows, int vocab, int ignore_index, int packed)
{
    const long long row = blockIdx.x;
    const int target = targets[row];
    const bool ignored = target == ignore_index || target < 0 || target >= vocab;
    const float g = ignored ? 0.0f : dlogprob[row], l = lse[row];
    if (packed)
    {
        constexpr int N = Packed128<T>::size;
        const long long first = row * (vocab / N);
        for (int p = threadIdx.x; p < vocab / N; p += blockDim.x)
        {
            Packed128<T> x = load128(logits, first + p);
#pragma unroll
            for (int k = 0; k < N; k++) x.set(k, g * ((p * N + k == target ? 1.0f : 0.0f) - __expf(x.get(k) - l)));
            store128(dlogits, first + p, x);
        }
        return;
    }
    for (int v = threadIdx.x; v < vocab; v += blockDim.x)
    {
        const long long i = row * vocab + v;
        const float p = __expf(load(logits, i) - l);
        store(dlogits, i, g * ((v == target ? 1.0f : 0.0f) - p));
    }
}
INSTANTIATE_F32_BF16(cross_entropy_backward, CROSS_ENTROPY_BLOCK, (T* dlogits, const T* logits, const float* lse, const int* targets, const float* dlogprob, int rows, int vocab, int ignore_index, int packed), (dlogits, logits, lse, targets, dlogprob, rows, vocab, ignore_index, packed))
