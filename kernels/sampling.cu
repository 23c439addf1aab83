// Token sampling, one block per sequence row of logits [B, V]: repetition penalty (once per distinct earlier token:
// x < 0 ? x * r : x / r), temperature, top-k, top-p (over the top-k survivors, as HF's warpers chain), min-p, then an
// inverse-CDF draw in index order with a per-sequence counter-based RNG (splitmix64 of seed and step), so (seed, step,
// logits) gives the same token on every run. Thresholds are found by bisection over the order-preserving integer keys of
// the values (32 block-wide counts), never by sorting the vocabulary. temperature <= 0 is greedy (lowest index on ties).
// logprob: log softmax(x / T) of the token under the model's own tempered distribution (no penalty, no filtering): the
// "old log-prob" that PPO ratios need. prev tokens are CSR: row b's are prev_tokens[prev_offsets[b] .. prev_offsets[b+1]).
// Rows are `stride` long; only the first `vocab` entries can be drawn (a tokenizer smaller than the padded LM head).
#include "common.cuh"

#ifndef SAMPLING_BLOCK
#define SAMPLING_BLOCK 256
#endif
#define SAMPLING_MAX_VOCAB 262144

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Order-preserving map of a float to an unsigned key (larger float -> larger key).
__device__ __forceinline__ unsigned int order_key(float f)
{
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ void sample_impl(int* tokens, float* logprobs, const T* logits, const int* prev_tokens, const int* prev_offsets,
    const float* temperature, const int* top_k, const float* top_p, const float* min_p, const float* rep_penalty,
    const unsigned long long* seeds, const int* steps, int vocab, int stride)
{
    __shared__ unsigned int seen[SAMPLING_MAX_VOCAB / 32];
    __shared__ float scratch[32];
    __shared__ float chunk_prefix[SAMPLING_BLOCK + 1];
    __shared__ int chosen;
    const int row = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const T* x = logits + (long long)row * stride;
    const float temp = temperature[row], pen = rep_penalty[row];
    const bool penalise = pen != 1.0f;

    for (int i = tid; i < (vocab + 31) / 32; i += nt) seen[i] = 0u;
    __syncthreads();
    if (penalise)
        for (int j = prev_offsets[row] + tid; j < prev_offsets[row + 1]; j += nt)
        {
            const int t = prev_tokens[j];
            if (t >= 0 && t < vocab) atomicOr(&seen[t >> 5], 1u << (t & 31));
        }
    __syncthreads();
    const float inv_t = temp > 0.0f ? 1.0f / temp : 1.0f;
#define RAW(v) (load(x, (v)) * inv_t)
#define VALUE(v) ((((seen[(v) >> 5] >> ((v) & 31)) & 1u) ? (load(x, (v)) < 0.0f ? load(x, (v)) * pen : load(x, (v)) / pen) : load(x, (v))) * inv_t)

    // log-prob normaliser of the unpenalised tempered distribution
    float m0 = -INFINITY;
    for (int v = tid; v < vocab; v += nt) m0 = fmaxf(m0, RAW(v));
    m0 = block_max(m0, scratch);
    float z0 = 0.0f;
    for (int v = tid; v < vocab; v += nt) z0 += __expf(RAW(v) - m0);
    z0 = block_sum(z0, scratch);

    if (temp <= 0.0f)
    {
        // Greedy: the largest value, lowest index on ties.
        float best = -INFINITY;
        int best_i = vocab;
        for (int v = tid; v < vocab; v += nt) { const float val = VALUE(v); if (val > best) { best = val; best_i = v; } }
        const float bm = block_max(best, scratch);
        if (tid == 0) chosen = vocab;
        __syncthreads();
        if (best == bm) atomicMin(&chosen, best_i);
        __syncthreads();
        if (tid == 0) { tokens[row] = chosen; logprobs[row] = RAW(chosen) - m0 - logf(z0); }
        return;
    }

    float m = -INFINITY;
    for (int v = tid; v < vocab; v += nt) m = fmaxf(m, VALUE(v));
    m = block_max(m, scratch);

    // top-k: the key of the k-th largest value, bit by bit from the top.
    unsigned int key_k = 0u;
    const int k = top_k[row];
    if (k > 0 && k < vocab)
        for (int bit = 31; bit >= 0; bit--)
        {
            const unsigned int cand = key_k | (1u << bit);
            float c = 0.0f;
            for (int v = tid; v < vocab; v += nt) c += order_key(VALUE(v)) >= cand ? 1.0f : 0.0f;
            if (block_sum(c, scratch) >= (float)k) key_k = cand;
        }

    // top-p over the top-k survivors: the largest key whose upper mass reaches p of their mass.
    unsigned int key_p = 0u;
    const float p = top_p[row];
    if (p > 0.0f && p < 1.0f)
    {
        float zk = 0.0f;
        for (int v = tid; v < vocab; v += nt) { const float val = VALUE(v); if (order_key(val) >= key_k) zk += __expf(val - m); }
        zk = block_sum(zk, scratch);
        for (int bit = 31; bit >= 0; bit--)
        {
            const unsigned int cand = key_p | (1u << bit);
            float mass = 0.0f;
            for (int v = tid; v < vocab; v += nt) { const float val = VALUE(v); const unsigned int kv = order_key(val); if (kv >= key_k && kv >= cand) mass += __expf(val - m); }
            if (block_sum(mass, scratch) >= p * zk) key_p = cand;
        }
    }
    const float mp = min_p[row];
    const float floor_value = mp > 0.0f ? m + logf(mp) : -INFINITY;
    const unsigned int key_min = max(key_k, key_p);
#define KEPT(val) (order_key(val) >= key_min && (val) >= floor_value)

    // Inverse CDF in index order over contiguous per-thread chunks.
    const int chunk = (vocab + nt - 1) / nt, lo = tid * chunk, hi = min(vocab, lo + chunk);
    float own = 0.0f;
    for (int v = lo; v < hi; v++) { const float val = VALUE(v); if (KEPT(val)) own += __expf(val - m); }
    chunk_prefix[tid + 1] = own;
    if (tid == 0) { chunk_prefix[0] = 0.0f; chosen = -1; }
    __syncthreads();
    if (tid == 0) for (int i = 1; i <= nt; i++) chunk_prefix[i] += chunk_prefix[i - 1];
    __syncthreads();
    const float total = chunk_prefix[nt];
    const unsigned long long r = splitmix64(seeds[row] ^ splitmix64((unsigned long long)steps[row]));
    const float target = (float)(r >> 40) * (1.0f / 16777216.0f) * total;
    if (target >= chunk_prefix[tid] && target < chunk_prefix[tid + 1])
    {
        float acc = chunk_prefix[tid];
        for (int v = lo; v < hi; v++)
        {
            const float val = VALUE(v);
            if (!KEPT(val)) continue;
            acc += __expf(val - m);
            if (target < acc) { chosen = v; break; }
        }
    }
    __syncthreads();
    if (tid == 0)
    {
        int t = chosen;
        if (t < 0) // rounding put the target past the last kept token: take that token
            for (int v = vocab - 1; v >= 0; v--) { const float val = VALUE(v); if (KEPT(val)) { t = v; break; } }
        tokens[row] = t;
        logprobs[row] = RAW(t) - m0 - logf(z0);
    }
#undef KEPT
#undef VALUE
#undef RAW
}
INSTANTIATE_F32_BF16(sample, SAMPLING_BLOCK,
    (int* tokens, float* logprobs, const T* logits, const int* prev_tokens, const int* prev_offsets, const float* temperature, const int* top_k,
     const float* top_p, const float* min_p, const float* rep_penalty, const unsigned long long* seeds, const int* steps, int vocab, int stride),
    (tokens, logprobs, logits, prev_tokens, prev_offsets, temperature, top_k, top_p, min_p, rep_penalty, seeds, steps, vocab, stride))
