using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/bias.cu.</summary>
internal static class BiasKernels
{
    /// <summary>y[i] += bias[i % cols], grid-stride over the elements.</summary>
    public static void Add(Index1D t, ArrayView<float> y, ArrayView<float> bias, int cols, int threads)
    {
        for (long i = t; i < y.Length; i += threads) y[i] += bias[i % cols];
    }

    /// <summary>
    /// dbias[c] (+)= sum_r dy[r, c], one thread per column, in the CUDA kernels' order: each chunk of
    /// <see cref="Backend.ColumnChunkRows"/> rows summed, then the chunks (bias_backward_partial + bias_backward_sum).
    /// </summary>
    public static void Backward(Index1D c, ArrayView<float> dbias, ArrayView<float> dy, int rows, int cols, int accumulate)
    {
        float s = 0f;
        for (int r0 = 0; r0 < rows; r0 += Backend.ColumnChunkRows)
        {
            float p = 0f;
            int r1 = Math.Min(rows, r0 + Backend.ColumnChunkRows);
            for (int r = r0; r < r1; r++) p += dy[(long)r * cols + c];
            s += p;
        }
        dbias[c] = accumulate != 0 ? dbias[c] + s : s;
    }
}
