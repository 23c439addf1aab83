// Attention over packed variable-length sequences with GQA, causal or bidirectional, FlashAttention-style: online
// softmax in one pass over the keys, the per-row log-sum-exp saved, probabilities recomputed in backward.
// q, o, do, dq: [T, H, D]; k, v, dk, dv: [T, Hkv, D] (storage dtype); lse, delta: [T, H] fp32;
// cu_seqlens: [S + 1] int32, sequence s holds tokens cu_seqlens[s] .. cu_seqlens[s+1]-1 (attention never crosses).
// Query head h reads key/value head h / (H / Hkv). Causal: token i sees tokens j <= i of its own sequence.
// One warp per (row, head): each lane holds D / 32 (rounded up) elements of the row, so D up to 32 * ATTN_MAX_PER_LANE.
// This is the portable path (CUDA cores, no tensor-core tiles); the tiled mma.sync variant plugs in behind the same API.
#include "common.cuh"

#ifndef ATTENTION_BLOCK
#define ATTENTION_BLOCK 128
#endif
#define ATTN_MAX_PER_LANE 8

__device__ __forceinline__ int sequence_start(const int* cu, int num_seqs, int t)
{
    int lo = 0, hi = num_seqs; // largest s with cu[s] <= t
    while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (cu[mid] <= t) lo = mid; else hi = mid; }
    return lo;
}

template <typename T>
__device__ void attention_forward_impl(T* o, float* lse, const T* q, const T* k, const T* v, const int* cu_seqlens,
    int num_seqs, int tokens, int heads, int kv_heads, int dim, float scale, int causal)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= tokens * heads) return;
    const int i = warp / heads, h = warp % heads, kvh = h / (heads / kv_heads);
    const int s = sequence_start(cu_seqlens, num_seqs, i);
    const int start = cu_seqlens[s], end = causal ? i + 1 : cu_seqlens[s + 1];
    float qr[ATTN_MAX_PER_LANE], acc[ATTN_MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
    {
        const int d = lane + 32 * e;
        qr[e] = d < dim ? load(q, ((long long)i * heads + h) * dim + d) * scale : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = start; j < end; j++)
    {
        const long long kb = ((long long)j * kv_heads + kvh) * dim;
        float sc = 0.0f;
#pragma unroll
        for (int e = 0; e < ATTN_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) sc += qr[e] * load(k, kb + d); }
        sc = warp_sum(sc);
        const float m_new = fmaxf(m, sc);
        const float correction = __expf(m - m_new), p = __expf(sc - m_new);
        l = l * correction + p;
#pragma unroll
        for (int e = 0; e < ATTN_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) acc[e] = acc[e] * correction + p * load(v, kb + d); }
        m = m_new;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int e = 0; e < ATTN_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) store(o, ((long long)i * heads + h) * dim + d, acc[e] * inv); }
    if (lane == 0) lse[(long long)i * heads + h] = l > 0.0f ? m + logf(l) : -INFINITY;
}
INSTANTIATE_F32_BF16(attention_forward, ATTENTION_BLOCK,
    (T* o, float* lse, const T* q, const T* k, const T* v, const int* cu_seqlens, int num_seqs, int tokens, int heads, int kv_heads, int dim, float scale, int causal),
    (o, lse, q, k, v, cu_seqlens, num_seqs, tokens, heads, kv_heads, dim, scale, causal))

// delta[i, h] = sum_d dO[i, h, d] * O[i, h, d]: the softmax-backward row term. One warp per (row, head).
template <typename T>
__device__ void attention_backward_delta_impl(float* delta, const T* o, const T* dout, int tokens, int heads, int dim)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= tokens * heads) return;
    const long long b = (long long)warp * dim;
    float s = 0.0f;
    for (int d = lane; d < dim; d += 32) s += load(dout, b + d) * load(o, b + d);
    s = warp_sum(s);
    if (lane == 0) delta[warp] = s;
}
INSTANTIATE_F32_BF16(attention_backward_delta, ATTENTION_BLOCK, (float* delta, const T* o, const T* dout, int tokens, int heads, int dim), (delta, o, dout, tokens, heads, dim))

