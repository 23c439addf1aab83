// Token embedding lookup. Forward: out[t, :] = table[ids[t], :]; backward: dtable[ids[t], :] += dout[t, :].
// Forward on a 2-D grid: block x is token t (its id read and checked once), blocks y and the threads walk its columns
// (no 64-bit division per element).
// table, out, dout: storage dtype; table [V, C], out [T, C]; ids [T] int32; dtable [V, C] fp32.
// Forward: an id outside [0, V) is not read or written: its row index and value go to error[0..1] (error[0] starts
// at -1). Backward: the host has checked the ids and grouped the positions by id.
#include "common.cuh"

#ifndef EMBEDDING_BLOCK
#define EMBEDDING_BLOCK 256
#endif

__device__ __forceinline__ bool check_id(int id, int vocab, int t, int* error)
{
    if (id >= 0 && id < vocab) return true;
    if (atomicCAS(&error[0], -1, t) == -1) error[1] = id;
    return false;
}

template <typename T>
__device__ void embedding_forward_impl(T* __restrict__ out, const T* __restrict__ table, const int* __restrict__ ids, int tokens, int dim, int vocab,
    int* error)
{
    const int t = blockIdx.x;
    if (t >= tokens) return;
    const int id = ids[t];
    if (!check_id(id, vocab, t, error)) return;
    const T* row = table + (long long)id * dim;
    T* dst = out + (long long)t * dim;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < dim; c += gridDim.y * blockDim.x) dst[c] = row[c];
}
INSTANTIATE_F32_BF16(embedding_forward, EMBEDDING_BLOCK, (T* out, const T* table, const int* ids, int tokens, int dim, int vocab, int* error), (out, table, ids, tokens, dim, vocab, error))

// Scatter-add without atomics: one thread per (id group, column) adds the group's rows in position order, so rows that
// share an id are summed in the same order every run (deterministic). order [T]: positions grouped by id; starts
// [groups + 1]: where each group begins in order; rows [groups]: each group's id.
template <typename T>
__device__ void embedding_backward_impl(float* dtable, const T* dout, const int* order, const int* starts, const int* rows,
                                        int groups, int dim)
{
    FOR_EACH(i, (long long)groups * dim)
    {
        const int g = (int)(i / dim), c = (int)(i % dim);
        const long long at = (long long)rows[g] * dim + c;
        float sum = dtable[at];
        for (int k = starts[g]; k < starts[g + 1]; k++) sum += load(dout, (long long)order[k] * dim + c);
        dtable[at] = sum;
    }
}
INSTANTIATE_F32_BF16(embedding_backward, EMBEDDING_BLOCK,
    (float* dtable, const T* dout, const int* order, const int* starts, const int* rows, int groups, int dim),
    (dtable, dout, order, starts, rows, groups, dim))
