// Paged KV cache: append and single-token decode attention with split-KV (FlashDecoding).
// Cache per layer: k_cache, v_cache [num_slots, Hkv, D] with slot = block * block_size + offset; a sequence's blocks are
// listed in its row of block_tables [B, max_blocks]; context_lens [B] counts its cached tokens (the new one included).
// Decode: q [B, H, D] (one new token per sequence, after RoPE). Each split covers split_blocks consecutive blocks of a
// sequence and writes a partial output and its log-sum-exp (natural log); the combine step merges the splits.
#include "common.cuh"

#ifndef PAGED_ATTENTION_BLOCK
#define PAGED_ATTENTION_BLOCK 128
#endif
#define PAGED_MAX_PER_LANE 8

// cache[slots[t], :, :] = x[t, :, :] for k and v. slots are distinct and validated on the host.
template <typename T>
__device__ void kv_append_impl(T* k_cache, T* v_cache, const T* k, const T* v, const int* slots, int tokens, int kv_heads, int dim)
{
    const long long row = (long long)kv_heads * dim;
    FOR_EACH(i, (long long)tokens * row)
    {
        const long long t = i / row, e = i % row, dst = (long long)slots[t] * row + e;
        k_cache[dst] = k[i];
        v_cache[dst] = v[i];
    }
}
INSTANTIATE_F32_BF16(kv_append, PAGED_ATTENTION_BLOCK, (T* k_cache, T* v_cache, const T* k, const T* v, const int* slots, int tokens, int kv_heads, int dim),
    (k_cache, v_cache, k, v, slots, tokens, kv_heads, dim))

// One warp per (sequence, head, split): online softmax over the split's cached tokens.
template <typename T>
__device__ void paged_decode_partial_impl(float* partial_o, float* partial_lse, const T* q, const T* k_cache, const T* v_cache,
    const int* block_tables, const int* context_lens, int batch, int max_blocks, int block_size, int heads, int kv_heads, int dim,
    int splits, int split_blocks, float scale)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= batch * heads * splits) return;
    const int split = warp % splits, bh = warp / splits, b = bh / heads, h = bh % heads, kvh = h / (heads / kv_heads);
    const int len = context_lens[b];
    const int first = split * split_blocks * block_size, last = min(len, first + split_blocks * block_size);
    float qr[PAGED_MAX_PER_LANE], acc[PAGED_MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < PAGED_MAX_PER_LANE; e++)
    {
        const int d = lane + 32 * e;
        qr[e] = d < dim ? load(q, (long long)bh * dim + d) * scale : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int t = first; t < last; t++)
    {
        const int slot = block_tables[(long long)b * max_blocks + t / block_size] * block_size + t % block_size;
        const long long kb = ((long long)slot * kv_heads + kvh) * dim;
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < PAGED_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) s += qr[e] * load(k_cache, kb + d); }
        s = warp_sum(s);
        const float mn = fmaxf(m, s), corr = __expf(m - mn), p = __expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < PAGED_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) acc[e] = acc[e] * corr + p * load(v_cache, kb + d); }
        m = mn;
    }
    const long long ob = (long long)warp * dim;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int e = 0; e < PAGED_MAX_PER_LANE; e++) { const int d = lane + 32 * e; if (d < dim) partial_o[ob + d] = acc[e] * inv; }
    if (lane == 0) partial_lse[warp] = l > 0.0f ? m + logf(l) : -INFINITY;
}
INSTANTIATE_F32_BF16(paged_decode_partial, PAGED_ATTENTION_BLOCK,
    (float* partial_o, float* partial_lse, const T* q, const T* k_cache, const T* v_cache, const int* block_tables, const int* context_lens,
     int batch, int max_blocks, int block_size, int heads, int kv_heads, int dim, int splits, int split_blocks, float scale),
    (partial_o, partial_lse, q, k_cache, v_cache, block_tables, context_lens, batch, max_blocks, block_size, heads, kv_heads, dim, splits, split_blocks, scale))

// One warp per (sequence, head): o = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse).
template <typename T>
__device__ void paged_decode_combine_impl(T* out, float* lse, const float* partial_o, const float* partial_lse, int rows, int splits, int dim)
{
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= rows) return;
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, partial_lse[(long long)warp * splits + s]);
    float total = 0.0f;
    for (int s = 0; s < splits; s++) { const float l = partial_lse[(long long)warp * splits + s]; total += l == -INFINITY ? 0.0f : __expf(l - mx); }
    for (int d = lane; d < dim; d += 32)
    {
        float o = 0.0f;
        for (int s = 0; s < splits; s++)
        {
            const float l = partial_lse[(long long)warp * splits + s];
            if (l != -INFINITY) o += __expf(l - mx) * partial_o[((long long)warp * splits + s) * dim + d];
        }
        store(out, (long long)warp * dim + d, total > 0.0f ? o / total : 0.0f);
    }
    if (lane == 0 && lse != nullptr) lse[warp] = total > 0.0f ? mx + logf(total) : -INFINITY;
}
INSTANTIATE_F32_BF16(paged_decode_combine, PAGED_ATTENTION_BLOCK, (T* out, float* lse, const float* partial_o, const float* partial_lse, int rows, int splits, int dim),
    (out, lse, partial_o, partial_lse, rows, splits, dim))
