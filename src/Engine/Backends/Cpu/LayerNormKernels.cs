using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/layernorm.cu: one thread per row, two passes (mean, centred variance).</summary>
internal static class LayerNormKernels
{
    public static void Forward(Index1D row, ArrayView<float> y, ArrayView<float> mean, ArrayView<float> rstd, ArrayView<float> x,
        ArrayView<float> w, ArrayView<float> bias, int hasBias, int cols, float eps)
    {
        long b = (long)row.X * cols;
        float s = 0f;
        for (int c = 0; c < cols; c++) s += x[b + c];
        float mu = s / cols;
        float ss = 0f;
        for (int c = 0; c < cols; c++) { float d = x[b + c] - mu; ss += d * d; }
        float r = 1f / MathF.Sqrt(ss / cols + eps);
        mean[row] = mu;
        rstd[row] = r;
        for (int c = 0; c < cols; c++) y[b + c] = (x[b + c] - mu) * r * w[c] + (hasBias != 0 ? bias[c] : 0f);
    }

    /// <summary>dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * dy.</summary>
    public static void Backward(Index1D row, ArrayView<float> dx, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> w,
        ArrayView<float> mean, ArrayView<float> rstd, int cols)
    {
        long b = (long)row.X * cols;
        float mu = mean[row], r = rstd[row];
        float sg = 0f, sgx = 0f;
        for (int c = 0; c < cols; c++)
        {
            float g = w[c] * dy[b + c];
            sg += g;
            sgx += g * (x[b + c] - mu) * r;
        }
        sg /= cols;
        sgx /= cols;
        for (int c = 0; c < cols; c++) dx[b + c] = r * (w[c] * dy[b + c] - sg - (x[b + c] - mu) * r * sgx);
    }

    /// <summary>dw[c] (+)= sum_t dy * xhat; db[c] (+)= sum_t dy (when hasBias). One thread per column.</summary>
    public static void BackwardParams(Index1D c, ArrayView<float> dw, ArrayView<float> db, int hasBias, ArrayView<float> dy, ArrayView<float> x,
        ArrayView<float> mean, ArrayView<float> rstd, int rows, int cols, int accumulate)
    {
        // In the CUDA kernels' order: each chunk of ColumnChunkRows rows, then the chunks.
        float sw = 0f, sb = 0f;
        for (int r0 = 0; r0 < rows; r0 += Backend.ColumnChunkRows)
        {
            float pw = 0f, pb = 0f;
            int r1 = Math.Min(rows, r0 + Backend.ColumnChunkRows);
            for (int r = r0; r < r1; r++)
            {
                long i = (long)r * cols + c;
                float g = dy[i];
                pw += g * (x[i] - mean[r]) * rstd[r];
                pb += g;
            }
            sw += pw;
            sb += pb;
        }
        dw[c] = accumulate != 0 ? dw[c] + sw : sw;
        if (hasBias != 0) db[c] = accumulate != 0 ? db[c] + sb : sb;
    }
}
