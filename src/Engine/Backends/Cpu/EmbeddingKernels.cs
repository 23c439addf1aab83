using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twins of kernels/embedding.cu. The backward runs one thread per (id group, column) and adds the group's rows
/// in position order, as the CUDA kernel does: no atomics, the same bits every run. Ids are range-checked on the host
/// before launch (CPU memory is host memory; the backward's groups are built there).
/// </summary>
internal static class EmbeddingKernels
{
    /// <summary>The forward's copy, element by element (the CUDA kernel walks token rows on a 2-D grid: the same values, moved).</summary>
    public static void Forward(Index1D thread, ArrayView<float> output, ArrayView<float> table, ArrayView<int> ids, int dim, int threads)
    {
        for (long i = thread; i < output.Length; i += threads) output[i] = table[(long)ids[i / dim] * dim + i % dim];
    }

    public static void Backward(Index1D i, ArrayView<float> dtable, ArrayView<float> doutput, ArrayView<int> order, ArrayView<int> starts,
        ArrayView<int> rows, int dim)
    {
        int g = i / dim, c = i % dim;
        long at = (long)rows[g] * dim + c;
        float sum = dtable[at];
        for (int k = starts[g]; k < starts[g + 1]; k++) sum += doutput[(long)order[k] * dim + c];
        dtable[at] = sum;
    }
}
