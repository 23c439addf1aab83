// Flash attention forward on tensor cores (FlashAttention-2 schedule), bf16 in, fp32 accumulate: one block of 4 warps
// per (64-query tile of a packed sequence, head); each warp owns 16 query rows; K and V tiles of 64 keys (32 at D = 128) are
// staged in shared memory; S = Q K^T and O += P V run on mma.sync.m16n8k16 with P kept in registers (the S accumulator layout is
// the A-operand layout), online softmax in the exp2 domain, the log-sum-exp saved for backward (natural log, as
// attention.cu saves it, so either backward can consume it).
// q, o: [T, H, D] bf16; k, v: [T, Hkv, D] bf16; lse: [T, H] fp32; cu_seqlens [S + 1]; tile_offsets [S + 1]: query tiles
// of sequence s are tile_offsets[s] .. tile_offsets[s+1]-1. D is a template parameter (64, 80, 96, 128).
#include "common.cuh"
#include "mma.cuh"

#ifndef ATTENTION_MMA_BLOCK
#define ATTENTION_MMA_BLOCK 128
#endif
#define MMA_BLOCK_M 64
// Keys per shared-memory tile: 64, or 32 at head dim 128 so that S, O and the Q fragments fit in 255 registers.
#define MMA_BLOCK_N(D) ((D) >= 128 ? 32 : 64)

