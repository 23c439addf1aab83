// Flash attention at FlashAttention-2's efficiency on sm_80+ (mma.sync m16n8k16, bf16 in, fp32 accumulate).
//
// Forward: one block of 4 warps per (128-query tile, head), 32 query rows per warp (two m16 fragments); Q, K and V tiles
// in shared memory (XOR-swizzled 16-byte chunks at D = 64/128, padded rows at 80/96), read with ldmatrix (V with
// ldmatrix.trans); 16-byte cp.async copies overlap the math: V(n) is issued before S = Q K(n)^T, K(n+1) before O += P V(n).
// Only tiles that cross the causal diagonal or the sequence end are masked; the heaviest query tiles are scheduled first.
// Keys per tile: 64 at every head dim, so the online softmax rescales once per 64 keys (the CPU twin's blockN).
//
// Backward: one pass. A block of 8 warps owns a 128-key tile of one query head (K and V resident in shared memory, each
// warp 16 keys) and walks the query tiles of 64 rows that see it (Q, dO double-buffered by cp.async): S^T = K Q^T and
// dP^T = V dO^T give P^T and dS^T in registers; dV += P^T dO, dK += dS^T Q; dS^T goes through shared memory for
// dQ += dS K: five matmuls. dQ is deterministic without atomics: the grid is (splits, heads) and split s owns key tiles
// s, s + splits, ... in order, adding its dQ into its own fp32 partial [splits, T, H, D]; attention_flash_dq_reduce sums
// the partials in split order. dK and dV are written per query head in fp32 and attention_flash_dkdv_reduce sums the
// heads of each kv head in order (GQA). The same inputs give the same bits on every run.
//
// q, o, dq: [T, H, D] bf16; k, v, dk, dv: [T, Hkv, D] bf16; lse, delta: [T, H] fp32 (lse natural-log); cu_seqlens [S + 1];
// tile_offsets [S + 1] (128-row tiles of each sequence, for query tiles in the forward and key tiles in the backward).
#include "common.cuh"
#include "mma.cuh"

#ifndef ATTENTION_FLASH_BLOCK
#define ATTENTION_FLASH_BLOCK 128
#endif
#define FLASH_M 128      // forward: query rows per block (4 warps x 32)
#define FLASH_N 64       // forward: keys per tile
#define FLASH_BWD_N 128  // backward: keys per block (8 warps x 16)
#define FLASH_BWD_M 64   // backward: query rows per tile
#define FLASH_BWD_THREADS 256

// Shared-memory layout of a tile with D bf16 columns: 16-byte chunks XOR-swizzled by the row's low three bits where a
// row has a multiple of 8 chunks (ldmatrix's 8 row addresses then fall in 8 different bank groups), else rows padded
// by one chunk (80 and 96 columns: 11 and 13 chunks per row, also conflict-free). Offsets in bf16 elements.
template <int D> struct FlashTile
{
    static constexpr bool swizzled = (D / 8) % 8 == 0;
    static constexpr int stride = swizzled ? D : D + 8;
    __device__ static __forceinline__ int at(int row, int chunk) { return row * stride + (swizzled ? (chunk ^ (row & 7)) : chunk) * 8; }
};

// rows x D bf16 from global rows first.. (row stride in elements) into a shared tile; rows at or past `end` become zeros.
// Where the threads cover whole rows (D = 64, 128), each thread keeps one column chunk and steps down the rows by a
// multiple of 8, so its shared offset moves by a constant (the swizzle depends on the row's low bits only) and its
// global pointer by one stride: no per-copy address registers survive between tiles.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void flash_copy_tile(bf16* tile, const bf16* base, long long row_stride, int first, int end)
{
    constexpr int CHUNKS = D / 8;
    if constexpr (THREADS % CHUNKS == 0 && (THREADS / CHUNKS) % 8 == 0 && ROWS % (THREADS / CHUNKS) == 0)
    {
        constexpr int STEP = THREADS / CHUNKS;
        const int r0 = threadIdx.x / CHUNKS, c = threadIdx.x % CHUNKS;
        bf16* dst = tile + FlashTile<D>::at(r0, c);
        const bf16* src = base + (long long)(first + r0) * row_stride + c * 8;
#pragma unroll
        for (int it = 0; it < ROWS / STEP; it++)
        {
            const bool valid = first + r0 + it * STEP < end;
            cp_async16(dst + it * STEP * FlashTile<D>::stride, valid ? src : base, valid);
            src += STEP * row_stride;
        }
    }
    else
    {
        for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS)
        {
            const int r = i / CHUNKS, c = i % CHUNKS, row = first + r;
            const bool valid = row < end;
            cp_async16(tile + FlashTile<D>::at(r, c), valid ? base + (long long)row * row_stride + c * 8 : base, valid);
        }
    }
}

