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

    /// <summary>dbias[c] (+)= sum_r dy[r, c], one thread per column (deterministic).</summary>
    public static void Backward(Index1D c, ArrayView<float> dbias, ArrayView<float> dy, int rows, int cols, int accumulate)
    {
        float s = 0f;
        for (int r = 0; r < rows; r++) s += dy[(long)r * cols + c];
        dbias[c] = accumulate != 0 ? dbias[c] + s : s;
    }
}
