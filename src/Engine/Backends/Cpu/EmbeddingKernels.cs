using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twins of kernels/embedding.cu. The backward runs one thread per embedding column and walks the tokens in
/// order, so rows that share an id are summed without atomics (and deterministically). Ids are range-checked on the
/// host before launch (CPU memory is host memory).
/// </summary>
internal static class EmbeddingKernels
{
    public static void Forward(Index1D thread, ArrayView<float> output, ArrayView<float> table, ArrayView<int> ids, int dim, int threads)
    {
        for (long i = thread; i < output.Length; i += threads) output[i] = table[(long)ids[i / dim] * dim + i % dim];
    }

    public static void Backward(Index1D c, ArrayView<float> dtable, ArrayView<float> doutput, ArrayView<int> ids, int tokens, int dim)
    {
        for (int t = 0; t < tokens; t++) dtable[(long)ids[t] * dim + c] += doutput[(long)t * dim + c];
    }
}