template <int D>
__device__ void attention_flash_forward_impl(bf16* __restrict__ o, float* __restrict__ lse, const bf16* __restrict__ q,
    const bf16* __restrict__ k, const bf16* __restrict__ v, const int* __restrict__ cu_seqlens, const int* __restrict__ tile_offsets,
    int num_seqs, int heads, int kv_heads, float scale, int causal)
{
    typedef FlashTile<D> L;
    constexpr int KCHUNKS = D / 16, NBLOCKS = D / 8;
    extern __shared__ __align__(16) unsigned char flash_smem[];
    bf16* qs = reinterpret_cast<bf16*>(flash_smem);
    bf16* ks = qs + FLASH_M * L::stride;
    bf16* vs = ks + FLASH_N * L::stride;

    const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads); // last (heaviest) tiles first
    const int s = find_sequence(tile_offsets, num_seqs, tile);
    const int seq_start = cu_seqlens[s], seq_end = cu_seqlens[s + 1];
    const int q_tile = seq_start + (tile - tile_offsets[s]) * FLASH_M;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int wrow = warp * 32; // this warp's first row within the tile
    const float scale_log2 = scale * 1.4426950408889634f;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    const int key_end = causal ? min(q_tile + FLASH_M, seq_end) : seq_end;

    flash_copy_tile<D, FLASH_M, ATTENTION_FLASH_BLOCK>(qs, q + (long long)h * D, q_stride, q_tile, seq_end);
    flash_copy_tile<D, FLASH_N, ATTENTION_FLASH_BLOCK>(ks, k + (long long)kvh * D, kv_stride, seq_start, seq_end);
    cp_async_commit();

    float acc[2][NBLOCKS][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; nb++) acc[mi][nb][0] = acc[mi][nb][1] = acc[mi][nb][2] = acc[mi][nb][3] = 0.0f;
    float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};

    for (int kb = seq_start; kb < key_end; kb += FLASH_N)
    {
        cp_async_wait_all();
        __syncthreads(); // K(n) (and Q) landed; every warp is done with V(n-1)
        flash_copy_tile<D, FLASH_N, ATTENTION_FLASH_BLOCK>(vs, v + (long long)kvh * D, kv_stride, kb, seq_end);
        cp_async_commit();

        // S = Q K^T: 32 rows x 64 keys per warp.
        float sc[2][FLASH_N / 8][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int j = 0; j < FLASH_N / 8; j++) sc[mi][j][0] = sc[mi][j][1] = sc[mi][j][2] = sc[mi][j][3] = 0.0f;
#pragma unroll 2 // fully unrolled, ptxas hoists every fragment load and spills at D = 128
        for (int kk = 0; kk < KCHUNKS; kk++)
        {
            unsigned int qa[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
                ldmatrix_x4(qa[mi], shared_address(qs + L::at(wrow + mi * 16 + (lane & 15), kk * 2 + (lane >> 4))));
#pragma unroll
            for (int jj = 0; jj < FLASH_N / 16; jj++)
            {
                unsigned int kf[4]; // {b0, b1} of keys jj*16..+7, then of keys +8..+15
                ldmatrix_x4(kf, shared_address(ks + L::at(jj * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1))));
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
                {
                    mma_bf16_16816(sc[mi][2 * jj], qa[mi], kf);
                    mma_bf16_16816(sc[mi][2 * jj + 1], qa[mi], kf + 2);
                }
            }
        }

        // Mask (only where the tile crosses the diagonal or the end), scale to exp2, online softmax per row.
        const bool edge = kb + FLASH_N > seq_end || (causal && kb + FLASH_N - 1 > q_tile);
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
        {
            const int row0 = q_tile + wrow + mi * 16 + g, row1 = row0 + 8;
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < FLASH_N / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                {
                    const int key = kb + j * 8 + t4 * 2 + (e & 1), row = e < 2 ? row0 : row1;
                    const bool masked = edge && (key >= seq_end || (causal && key > row));
                    sc[mi][j][e] = masked ? -INFINITY : sc[mi][j][e] * scale_log2;
                    if (e < 2) mx0 = fmaxf(mx0, sc[mi][j][e]); else mx1 = fmaxf(mx1, sc[mi][j][e]);
                }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1)); mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1)); mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m[mi][0], mx0), mn1 = fmaxf(m[mi][1], mx1);
            const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
            const float corr0 = exp2f(m[mi][0] - base0), corr1 = exp2f(m[mi][1] - base1);
            m[mi][0] = mn0; m[mi][1] = mn1;
            l[mi][0] *= corr0; l[mi][1] *= corr1;
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; nb++) { acc[mi][nb][0] *= corr0; acc[mi][nb][1] *= corr0; acc[mi][nb][2] *= corr1; acc[mi][nb][3] *= corr1; }
#pragma unroll
            for (int j = 0; j < FLASH_N / 8; j++)
            {
                sc[mi][j][0] = exp2f(sc[mi][j][0] - base0); sc[mi][j][1] = exp2f(sc[mi][j][1] - base0);
                sc[mi][j][2] = exp2f(sc[mi][j][2] - base1); sc[mi][j][3] = exp2f(sc[mi][j][3] - base1);
                l[mi][0] += sc[mi][j][0] + sc[mi][j][1];
                l[mi][1] += sc[mi][j][2] + sc[mi][j][3];
            }
        }

        cp_async_wait_all();
        __syncthreads(); // V(n) landed; every warp is done with K(n)
        if (kb + FLASH_N < key_end)
            flash_copy_tile<D, FLASH_N, ATTENTION_FLASH_BLOCK>(ks, k + (long long)kvh * D, kv_stride, kb + FLASH_N, seq_end);
        cp_async_commit();

        // O += P V: P from the S accumulators (k16 A fragments), V through ldmatrix.trans.
