using System.Numerics.Tensors;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// Row-major GEMM on host memory with SIMD (System.Numerics.Tensors), parallel over output rows, fp32 accumulation:
/// c = alpha * op(a) @ op(b) + beta * c. An ILGPU GEMM runs at about 0.1 GFLOP/s on the CPU accelerator; this runs
/// at memory or SIMD speed over the same buffers.
/// </summary>
internal static unsafe class CpuGemm
{
    /// <param name="a">op(a) is [m, k]: a is [m, k], or [k, m] when transA.</param>
    /// <param name="b">op(b) is [k, n]: b is [k, n], or [n, k] when transB.</param>
    /// <param name="c">[m, n]; read only when beta != 0 (so NaN garbage in c is not propagated by beta = 0).</param>
    public static void Gemm(float* a, bool transA, float* b, bool transB, float* c, int m, int n, int k, float alpha, float beta)
    {
        // Small problems are not worth the threads.
        var options = new ParallelOptions { MaxDegreeOfParallelism = (long)m * n * k < 1 << 16 ? 1 : Environment.ProcessorCount };
        Parallel.For(0, m, options, () => (new float[k], new float[n]), (i, _, scratch) =>
        {
            var (aRow, acc) = scratch;
            if (transA)
                for (int p = 0; p < k; p++) aRow[p] = a[(long)p * m + i];
            else
                new ReadOnlySpan<float>(a + (long)i * k, k).CopyTo(aRow);

            if (transB)
            {
                for (int j = 0; j < n; j++)
                    acc[j] = TensorPrimitives.Dot<float>(aRow, new ReadOnlySpan<float>(b + (long)j * k, k));
            }
            else
            {
                Array.Clear(acc);
                for (int p = 0; p < k; p++)
                {
                    float av = aRow[p];
                    if (av != 0f) TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(b + (long)p * n, n), av, acc, acc);
                }
            }

            var cRow = new Span<float>(c + (long)i * n, n);
            if (beta == 0f) TensorPrimitives.Multiply(acc, alpha, cRow);
            else
                for (int j = 0; j < n; j++) cRow[j] = alpha * acc[j] + beta * cRow[j];
            return scratch;
        }, _ => { });
    }
}