template <int D>
__device__ void attention_mma_forward_impl(bf16* o, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu_seqlens,
    const int* tile_offsets, int num_seqs, int heads, int kv_heads, float scale, int causal)
{
    constexpr int STRIDE = D + 8;             // padded shared rows (16-byte multiple, fewer bank conflicts)
    constexpr int KCHUNKS = D / 16, NBLOCKS = D / 8, BN = MMA_BLOCK_N(D);
    __shared__ __align__(16) bf16 ks[BN * STRIDE];
    __shared__ __align__(16) bf16 vs[BN * STRIDE];

    const int tile = blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int s = find_sequence(tile_offsets, num_seqs, tile);
    const int seq_start = cu_seqlens[s], seq_end = cu_seqlens[s + 1];
    const int q_tile = seq_start + (tile - tile_offsets[s]) * MMA_BLOCK_M;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int row0 = q_tile + warp * 16 + g, row1 = row0 + 8; // this thread's two query rows
    const float scale_log2 = scale * 1.4426950408889634f;

    // Q fragments for every 16-wide slice of the head dim (rows past the sequence load zeros).
    unsigned int qa[KCHUNKS][4];
#pragma unroll
    for (int kk = 0; kk < KCHUNKS; kk++)
    {
        const int c0 = kk * 16 + t4 * 2, c1 = c0 + 8;
        const bf16* q0 = q + ((long long)row0 * heads + h) * D;
        const bf16* q1 = q + ((long long)row1 * heads + h) * D;
        const bool ok0 = row0 < seq_end, ok1 = row1 < seq_end;
        qa[kk][0] = ok0 ? *reinterpret_cast<const unsigned int*>(q0 + c0) : 0u;
        qa[kk][1] = ok1 ? *reinterpret_cast<const unsigned int*>(q1 + c0) : 0u;
        qa[kk][2] = ok0 ? *reinterpret_cast<const unsigned int*>(q0 + c1) : 0u;
        qa[kk][3] = ok1 ? *reinterpret_cast<const unsigned int*>(q1 + c1) : 0u;
    }

    float acc[NBLOCKS][4];
#pragma unroll
    for (int nb = 0; nb < NBLOCKS; nb++) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    const int last_query = min(q_tile + MMA_BLOCK_M, seq_end) - 1;
    const int key_end = causal ? last_query + 1 : seq_end;
    for (int kb = seq_start; kb < key_end; kb += BN)
    {
        __syncthreads(); // the previous tile is no longer read
        for (int i = threadIdx.x; i < BN * (D / 8); i += blockDim.x)
        {
            const int r = i / (D / 8), c = (i % (D / 8)) * 8, key = kb + r;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (key < seq_end)
            {
                kv4 = *reinterpret_cast<const uint4*>(k + ((long long)key * kv_heads + kvh) * D + c);
                vv4 = *reinterpret_cast<const uint4*>(v + ((long long)key * kv_heads + kvh) * D + c);
            }
            *reinterpret_cast<uint4*>(ks + r * STRIDE + c) = kv4;
            *reinterpret_cast<uint4*>(vs + r * STRIDE + c) = vv4;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys: 8 blocks of 8 keys.
        float sc[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
        {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            const bf16* krow = ks + (j * 8 + g) * STRIDE;
#pragma unroll
            for (int kk = 0; kk < KCHUNKS; kk++)
            {
                unsigned int b[2];
                b[0] = *reinterpret_cast<const unsigned int*>(krow + kk * 16 + t4 * 2);
                b[1] = *reinterpret_cast<const unsigned int*>(krow + kk * 16 + 8 + t4 * 2);
                mma_bf16_16816(sc[j], qa[kk], b);
            }
        }

        // Mask, scale to the exp2 domain, row maxima (a row is spread over the 4 lanes of a quad).
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
            {
                const int key = kb + j * 8 + t4 * 2 + (e & 1), row = e < 2 ? row0 : row1;
                const bool masked = key >= seq_end || (causal && key > row);
                sc[j][e] = masked ? -INFINITY : sc[j][e] * scale_log2;
                if (e < 2) mx0 = fmaxf(mx0, sc[j][e]); else mx1 = fmaxf(mx1, sc[j][e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1)); mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1)); mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with no visible key yet keeps base 0 so that exp2(-inf - base) = 0, never NaN.
        const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
        m0 = mn0; m1 = mn1;
        l0 *= corr0; l1 *= corr1;
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; nb++) { acc[nb][0] *= corr0; acc[nb][1] *= corr0; acc[nb][2] *= corr1; acc[nb][3] *= corr1; }
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
        {
            sc[j][0] = exp2f(sc[j][0] - base0); sc[j][1] = exp2f(sc[j][1] - base0);
            sc[j][2] = exp2f(sc[j][2] - base1); sc[j][3] = exp2f(sc[j][3] - base1);
            l0 += sc[j][0] + sc[j][1];
            l1 += sc[j][2] + sc[j][3];
        }

        // O += P V: P (16 x 64) from the S accumulators as four k16 A fragments; V columns from shared memory.
#pragma unroll
        for (int c = 0; c < BN / 16; c++)
        {
            unsigned int pa[4];
            pa[0] = pack_bf16x2(sc[2 * c][0], sc[2 * c][1]);
            pa[1] = pack_bf16x2(sc[2 * c][2], sc[2 * c][3]);
            pa[2] = pack_bf16x2(sc[2 * c + 1][0], sc[2 * c + 1][1]);
            pa[3] = pack_bf16x2(sc[2 * c + 1][2], sc[2 * c + 1][3]);
            const bf16* v0 = vs + (c * 16 + t4 * 2) * STRIDE;
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; nb++)
            {
                const int col = nb * 8 + g;
                unsigned int b[2];
                b[0] = pack_bits(v0[col], v0[STRIDE + col]);
                b[1] = pack_bits(v0[8 * STRIDE + col], v0[9 * STRIDE + col]);
                mma_bf16_16816(acc[nb], pa, b);
            }
        }
    }

    // Each lane summed its own columns: complete the row sums over the quad, normalise, store.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1); l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1); l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int nb = 0; nb < NBLOCKS; nb++)
    {
        const int col = nb * 8 + t4 * 2;
        if (row0 < seq_end) *reinterpret_cast<unsigned int*>(o + ((long long)row0 * heads + h) * D + col) = pack_bf16x2(acc[nb][0] * inv0, acc[nb][1] * inv0);
        if (row1 < seq_end) *reinterpret_cast<unsigned int*>(o + ((long long)row1 * heads + h) * D + col) = pack_bf16x2(acc[nb][2] * inv1, acc[nb][3] * inv1);
    }
    if (t4 == 0)
    {
        const float ln2 = 0.6931471805599453f;
        if (row0 < seq_end) lse[(long long)row0 * heads + h] = l0 > 0.0f ? (m0 + log2f(l0)) * ln2 : -INFINITY;
        if (row1 < seq_end) lse[(long long)row1 * heads + h] = l1 > 0.0f ? (m1 + log2f(l1)) * ln2 : -INFINITY;
    }
}