#pragma unroll
        for (int c = 0; c < FLASH_N / 16; c++)
        {
            unsigned int pa[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
            {
                pa[mi][0] = pack_bf16x2(sc[mi][2 * c][0], sc[mi][2 * c][1]);
                pa[mi][1] = pack_bf16x2(sc[mi][2 * c][2], sc[mi][2 * c][3]);
                pa[mi][2] = pack_bf16x2(sc[mi][2 * c + 1][0], sc[mi][2 * c + 1][1]);
                pa[mi][3] = pack_bf16x2(sc[mi][2 * c + 1][2], sc[mi][2 * c + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < NBLOCKS / 2; dd++)
            {
                unsigned int vf[4]; // {b0, b1} of columns dd*16..+7, then of +8..+15
                ldmatrix_x4_trans(vf, shared_address(vs + L::at(c * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dd * 2 + (lane >> 4))));
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
                {
                    mma_bf16_16816(acc[mi][2 * dd], pa[mi], vf);
                    mma_bf16_16816(acc[mi][2 * dd + 1], pa[mi], vf + 2);
                }
            }
        }
    }

    const float ln2 = 0.6931471805599453f;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
    {
        const int row0 = q_tile + wrow + mi * 16 + g, row1 = row0 + 8;
        float l0 = l[mi][0], l1 = l[mi][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1); l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1); l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; nb++)
        {
            const int col = nb * 8 + t4 * 2;
            if (row0 < seq_end) *reinterpret_cast<unsigned int*>(o + ((long long)row0 * heads + h) * D + col) = pack_bf16x2(acc[mi][nb][0] * inv0, acc[mi][nb][1] * inv0);
            if (row1 < seq_end) *reinterpret_cast<unsigned int*>(o + ((long long)row1 * heads + h) * D + col) = pack_bf16x2(acc[mi][nb][2] * inv1, acc[mi][nb][3] * inv1);
        }
        if (t4 == 0)
        {
            if (row0 < seq_end) lse[(long long)row0 * heads + h] = l0 > 0.0f ? (m[mi][0] + log2f(l0)) * ln2 : -INFINITY;
            if (row1 < seq_end) lse[(long long)row1 * heads + h] = l1 > 0.0f ? (m[mi][1] + log2f(l1)) * ln2 : -INFINITY;
        }
    }
}

