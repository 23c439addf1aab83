using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// Row-major GEMM on host memory, fp32 accumulation: c = alpha * op(a) @ op(b) + beta * c. An ILGPU GEMM runs at about
/// 0.1 GFLOP/s on the CPU accelerator; this one reads op(a) in place through its strides (a transposed a, as in a
/// weight gradient x^T dy over many tokens, is not copied: four rows of op(a) are then adjacent values), packs op(b) as
/// [k, n] rows (a transposing copy only for a transposed b, a weight), then runs a register-blocked kernel: 4 rows of c
/// by 3 SIMD vectors of columns (then 2 for what is left) held in registers while a slice of <see cref="KTile"/> rows
/// of b (kept in L2) streams through; row blocks in parallel. The sum over k runs in the same order for every thread count and layout, so
/// results do not depend on either.
/// </summary>
internal static unsafe class CpuGemm
{
    /// <summary>Rows of op(b) per pass: 256 x n floats stay in L2 for the widths of the models here.</summary>
    private const int KTile = 256;

    /// <summary>Each worker thread's accumulator rows (4 x n), kept between calls.</summary>
    [ThreadStatic] private static float[]? t_acc;

    /// <param name="a">op(a) is [m, k]: a is [m, k], or [k, m] when transA.</param>
    /// <param name="b">op(b) is [k, n]: b is [k, n], or [n, k] when transB.</param>
    /// <param name="c">[m, n]; read only when beta != 0 (so NaN garbage in c is not propagated by beta = 0).</param>
    public static void Gemm(float* a, bool transA, float* b, bool transB, float* c, int m, int n, int k, float alpha, float beta)
    {
        float* packedB = null;
        try
        {
            if (transB) b = packedB = Transposed(b, n, k);
            float* A = a, B = b;
            long rowStride = transA ? 1 : k, depthStride = transA ? m : 1; // op(a)[r, p] = a[r * rowStride + p * depthStride]
            int blocks = (m + 3) / 4;
            var options = new ParallelOptions { MaxDegreeOfParallelism = (long)m * n * k < 1 << 16 ? 1 : Environment.ProcessorCount };
            Parallel.For(0, blocks, options, block =>
            {
                var acc = t_acc is { } held && held.Length >= 4 * n ? held : t_acc = new float[Math.Max(4 * n, 1024)];
                int i0 = block * 4, rows = Math.Min(4, m - i0);
                fixed (float* accp = acc)
                {
                    if (k == 0) new Span<float>(accp, rows * n).Clear();
                    for (int p0 = 0; p0 < k; p0 += KTile)
                        Block(A + i0 * rowStride, rowStride, depthStride, B, n, accp, rows, n, p0, Math.Min(k, p0 + KTile));
                    for (int r = 0; r < rows; r++)
                    {
                        float* cr = c + (long)(i0 + r) * n, ar = accp + r * n;
                        if (beta == 0f) for (int j = 0; j < n; j++) cr[j] = alpha * ar[j];
                        else for (int j = 0; j < n; j++) cr[j] = alpha * ar[j] + beta * cr[j];
                    }
                }
            });
        }
        finally
        {
            NativeMemory.Free(packedB);
        }
    }

    /// <summary>x is [rows, cols] row-major; returns its transpose [cols, rows] in native memory the caller frees.</summary>
    private static float* Transposed(float* x, int rows, int cols)
    {
        var t = (float*)NativeMemory.Alloc((nuint)Math.Max(1L, (long)rows * cols), sizeof(float));
        const int tile = 32;
        for (int r0 = 0; r0 < rows; r0 += tile)
            for (int c0 = 0; c0 < cols; c0 += tile)
                for (int r = r0; r < Math.Min(rows, r0 + tile); r++)
                    for (int col = c0; col < Math.Min(cols, c0 + tile); col++)
                        t[(long)col * rows + r] = x[(long)r * cols + col];
        return t;
    }