#define INSTANTIATE_MMA_FORWARD(D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATTENTION_MMA_BLOCK) attention_mma_forward_d##D##_bf16(                    \
        bf16* o, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu_seqlens, const int* tile_offsets,   \
        int num_seqs, int heads, int kv_heads, float scale, int causal)                                                     \
    { attention_mma_forward_impl<D>(o, lse, q, k, v, cu_seqlens, tile_offsets, num_seqs, heads, kv_heads, scale, causal); }

INSTANTIATE_MMA_FORWARD(64)
INSTANTIATE_MMA_FORWARD(80)
INSTANTIATE_MMA_FORWARD(96)
INSTANTIATE_MMA_FORWARD(128)

// ---- backward on tensor cores ----------------------------------------------------------------------------------------
// Deterministic, in two kernels like attention.cu's (no atomics): dq by query tiles, dk/dv by key tiles. P and dS are
// recomputed from the saved lse and delta = rowsum(dO * O) (attention_backward_delta in attention.cu) and rounded to
// bf16 where they enter an mma as the A operand, as P is in the forward. lse is natural-log; the kernels work in exp2.
#define MMA_BWD_BLOCK_N 32 // keys per staged tile in the dq kernel, queries per staged tile in the dk/dv kernel

// B operand (16 x 8, k = rows of a row-major shared tile, n = its columns): two rows per register.
__device__ __forceinline__ void load_b_rows(unsigned int* b, const bf16* tile, int stride, int k0, int col, int t4)
{
    const bf16* r = tile + (k0 + t4 * 2) * stride + col;
    b[0] = pack_bits(r[0], r[stride]);
    b[1] = pack_bits(r[8 * stride], r[9 * stride]);
}

// B operand where k runs along a row (16 x 8, n = row index of the tile): one 32-bit load per register.
__device__ __forceinline__ void load_b_cols(unsigned int* b, const bf16* tile, int stride, int row, int k0, int t4)
{
    const bf16* r = tile + row * stride + k0 + t4 * 2;
    b[0] = *reinterpret_cast<const unsigned int*>(r);
    b[1] = *reinterpret_cast<const unsigned int*>(r + 8);
}

// A operand (16 rows x 16) from 16 consecutive rows of global memory, rows past `end` read as zero.
__device__ __forceinline__ void load_a_global(unsigned int* a, const bf16* base, long long row_stride, int row0, int end, int k0, int g, int t4)
{
    const int r0 = row0 + g, r1 = r0 + 8, c = k0 + t4 * 2;
    a[0] = r0 < end ? *reinterpret_cast<const unsigned int*>(base + r0 * row_stride + c) : 0u;
    a[1] = r1 < end ? *reinterpret_cast<const unsigned int*>(base + r1 * row_stride + c) : 0u;
    a[2] = r0 < end ? *reinterpret_cast<const unsigned int*>(base + r0 * row_stride + c + 8) : 0u;
    a[3] = r1 < end ? *reinterpret_cast<const unsigned int*>(base + r1 * row_stride + c + 8) : 0u;
}