// ---- backward ----------------------------------------------------------------------------------------------------

template <int D>
__device__ void attention_flash_backward_impl(float* __restrict__ dq_partial, float* __restrict__ dk_heads, float* __restrict__ dv_heads,
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, const bf16* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, const int* __restrict__ cu_seqlens, const int* __restrict__ tile_offsets,
    int num_seqs, int tokens, int heads, int kv_heads, float scale, int causal)
{
    typedef FlashTile<D> L;
    typedef FlashTile<FLASH_BWD_M> LS; // dS^T: 128 keys x 64 queries
    constexpr int KCHUNKS = D / 16, NBLOCKS = D / 8;
    extern __shared__ __align__(16) unsigned char flash_smem[];
    bf16* ks = reinterpret_cast<bf16*>(flash_smem);
    bf16* vs = ks + FLASH_BWD_N * L::stride;
    bf16* qs = vs + FLASH_BWD_N * L::stride;    // two buffers
    bf16* dos = qs + 2 * FLASH_BWD_M * L::stride; // two buffers
    bf16* dst = dos + 2 * FLASH_BWD_M * L::stride;
    float* ls = reinterpret_cast<float*>(dst + FLASH_BWD_N * LS::stride); // two buffers of lse (exp2 domain)
    float* ds = ls + 2 * FLASH_BWD_M;                                      // two buffers of delta

    const int split = blockIdx.x, splits = gridDim.x, h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const float log2e = 1.4426950408889634f, scale_log2 = scale * log2e;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    float* dq_mine = dq_partial + (long long)split * tokens * heads * D;
    const int key_tiles = tile_offsets[num_seqs];

    for (int tile = split; tile < key_tiles; tile += splits)
    {
        const int s = find_sequence(tile_offsets, num_seqs, tile);
        const int seq_start = cu_seqlens[s], seq_end = cu_seqlens[s + 1];
        const int k_tile = seq_start + (tile - tile_offsets[s]) * FLASH_BWD_N;
        const int key0 = k_tile + warp * 16 + g, key1 = key0 + 8; // this thread's two keys
        // Query tiles of 64 rows from the sequence start: causal starts at the tile holding the block's first key.
        const int q_first = causal ? seq_start + ((k_tile - seq_start) / FLASH_BWD_M) * FLASH_BWD_M : seq_start;

        __syncthreads(); // the previous key tile's shared memory is no longer read
        flash_copy_tile<D, FLASH_BWD_N, FLASH_BWD_THREADS>(ks, k + (long long)kvh * D, kv_stride, k_tile, seq_end);
        flash_copy_tile<D, FLASH_BWD_N, FLASH_BWD_THREADS>(vs, v + (long long)kvh * D, kv_stride, k_tile, seq_end);
        flash_copy_tile<D, FLASH_BWD_M, FLASH_BWD_THREADS>(qs, q + (long long)h * D, q_stride, q_first, seq_end);
        flash_copy_tile<D, FLASH_BWD_M, FLASH_BWD_THREADS>(dos, dout + (long long)h * D, q_stride, q_first, seq_end);
        for (int r = threadIdx.x; r < FLASH_BWD_M; r += FLASH_BWD_THREADS)
        {
            const int row = q_first + r;
            ls[r] = row < seq_end ? lse[(long long)row * heads + h] * log2e : 0.0f;
            ds[r] = row < seq_end ? delta[(long long)row * heads + h] : 0.0f;
        }
        cp_async_commit();

        float dka[NBLOCKS][4], dva[NBLOCKS][4];
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) dka[nb][e] = dva[nb][e] = 0.0f;

        int buf = 0;
        for (int qb = q_first; qb < seq_end; qb += FLASH_BWD_M, buf ^= 1)
        {
            cp_async_wait_all();
            __syncthreads(); // this tile's Q, dO, lse, delta landed; every warp is done with the previous tile
            const bf16* qcur = qs + buf * FLASH_BWD_M * L::stride;
            const bf16* docur = dos + buf * FLASH_BWD_M * L::stride;
            const float* lcur = ls + buf * FLASH_BWD_M;
            const float* dcur = ds + buf * FLASH_BWD_M;
            if (qb + FLASH_BWD_M < seq_end)
            {
                const int nxt = buf ^ 1, next = qb + FLASH_BWD_M;
                flash_copy_tile<D, FLASH_BWD_M, FLASH_BWD_THREADS>(qs + nxt * FLASH_BWD_M * L::stride, q + (long long)h * D, q_stride, next, seq_end);
                flash_copy_tile<D, FLASH_BWD_M, FLASH_BWD_THREADS>(dos + nxt * FLASH_BWD_M * L::stride, dout + (long long)h * D, q_stride, next, seq_end);
                for (int r = threadIdx.x; r < FLASH_BWD_M; r += FLASH_BWD_THREADS)
                {
                    const int row = next + r;
                    ls[nxt * FLASH_BWD_M + r] = row < seq_end ? lse[(long long)row * heads + h] * log2e : 0.0f;
                    ds[nxt * FLASH_BWD_M + r] = row < seq_end ? delta[(long long)row * heads + h] : 0.0f;
                }
            }
            cp_async_commit();

            // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x the tile's 64 queries.
            float st[FLASH_BWD_M / 8][4], dpt[FLASH_BWD_M / 8][4];
#pragma unroll
            for (int j = 0; j < FLASH_BWD_M / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[j][e] = dpt[j][e] = 0.0f;
#pragma unroll 1 // the dK/dV accumulators hold 128 registers at D = 128: no room for hoisted fragments
            for (int kk = 0; kk < KCHUNKS; kk++)
            {
                unsigned int ka[4], va[4];
                ldmatrix_x4(ka, shared_address(ks + L::at(warp * 16 + (lane & 15), kk * 2 + (lane >> 4))));
                ldmatrix_x4(va, shared_address(vs + L::at(warp * 16 + (lane & 15), kk * 2 + (lane >> 4))));
#pragma unroll
                for (int jj = 0; jj < FLASH_BWD_M / 16; jj++)
                {
                    unsigned int qf[4], df[4];
                    const int row = jj * 16 + (lane & 7) + ((lane >> 4) << 3), chunk = kk * 2 + ((lane >> 3) & 1);
                    ldmatrix_x4(qf, shared_address(qcur + L::at(row, chunk)));
                    ldmatrix_x4(df, shared_address(docur + L::at(row, chunk)));
                    mma_bf16_16816(st[2 * jj], ka, qf);
                    mma_bf16_16816(st[2 * jj + 1], ka, qf + 2);
                    mma_bf16_16816(dpt[2 * jj], va, df);
                    mma_bf16_16816(dpt[2 * jj + 1], va, df + 2);
                }
            }
            const bool edge = qb + FLASH_BWD_M > seq_end || k_tile + FLASH_BWD_N > seq_end || (causal && k_tile + FLASH_BWD_N - 1 > qb);
#pragma unroll
            for (int j = 0; j < FLASH_BWD_M / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                {
                    const int qi = j * 8 + t4 * 2 + (e & 1), row = qb + qi, key = e < 2 ? key0 : key1;
                    const bool masked = edge && (row >= seq_end || key >= seq_end || (causal && key > row));
                    const float p = masked ? 0.0f : exp2f(st[j][e] * scale_log2 - lcur[qi]);
                    st[j][e] = p;                          // P^T
                    dpt[j][e] = p * (dpt[j][e] - dcur[qi]); // dS^T
                }
            // dS^T to shared memory (bf16, as it enters every mma) for dQ = dS K.
#pragma unroll
            for (int j = 0; j < FLASH_BWD_M / 8; j++)
            {
                const int col = j * 8 + t4 * 2, r0 = warp * 16 + g;
                *reinterpret_cast<unsigned int*>(dst + LS::at(r0, col >> 3) + (col & 7)) = pack_bf16x2(dpt[j][0], dpt[j][1]);
                *reinterpret_cast<unsigned int*>(dst + LS::at(r0 + 8, col >> 3) + (col & 7)) = pack_bf16x2(dpt[j][2], dpt[j][3]);
            }
            // dV += P^T dO, dK += dS^T Q (dO and Q through ldmatrix.trans).
#pragma unroll
            for (int c = 0; c < FLASH_BWD_M / 16; c++)
            {
                unsigned int pa[4], sa[4];
                pa[0] = pack_bf16x2(st[2 * c][0], st[2 * c][1]);         pa[1] = pack_bf16x2(st[2 * c][2], st[2 * c][3]);
                pa[2] = pack_bf16x2(st[2 * c + 1][0], st[2 * c + 1][1]); pa[3] = pack_bf16x2(st[2 * c + 1][2], st[2 * c + 1][3]);
                sa[0] = pack_bf16x2(dpt[2 * c][0], dpt[2 * c][1]);         sa[1] = pack_bf16x2(dpt[2 * c][2], dpt[2 * c][3]);
                sa[2] = pack_bf16x2(dpt[2 * c + 1][0], dpt[2 * c + 1][1]); sa[3] = pack_bf16x2(dpt[2 * c + 1][2], dpt[2 * c + 1][3]);
#pragma unroll
                for (int dd = 0; dd < NBLOCKS / 2; dd++)
                {
                    unsigned int df[4], qf[4];
                    const int row = c * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, chunk = dd * 2 + (lane >> 4);
                    ldmatrix_x4_trans(df, shared_address(docur + L::at(row, chunk)));
                    ldmatrix_x4_trans(qf, shared_address(qcur + L::at(row, chunk)));
                    mma_bf16_16816(dva[2 * dd], pa, df);
                    mma_bf16_16816(dva[2 * dd + 1], pa, df + 2);
                    mma_bf16_16816(dka[2 * dd], sa, qf);
                    mma_bf16_16816(dka[2 * dd + 1], sa, qf + 2);
                }
            }
            __syncthreads(); // dS^T complete

            // dQ (64 x D) += dS (64 x 128 keys) K: warp w takes query rows (w % 4) * 16 and every other 8-column block,
            // four blocks at a time (16 accumulator registers).
            {
                constexpr int MINE = (NBLOCKS + 1) / 2, CHUNK = 4;
                const int qr = (warp & 3) * 16, half = warp >> 2, row0 = qb + qr + g, row1 = row0 + 8;
#pragma unroll 1
                for (int c0 = 0; c0 < MINE; c0 += CHUNK)
                {
                    float qacc[CHUNK][4];
#pragma unroll
                    for (int i = 0; i < CHUNK; i++) qacc[i][0] = qacc[i][1] = qacc[i][2] = qacc[i][3] = 0.0f;
#pragma unroll 1
                    for (int kc = 0; kc < FLASH_BWD_N / 16; kc++)
                    {
                        unsigned int a[4]; // dS rows qr..qr+15, keys kc*16..+15, from dS^T with .trans
                        ldmatrix_x4_trans(a, shared_address(dst + LS::at(kc * 16 + (lane & 7) + ((lane >> 4) << 3), (qr >> 3) + ((lane >> 3) & 1))));
#pragma unroll
                        for (int i = 0; i < CHUNK; i++)
                        {
                            const int nb = 2 * (c0 + i) + half;
                            if (nb < NBLOCKS)
                            {
                                unsigned int b[2];
                                ldmatrix_x2_trans(b, shared_address(ks + L::at(kc * 16 + (lane & 15), nb)));
                                mma_bf16_16816(qacc[i], a, b);
                            }
                        }
                    }
#pragma unroll
                    for (int i = 0; i < CHUNK; i++)
                    {
                        const int nb = 2 * (c0 + i) + half, col = nb * 8 + t4 * 2;
                        if (nb >= NBLOCKS) continue;
                        if (row0 < seq_end)
                        {
                            float2* p = reinterpret_cast<float2*>(dq_mine + ((long long)row0 * heads + h) * D + col);
                            float2 x = *p; x.x += qacc[i][0]; x.y += qacc[i][1]; *p = x;
                        }
                        if (row1 < seq_end)
                        {
                            float2* p = reinterpret_cast<float2*>(dq_mine + ((long long)row1 * heads + h) * D + col);
                            float2 x = *p; x.x += qacc[i][2]; x.y += qacc[i][3]; *p = x;
                        }
                    }
                }
            }
        }

        // This query head's dK (unscaled) and dV for the block's keys, fp32.
#pragma unroll
        for (int nb = 0; nb < NBLOCKS; nb++)
        {
            const int col = nb * 8 + t4 * 2;
            if (key0 < seq_end)
            {
                *reinterpret_cast<float2*>(dk_heads + ((long long)key0 * heads + h) * D + col) = make_float2(dka[nb][0], dka[nb][1]);
                *reinterpret_cast<float2*>(dv_heads + ((long long)key0 * heads + h) * D + col) = make_float2(dva[nb][0], dva[nb][1]);
            }
            if (key1 < seq_end)
            {
                *reinterpret_cast<float2*>(dk_heads + ((long long)key1 * heads + h) * D + col) = make_float2(dka[nb][2], dka[nb][3]);
                *reinterpret_cast<float2*>(dv_heads + ((long long)key1 * heads + h) * D + col) = make_float2(dva[nb][2], dva[nb][3]);
            }
        }
    }
}

#define INSTANTIATE_FLASH(D)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTENTION_FLASH_BLOCK) attention_flash_forward_d##D##_bf16(                  \
        bf16* o, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu_seqlens, const int* tile_offsets,       \
        int num_seqs, int heads, int kv_heads, float scale, int causal)                                                         \
    { attention_flash_forward_impl<D>(o, lse, q, k, v, cu_seqlens, tile_offsets, num_seqs, heads, kv_heads, scale, causal); }  \
    extern "C" __global__ void __launch_bounds__(FLASH_BWD_THREADS) attention_flash_backward_d##D##_bf16(                     \
        float* dq_partial, float* dk_heads, float* dv_heads, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,     \
        const float* lse, const float* delta, const int* cu_seqlens, const int* tile_offsets, int num_seqs, int tokens,        \
        int heads, int kv_heads, float scale, int causal)                                                                       \
    { attention_flash_backward_impl<D>(dq_partial, dk_heads, dv_heads, q, k, v, dout, lse, delta, cu_seqlens, tile_offsets,   \
        num_seqs, tokens, heads, kv_heads, scale, causal); }