    /// <summary>
    /// acc[r, :] += sum over p in [p0, p1) of a[r rs + p ds] * b[p, :] for rows r &lt; rows (at most 4); the first slice
    /// (p0 = 0) starts from zero instead of reading acc.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Block(float* a, long rs, long ds, float* b, int ldb, float* acc, int rows, int n, int p0, int p1)
    {
        int w = Vector<float>.Count, j = 0;
        if (rows == 4)
        {
            // 4 rows x 3 vectors: 12 independent sums cover the FMA latency with 7 loads per 12 FMAs.
            for (; j + 3 * w <= n; j += 3 * w)
            {
                Vector<float> c00 = Start(acc + j, p0), c01 = Start(acc + j + w, p0), c02 = Start(acc + j + 2 * w, p0);
                Vector<float> c10 = Start(acc + n + j, p0), c11 = Start(acc + n + j + w, p0), c12 = Start(acc + n + j + 2 * w, p0);
                Vector<float> c20 = Start(acc + 2 * n + j, p0), c21 = Start(acc + 2 * n + j + w, p0), c22 = Start(acc + 2 * n + j + 2 * w, p0);
                Vector<float> c30 = Start(acc + 3 * n + j, p0), c31 = Start(acc + 3 * n + j + w, p0), c32 = Start(acc + 3 * n + j + 2 * w, p0);
                float* ap = a + p0 * ds;
                for (int p = p0; p < p1; p++, ap += ds)
                {
                    float* bp = b + (long)p * ldb + j;
                    var b0 = Load(bp);
                    var b1 = Load(bp + w);
                    var b2 = Load(bp + 2 * w);
                    var a0 = new Vector<float>(ap[0]);
                    c00 = Vector.FusedMultiplyAdd(a0, b0, c00); c01 = Vector.FusedMultiplyAdd(a0, b1, c01); c02 = Vector.FusedMultiplyAdd(a0, b2, c02);
                    var a1 = new Vector<float>(ap[rs]);
                    c10 = Vector.FusedMultiplyAdd(a1, b0, c10); c11 = Vector.FusedMultiplyAdd(a1, b1, c11); c12 = Vector.FusedMultiplyAdd(a1, b2, c12);
                    var a2 = new Vector<float>(ap[2 * rs]);
                    c20 = Vector.FusedMultiplyAdd(a2, b0, c20); c21 = Vector.FusedMultiplyAdd(a2, b1, c21); c22 = Vector.FusedMultiplyAdd(a2, b2, c22);
                    var a3 = new Vector<float>(ap[3 * rs]);
                    c30 = Vector.FusedMultiplyAdd(a3, b0, c30); c31 = Vector.FusedMultiplyAdd(a3, b1, c31); c32 = Vector.FusedMultiplyAdd(a3, b2, c32);
                }
                Store(c00, acc + j); Store(c01, acc + j + w); Store(c02, acc + j + 2 * w);
                Store(c10, acc + n + j); Store(c11, acc + n + j + w); Store(c12, acc + n + j + 2 * w);
                Store(c20, acc + 2 * n + j); Store(c21, acc + 2 * n + j + w); Store(c22, acc + 2 * n + j + 2 * w);
                Store(c30, acc + 3 * n + j); Store(c31, acc + 3 * n + j + w); Store(c32, acc + 3 * n + j + 2 * w);
            }
            for (; j + 2 * w <= n; j += 2 * w)
            {
                Vector<float> c00 = Start(acc + j, p0), c01 = Start(acc + j + w, p0);
                Vector<float> c10 = Start(acc + n + j, p0), c11 = Start(acc + n + j + w, p0);
                Vector<float> c20 = Start(acc + 2 * n + j, p0), c21 = Start(acc + 2 * n + j + w, p0);
                Vector<float> c30 = Start(acc + 3 * n + j, p0), c31 = Start(acc + 3 * n + j + w, p0);
                float* ap = a + p0 * ds;
                for (int p = p0; p < p1; p++, ap += ds)
                {
                    var b0 = Load(b + (long)p * ldb + j);
                    var b1 = Load(b + (long)p * ldb + j + w);
                    var a0 = new Vector<float>(ap[0]);
                    var a1 = new Vector<float>(ap[rs]);
                    var a2 = new Vector<float>(ap[2 * rs]);
                    var a3 = new Vector<float>(ap[3 * rs]);
                    c00 = Vector.FusedMultiplyAdd(a0, b0, c00); c01 = Vector.FusedMultiplyAdd(a0, b1, c01);
                    c10 = Vector.FusedMultiplyAdd(a1, b0, c10); c11 = Vector.FusedMultiplyAdd(a1, b1, c11);
                    c20 = Vector.FusedMultiplyAdd(a2, b0, c20); c21 = Vector.FusedMultiplyAdd(a2, b1, c21);
                    c30 = Vector.FusedMultiplyAdd(a3, b0, c30); c31 = Vector.FusedMultiplyAdd(a3, b1, c31);
                }
                Store(c00, acc + j); Store(c01, acc + j + w);
                Store(c10, acc + n + j); Store(c11, acc + n + j + w);
                Store(c20, acc + 2 * n + j); Store(c21, acc + 2 * n + j + w);
                Store(c30, acc + 3 * n + j); Store(c31, acc + 3 * n + j + w);
            }
        }
        // Columns left over (and blocks of fewer than 4 rows): one row and one vector at a time, then scalars.
        for (int r = 0; r < rows; r++)
        {
            float* ar = a + r * rs, cr = acc + r * n;
            int jj = j;
            for (; jj + w <= n; jj += w)
            {
                var s = Start(cr + jj, p0);
                for (int p = p0; p < p1; p++) s = Vector.FusedMultiplyAdd(new Vector<float>(ar[p * ds]), Load(b + (long)p * ldb + jj), s);
                Store(s, cr + jj);
            }
            for (; jj < n; jj++)
            {
                float s = p0 == 0 ? 0f : cr[jj];
                for (int p = p0; p < p1; p++) s = MathF.FusedMultiplyAdd(ar[p * ds], b[(long)p * ldb + jj], s);
                cr[jj] = s;
            }
        }
    }

    private static Vector<float> Load(float* p) => Unsafe.ReadUnaligned<Vector<float>>(p);

    /// <summary>The running sum of a slice: zero for the first, else what acc holds.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<float> Start(float* p, int p0) => p0 == 0 ? Vector<float>.Zero : Load(p);

    private static void Store(Vector<float> v, float* p) => Unsafe.WriteUnaligned(p, v);
}
