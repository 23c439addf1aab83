using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twins of kernels/grad_norm.cu: per-chunk partial sums of squares (one thread per chunk, as one CUDA block
/// per chunk), then one thread sums the partials in order; deterministic like the CUDA pair.
/// </summary>
internal static class GradNormKernels
{
    public static void SumSquaresPartial(Index1D chunk, ArrayView<float> partial, ArrayView<float> x, long n, int chunkSize)
    {
        long start = (long)chunk.X * chunkSize, end = Math.Min(n, start + chunkSize);
        float s = 0f;
        for (long i = start; i < end; i++) { float v = x[i]; s += v * v; }
        partial[chunk] = s;
    }

    public static void SumPartials(Index1D unused, ArrayView<float> output, ArrayView<float> partial, int count, int accumulate)
    {
        float s = 0f;
        for (int i = 0; i < count; i++) s += partial[i];
        output[0] = accumulate != 0 ? output[0] + s : s;
    }
}
