using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twins of kernels/rmsnorm.cu: rows in a grid-stride loop, each row by one thread (the CUDA kernels use a block
/// per row); the weight gradient one thread per column.
/// </summary>
internal static class RmsNormKernels
{
    public static void Forward(Index1D t, ArrayView<float> y, ArrayView<float> rstd, ArrayView<float> x, ArrayView<float> w, int rows, int cols, float eps, int threads)
    {
        for (int row = t; row < rows; row += threads) ForwardRow(row, y, rstd, x, w, cols, eps);
    }

    private static void ForwardRow(int row, ArrayView<float> y, ArrayView<float> rstd, ArrayView<float> x, ArrayView<float> w, int cols, float eps)
    {
        long b = (long)row * cols;
        float ss = 0f;
        for (int c = 0; c < cols; c++) { float v = x[b + c]; ss += v * v; }
        float r = 1f / MathF.Sqrt(ss / cols + eps);
        rstd[row] = r;
        for (int c = 0; c < cols; c++) y[b + c] = w[c] * (x[b + c] * r);
    }

    /// <summary>dx = rstd * (g - xhat * mean(g * xhat)), g = w * dy.</summary>
    public static void Backward(Index1D t, ArrayView<float> dx, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> w, ArrayView<float> rstd,
        int rows, int cols, int threads)
    {
        for (int row = t; row < rows; row += threads) BackwardRow(row, dx, dy, x, w, rstd, cols);
    }

    private static void BackwardRow(int row, ArrayView<float> dx, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> w, ArrayView<float> rstd, int cols)
    {
        long b = (long)row * cols;
        float r = rstd[row];
        float dot = 0f;
        for (int c = 0; c < cols; c++) dot += w[c] * dy[b + c] * x[b + c] * r;
        dot /= cols;
        for (int c = 0; c < cols; c++) dx[b + c] = r * (w[c] * dy[b + c] - x[b + c] * r * dot);
    }

    /// <summary>dw[c] (+)= sum_t dy * x * rstd, one thread per column.</summary>
    public static void BackwardWeight(Index1D c, ArrayView<float> dw, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> rstd, int rows, int cols, int accumulate)
    {
        // In the CUDA kernels' order: each chunk of ColumnChunkRows rows, then the chunks.
        float s = 0f;
        for (int r0 = 0; r0 < rows; r0 += Backend.ColumnChunkRows)
        {
            float p = 0f;
            int r1 = Math.Min(rows, r0 + Backend.ColumnChunkRows);
            for (int r = r0; r < r1; r++) { long i = (long)r * cols + c; p += dy[i] * x[i] * rstd[r]; }
            s += p;
        }
        dw[c] = accumulate != 0 ? dw[c] + s : s;
    }
}