INSTANTIATE_FLASH(64)
INSTANTIATE_FLASH(80)
INSTANTIATE_FLASH(96)
INSTANTIATE_FLASH(128)

// dq = scale * sum over splits (in split order) of the fp32 partials; n = T * H * D.
extern "C" __global__ void __launch_bounds__(ATTENTION_FLASH_BLOCK) attention_flash_dq_reduce(bf16* __restrict__ dq,
    const float* __restrict__ partial, int splits, long long n, float scale)
{
    FOR_EACH(i, n)
    {
        float s = 0.0f;
        for (int p = 0; p < splits; p++) s += partial[(long long)p * n + i];
        dq[i] = float_to_bf16(s * scale);
    }
}

// dk = scale * sum over the query heads of each kv head (in order) of dk_heads, dv likewise unscaled; n = T * Hkv * D.
extern "C" __global__ void __launch_bounds__(ATTENTION_FLASH_BLOCK) attention_flash_dkdv_reduce(bf16* __restrict__ dk,
    bf16* __restrict__ dv, const float* __restrict__ dk_heads, const float* __restrict__ dv_heads, int heads, int kv_heads, int dim,
    long long n, float scale)
{
    const int group = heads / kv_heads;
    FOR_EACH(i, n)
    {
        const long long t = i / ((long long)kv_heads * dim);
        const int rest = (int)(i - t * kv_heads * dim), kvh = rest / dim, d = rest - kvh * dim;
        const long long first = (t * heads + (long long)kvh * group) * dim + d;
        float sk = 0.0f, sv = 0.0f;
        for (int hh = 0; hh < group; hh++) { sk += dk_heads[first + (long long)hh * dim]; sv += dv_heads[first + (long long)hh * dim]; }
        dk[i] = float_to_bf16(sk * scale);
        dv[i] = float_to_bf16(sv);
    }
}