// dq[i, h] = scale * sum_j p_ij (dO_i . v_j - delta_i) k_j, p_ij = exp(scale q_i . k_j - lse_i). One warp per (i, h).
template <typename T>
__device__ void attention_backward_dq_impl(T* dq, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,
    const int* cu_seqlens, int num_seqs, int tokens, int heads, int kv_heads, int dim, float scale, int causal)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= tokens * heads) return;
    const int i = warp / heads, h = warp % heads, kvh = h / (heads / kv_heads);
    const int s = sequence_start(cu_seqlens, num_seqs, i);
    const int start = cu_seqlens[s], end = causal ? i + 1 : cu_seqlens[s + 1];
    const long long qb = ((long long)i * heads + h) * dim;
    float qr[ATTN_MAX_PER_LANE], dor[ATTN_MAX_PER_LANE], acc[ATTN_MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
    {
        const int d = lane + 32 * e;
        qr[e] = d < dim ? load(q, qb + d) * scale : 0.0f;
        dor[e] = d < dim ? load(dout, qb + d) : 0.0f;
        acc[e] = 0.0f;
    }
    const float l = lse[(long long)i * heads + h], dl = delta[(long long)i * heads + h];
    for (int j = start; j < end; j++)
    {
        const long long kb = ((long long)j * kv_heads + kvh) * dim;
        float sc = 0.0f, dp = 0.0f;
#pragma unroll
        for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
        {
            const int d = lane + 32 * e;
            if (d < dim) { sc += qr[e] * load(k, kb + d); dp += dor[e] * load(v, kb + d); }
        }
        sc = warp_sum(sc);
        dp = warp_sum(dp);
        const float ds = __expf(sc - l) * (dp - dl);
#pragma unroll
        for (int e = 0; e < ATTN_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) acc[e] += ds * load(k, kb + d); }
    }
#pragma unroll
    for (int e = 0; e < ATTN_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) store(dq, qb + d, acc[e] * scale); }
}
INSTANTIATE_F32_BF16(attention_backward_dq, ATTENTION_BLOCK,
    (T* dq, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, const int* cu_seqlens, int num_seqs, int tokens, int heads, int kv_heads, int dim, float scale, int causal),
    (dq, q, k, v, dout, lse, delta, cu_seqlens, num_seqs, tokens, heads, kv_heads, dim, scale, causal))

// dk[j, g] = scale * sum_{h in group g} sum_i ds_ij q_i;  dv[j, g] = sum_h sum_i p_ij dO_i. One warp per (j, kv head):
// each key row owns its gradient, so no atomics and the result is deterministic.
template <typename T>
__device__ void attention_backward_dkdv_impl(T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta,
    const int* cu_seqlens, int num_seqs, int tokens, int heads, int kv_heads, int dim, float scale, int causal)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= tokens * kv_heads) return;
    const int j = warp / kv_heads, g = warp % kv_heads, group = heads / kv_heads;
    const int s = sequence_start(cu_seqlens, num_seqs, j);
    const int first = causal ? j : cu_seqlens[s], end = cu_seqlens[s + 1];
    const long long kb = ((long long)j * kv_heads + g) * dim;
    float kr[ATTN_MAX_PER_LANE], vr[ATTN_MAX_PER_LANE], dkacc[ATTN_MAX_PER_LANE], dvacc[ATTN_MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
    {
        const int d = lane + 32 * e;
        kr[e] = d < dim ? load(k, kb + d) : 0.0f;
        vr[e] = d < dim ? load(v, kb + d) : 0.0f;
        dkacc[e] = dvacc[e] = 0.0f;
    }
    for (int hh = 0; hh < group; hh++)
    {
        const int h = g * group + hh;
        for (int i = first; i < end; i++)
        {
            const long long qb = ((long long)i * heads + h) * dim;
            float sc = 0.0f, dp = 0.0f;
#pragma unroll
            for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
            {
                const int d = lane + 32 * e;
                if (d < dim) { sc += load(q, qb + d) * kr[e]; dp += load(dout, qb + d) * vr[e]; }
            }
            sc = warp_sum(sc) * scale;
            dp = warp_sum(dp);
            const long long r = (long long)i * heads + h;
            const float p = __expf(sc - lse[r]);
            const float ds = p * (dp - delta[r]);
#pragma unroll
            for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
            {
                const int d = lane + 32 * e;
                if (d < dim) { dvacc[e] += p * load(dout, qb + d); dkacc[e] += ds * load(q, qb + d); }
            }
        }
    }
#pragma unroll
    for (int e = 0; e < ATTN_MAX_PER_LANE; e++)
    {
        const int d = lane + 32 * e;
        if (d < dim) { store(dk, kb + d, dkacc[e] * scale); store(dv, kb + d, dvacc[e]); }
    }
}
INSTANTIATE_F32_BF16(attention_backward_dkdv, ATTENTION_BLOCK,
    (T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, const int* cu_seqlens, int num_seqs, int tokens, int heads, int kv_heads, int dim, float scale, int causal),
    (dk, dv, q, k, v, dout, lse, delta, cu_seqlens, num_seqs, tokens, heads, kv_heads, dim, scale, causal))