// dq[i] = scale * sum_j dS_ij k_j, dS = P o (dO v^T - delta). One block of 4 warps per (64-query tile, head).
template <int D>
__device__ void attention_mma_backward_dq_impl(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
    const float* delta, const int* cu_seqlens, const int* tile_offsets, int num_seqs, int heads, int kv_heads, float scale, int causal)
{
    constexpr int STRIDE = D + 8, KCHUNKS = D / 16, NBLOCKS = D / 8, BN = MMA_BWD_BLOCK_N;
    __shared__ __align__(16) bf16 ks[BN * STRIDE];
    __shared__ __align__(16) bf16 vs[BN * STRIDE];
    const int tile = blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int s = find_sequence(tile_offsets, num_seqs, tile);
    const int seq_start = cu_seqlens[s], seq_end = cu_seqlens[s + 1];
    const int q_tile = seq_start + (tile - tile_offsets[s]) * MMA_BLOCK_M;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wrow = q_tile + warp * 16, row0 = wrow + g, row1 = row0 + 8;
    const float log2e = 1.4426950408889634f, scale_log2 = scale * log2e;
    const long long rs = (long long)heads * D;
    unsigned int qa[KCHUNKS][4], da[KCHUNKS][4];
#pragma unroll
    for (int kk = 0; kk < KCHUNKS; kk++)
    {
        load_a_global(qa[kk], q + (long long)h * D, rs, wrow, seq_end, kk * 16, g, t4);
        load_a_global(da[kk], dout + (long long)h * D, rs, wrow, seq_end, kk * 16, g, t4);
    }
    const float l0 = row0 < seq_end ? lse[(long long)row0 * heads + h] * log2e : 0.0f, l1 = row1 < seq_end ? lse[(long long)row1 * heads + h] * log2e : 0.0f;
    const float d0 = row0 < seq_end ? delta[(long long)row0 * heads + h] : 0.0f, d1 = row1 < seq_end ? delta[(long long)row1 * heads + h] : 0.0f;
    float acc[NBLOCKS][4];
#pragma unroll
    for (int nb = 0; nb < NBLOCKS; nb++) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;

    const int key_end = causal ? min(q_tile + MMA_BLOCK_M, seq_end) : seq_end;
    for (int kb = seq_start; kb < key_end; kb += BN)
    {
        __syncthreads();
        for (int i = threadIdx.x; i < BN * (D / 8); i += blockDim.x)
        {
            const int r = i / (D / 8), c = (i % (D / 8)) * 8, key = kb + r;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (key < seq_end)
            {
                kv4 = *reinterpret_cast<const uint4*>(k + ((long long)key * kv_heads + kvh) * D + c);
                vv4 = *reinterpret_cast<const uint4*>(v + ((long long)key * kv_heads + kvh) * D + c);
            }
            *reinterpret_cast<uint4*>(ks + r * STRIDE + c) = kv4;
            *reinterpret_cast<uint4*>(vs + r * STRIDE + c) = vv4;
        }
        __syncthreads();
        float sc[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
        {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KCHUNKS; kk++)
            {
                unsigned int b[2];
                load_b_cols(b, ks, STRIDE, j * 8 + g, kk * 16, t4);
                mma_bf16_16816(sc[j], qa[kk], b);
                load_b_cols(b, vs, STRIDE, j * 8 + g, kk * 16, t4);
                mma_bf16_16816(dp[j], da[kk], b);
            }
#pragma unroll
            for (int e = 0; e < 4; e++)
            {
                const int key = kb + j * 8 + t4 * 2 + (e & 1), row = e < 2 ? row0 : row1;
                const bool masked = key >= seq_end || row >= seq_end || (causal && key > row);
                const float p = masked ? 0.0f : exp2f(sc[j][e] * scale_log2 - (e < 2 ? l0 : l1));
                sc[j][e] = p * (dp[j][e] - (e < 2 ? d0 : d1)); // dS
            }
        }
#pragma unroll
        for (int c = 0; c < BN / 16; c++)
        {
            unsigned int a[4];
            a[0] = pack_bf16x2(sc[2 * c][0], sc[2 * c][1]);
            a[1] = pack_bf16x2(sc[2 * c][2], sc[2 * c][3]);
            a[2] = pack_bf16x2(sc[2 * c + 1][0], sc[2 * c + 1][1]);
            a[3] = pack_bf16x2(sc[2 * c + 1][2], sc[2 * c + 1][3]);
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; nb++)
            {
                unsigned int b[2];
                load_b_rows(b, ks, STRIDE, c * 16, nb * 8 + g, t4);
                mma_bf16_16816(acc[nb], a, b);
            }
        }
    }
#pragma unroll
    for (int nb = 0; nb < NBLOCKS; nb++)
    {
        const int col = nb * 8 + t4 * 2;
        if (row0 < seq_end) *reinterpret_cast<unsigned int*>(dq + ((long long)row0 * heads + h) * D + col) = pack_bf16x2(acc[nb][0] * scale, acc[nb][1] * scale);
        if (row1 < seq_end) *reinterpret_cast<unsigned int*>(dq + ((long long)row1 * heads + h) * D + col) = pack_bf16x2(acc[nb][2] * scale, acc[nb][3] * scale);
    }
}

