using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/rows.cu.</summary>
internal static class RowsKernels
{
    /// <summary>dst[idx[r], :] = src[r, :], grid-stride over src's elements.</summary>
    public static void ScatterRows(Index1D t, ArrayView<float> dst, ArrayView<float> src, ArrayView<int> idx, int cols, int threads)
    {
        for (long i = t; i < src.Length; i += threads) dst[(long)idx[i / cols] * cols + i % cols] = src[i];
    }

    /// <summary>y[t, c] = x[t, c] * s[c], grid-stride.</summary>
    public static void ScaleColumns(Index1D t, ArrayView<float> y, ArrayView<float> x, ArrayView<float> s, int cols, int threads)
    {
        for (long i = t; i < y.Length; i += threads) y[i] = x[i] * s[i % cols];
    }

    /// <summary>ds[c] (+)= sum_t dy[t, c] * x[t, c], one thread per column.</summary>
    public static void ScaleColumnsBackward(Index1D c, ArrayView<float> ds, ArrayView<float> dy, ArrayView<float> x, int rows, int cols, int accumulate)
    {
        float sum = 0f;
        for (int r = 0; r < rows; r++) { long i = (long)r * cols + c; sum += dy[i] * x[i]; }
        ds[c] = accumulate != 0 ? ds[c] + sum : sum;
    }
}
