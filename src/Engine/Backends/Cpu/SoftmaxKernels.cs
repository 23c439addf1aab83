using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/softmax.cu: one thread per row (max, sum, normalise).</summary>
internal static class SoftmaxKernels
{
    public static void Forward(Index1D row, ArrayView<float> y, ArrayView<float> x, int cols, float scale)
    {
        long b = (long)row.X * cols;
        float m = float.NegativeInfinity;
        for (int c = 0; c < cols; c++) m = MathF.Max(m, scale * x[b + c]);
        float s = 0f;
        for (int c = 0; c < cols; c++) s += MathF.Exp(scale * x[b + c] - m);
        float inv = 1f / s;
        for (int c = 0; c < cols; c++) y[b + c] = MathF.Exp(scale * x[b + c] - m) * inv;
    }

    public static void Backward(Index1D row, ArrayView<float> dx, ArrayView<float> dy, ArrayView<float> y, int cols, float scale)
    {
        long b = (long)row.X * cols;
        float dot = 0f;
        for (int c = 0; c < cols; c++) dot += dy[b + c] * y[b + c];
        for (int c = 0; c < cols; c++) dx[b + c] = scale * y[b + c] * (dy[b + c] - dot);
    }
}