// dv[j] = sum_h sum_i P_ij dO_i, dk[j] = scale * sum_h sum_i dS_ij q_i, over the query heads h of kv head g. One block
// of 4 warps per (64-key tile, kv head); each warp owns 16 keys and computes S^T = K Q^T, dP^T = V dO^T directly in the
// transposed layout, so P^T and dS^T are A operands from registers.
template <int D>
__device__ void attention_mma_backward_dkdv_impl(bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
    const float* lse, const float* delta, const int* cu_seqlens, const int* tile_offsets, int num_seqs, int heads, int kv_heads, float scale, int causal)
{
    constexpr int STRIDE = D + 8, KCHUNKS = D / 16, NBLOCKS = D / 8, BM = MMA_BWD_BLOCK_N;
    __shared__ __align__(16) bf16 qs[BM * STRIDE];
    __shared__ __align__(16) bf16 dos[BM * STRIDE];
    __shared__ float ls[BM], ds[BM];
    const int tile = blockIdx.x, kvh = blockIdx.y, group = heads / kv_heads;
    const int s = find_sequence(tile_offsets, num_seqs, tile);
    const int seq_start = cu_seqlens[s], seq_end = cu_seqlens[s + 1];
    const int k_tile = seq_start + (tile - tile_offsets[s]) * MMA_BLOCK_M;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wkey = k_tile + warp * 16, key0 = wkey + g, key1 = key0 + 8;
    const float log2e = 1.4426950408889634f, scale_log2 = scale * log2e;
    const long long rs = (long long)kv_heads * D;
    float dka[NBLOCKS][4], dva[NBLOCKS][4];
#pragma unroll
    for (int nb = 0; nb < NBLOCKS; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[nb][e] = dva[nb][e] = 0.0f;

    const int q_first = causal ? k_tile : seq_start;
    for (int hh = 0; hh < group; hh++)
    {
        const int h = kvh * group + hh;
        for (int qb = q_first; qb < seq_end; qb += BM)
        {
            __syncthreads();
            for (int i = threadIdx.x; i < BM * (D / 8); i += blockDim.x)
            {
                const int r = i / (D / 8), c = (i % (D / 8)) * 8, row = qb + r;
                uint4 q4 = make_uint4(0, 0, 0, 0), d4 = make_uint4(0, 0, 0, 0);
                if (row < seq_end)
                {
                    q4 = *reinterpret_cast<const uint4*>(q + ((long long)row * heads + h) * D + c);
                    d4 = *reinterpret_cast<const uint4*>(dout + ((long long)row * heads + h) * D + c);
                }
                *reinterpret_cast<uint4*>(qs + r * STRIDE + c) = q4;
                *reinterpret_cast<uint4*>(dos + r * STRIDE + c) = d4;
            }
            for (int r = threadIdx.x; r < BM; r += blockDim.x)
            {
                const int row = qb + r;
                ls[r] = row < seq_end ? lse[(long long)row * heads + h] * log2e : 0.0f;
                ds[r] = row < seq_end ? delta[(long long)row * heads + h] : 0.0f;
            }
            __syncthreads();
            float st[BM / 8][4], dpt[BM / 8][4]; // S^T and dP^T: rows = this warp's keys, columns = the tile's queries
#pragma unroll
            for (int j = 0; j < BM / 8; j++)
            {
                st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.0f;
                dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < KCHUNKS; kk++)
                {
                    unsigned int a[4], b[2];
                    load_a_global(a, k + (long long)kvh * D, rs, wkey, seq_end, kk * 16, g, t4);
                    load_b_cols(b, qs, STRIDE, j * 8 + g, kk * 16, t4);
                    mma_bf16_16816(st[j], a, b);
                    load_a_global(a, v + (long long)kvh * D, rs, wkey, seq_end, kk * 16, g, t4);
                    load_b_cols(b, dos, STRIDE, j * 8 + g, kk * 16, t4);
                    mma_bf16_16816(dpt[j], a, b);
                }
#pragma unroll
                for (int e = 0; e < 4; e++)
                {
                    const int qi = j * 8 + t4 * 2 + (e & 1), row = qb + qi, key = e < 2 ? key0 : key1;
                    const bool masked = row >= seq_end || key >= seq_end || (causal && key > row);
                    const float p = masked ? 0.0f : exp2f(st[j][e] * scale_log2 - ls[qi]);
                    st[j][e] = p;                        // P^T
                    dpt[j][e] = p * (dpt[j][e] - ds[qi]); // dS^T
                }
            }
#pragma unroll
            for (int c = 0; c < BM / 16; c++)
            {
                unsigned int pa[4], sa[4];
                pa[0] = pack_bf16x2(st[2 * c][0], st[2 * c][1]);         pa[1] = pack_bf16x2(st[2 * c][2], st[2 * c][3]);
                pa[2] = pack_bf16x2(st[2 * c + 1][0], st[2 * c + 1][1]); pa[3] = pack_bf16x2(st[2 * c + 1][2], st[2 * c + 1][3]);
                sa[0] = pack_bf16x2(dpt[2 * c][0], dpt[2 * c][1]);         sa[1] = pack_bf16x2(dpt[2 * c][2], dpt[2 * c][3]);
                sa[2] = pack_bf16x2(dpt[2 * c + 1][0], dpt[2 * c + 1][1]); sa[3] = pack_bf16x2(dpt[2 * c + 1][2], dpt[2 * c + 1][3]);
#pragma unroll
                for (int nb = 0; nb < NBLOCKS; nb++)
                {
                    unsigned int b[2];
                    load_b_rows(b, dos, STRIDE, c * 16, nb * 8 + g, t4);
                    mma_bf16_16816(dva[nb], pa, b);
                    load_b_rows(b, qs, STRIDE, c * 16, nb * 8 + g, t4);
                    mma_bf16_16816(dka[nb], sa, b);
                }
            }
        }
    }
#pragma unroll
    for (int nb = 0; nb < NBLOCKS; nb++)
    {
        const int col = nb * 8 + t4 * 2;
        if (key0 < seq_end)
        {
            *reinterpret_cast<unsigned int*>(dk + ((long long)key0 * kv_heads + kvh) * D + col) = pack_bf16x2(dka[nb][0] * scale, dka[nb][1] * scale);
            *reinterpret_cast<unsigned int*>(dv + ((long long)key0 * kv_heads + kvh) * D + col) = pack_bf16x2(dva[nb][0], dva[nb][1]);
        }
        if (key1 < seq_end)
        {
            *reinterpret_cast<unsigned int*>(dk + ((long long)key1 * kv_heads + kvh) * D + col) = pack_bf16x2(dka[nb][2] * scale, dka[nb][3] * scale);
            *reinterpret_cast<unsigned int*>(dv + ((long long)key1 * kv_heads + kvh) * D + col) = pack_bf16x2(dva[nb][2], dva[nb][3]);
        }
    }
}

#define INSTANTIATE_MMA_BACKWARD(D)                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATTENTION_MMA_BLOCK) attention_mma_backward_dq_d##D##_bf16(                      \
        bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,             \
        const int* cu_seqlens, const int* tile_offsets, int num_seqs, int heads, int kv_heads, float scale, int causal)            \
    { attention_mma_backward_dq_impl<D>(dq, q, k, v, dout, lse, delta, cu_seqlens, tile_offsets, num_seqs, heads, kv_heads, scale, causal); } \
    extern "C" __global__ void __launch_bounds__(ATTENTION_MMA_BLOCK) attention_mma_backward_dkdv_d##D##_bf16(                    \
        bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,   \
        const int* cu_seqlens, const int* tile_offsets, int num_seqs, int heads, int kv_heads, float scale, int causal)            \
    { attention_mma_backward_dkdv_impl<D>(dk, dv, q, k, v, dout, lse, delta, cu_seqlens, tile_offsets, num_seqs, heads, kv_heads, scale, causal); }

INSTANTIATE_MMA_BACKWARD(64)
INSTANTIATE_MMA_BACKWARD(80)
INSTANTIATE_MMA_BACKWARD(96)
INSTANTIATE_MMA_BACKWARD(128)
