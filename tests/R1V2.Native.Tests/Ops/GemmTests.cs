namespace R1V2.Native.Tests.Ops;

/// <summary>GEMM (SIMD C# on the CPU) with bias (kernels/bias.cu's ILGPU twin) and its backward.</summary>
[Collection("cpu")]
public sealed class GemmTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Theory]
    [InlineData(false, false, 5, 7, 3)]
    [InlineData(true, false, 1, 9, 4)]
    [InlineData(false, true, 6, 1, 11)]
    [InlineData(true, true, 13, 17, 33)]
    // The blocked kernel's paths: 4-row blocks and a remainder, two-vector column chunks, single vectors and scalar
    // columns, several k slices of 256 and a partial one.
    [InlineData(false, false, 37, 45, 300)]
    [InlineData(true, false, 8, 64, 513)]
    [InlineData(false, true, 4, 16, 257)]
    [InlineData(true, true, 41, 67, 600)]
    // A weight stored [n, k] (a linear layer): b transposed into the blocked kernel, vector and scalar column tails.
    [InlineData(false, true, 32, 300, 43)]
    [InlineData(false, true, 33, 45, 300)]
    public void Gemm_MatchesDoubleReference_AllTransposes_WithBiasAndBeta(bool transA, bool transB, int m, int n, int k)
    {
        var a = TestData.Uniform(51, m * k);
        var bm = TestData.Uniform(52, k * n);
        var c0 = TestData.Uniform(53, m * n);
        var bias = TestData.Uniform(54, n);
        using var ta = _b.FromArray(a, DType.F32, transA ? [k, m] : [m, k]);
        using var tb = _b.FromArray(bm, DType.F32, transB ? [n, k] : [k, n]);
        using var tc = _b.FromArray(c0, DType.F32, [m, n]);
        using var tbias = _b.FromArray(bias, DType.F32, [n]);
        _b.Gemm(ta, transA, tb, transB, tc, tbias, alpha: 0.75f, beta: 0.5f);
        var expected = Reference.Gemm(TestData.ToDouble(a), transA, TestData.ToDouble(bm), transB, TestData.ToDouble(c0), TestData.ToDouble(bias), m, n, k, 0.75, 0.5);
        // k products of values below 1 in fp32: error ~ k * 6e-8.
        Check.Close(expected, tc.ToFloatArray(), 1e-5, 1e-5, "c");
    }

    [Fact]
    public void Gemm_BetaZero_IgnoresGarbageInOutput()
    {
        using var a = _b.FromArray([1f, 2f], DType.F32, [1, 2]);
        using var b = _b.FromArray([3f, 4f], DType.F32, [2, 1]);
        using var c = _b.FromArray([float.NaN], DType.F32, [1, 1]);
        _b.Gemm(a, false, b, false, c);
        Assert.Equal(11f, c.ToFloatArray()[0]);
    }

    [Fact]
    public void Gemm_Batched_MatchesPerBatchReference()
    {
        const int batch = 3, m = 4, n = 5, k = 6;
        var a = TestData.Uniform(55, batch * m * k);
        var bm = TestData.Uniform(56, batch * n * k);
        using var ta = _b.FromArray(a, DType.F32, [batch, m, k]);
        using var tb = _b.FromArray(bm, DType.F32, [batch, n, k]);
        using var tc = _b.Allocate(DType.F32, batch, m, n);
        _b.Gemm(ta, false, tb, true, tc);
        var got = tc.ToFloatArray();
        for (int i = 0; i < batch; i++)
        {
            var e = Reference.Gemm(TestData.ToDouble(a[(i * m * k)..((i + 1) * m * k)]), false, TestData.ToDouble(bm[(i * n * k)..((i + 1) * n * k)]), true, null, null, m, n, k, 1, 0);
            Check.Close(e, got[(i * m * n)..((i + 1) * m * n)], 1e-5, 1e-5, $"c[{i}]");
        }
    }

    [Fact]
    public void LinearBackward_ThroughGemmAndBiasBackward_MatchesFiniteDifferences()
    {
        // y[T, out] = x[T, in] W[out, in]^T + b; dx = dy W; dW = dy^T x; db = colsum(dy).
        const int t = 5, din = 7, dout = 3;
        var x = TestData.Uniform(57, t * din);
        var w = TestData.Uniform(58, dout * din);
        var bias = TestData.Uniform(59, dout);
        var r = TestData.Uniform(60, t * dout);
        float[] Forward(float[] xx, float[] ww, float[] bb)
        {
            using var tx = _b.FromArray(xx, DType.F32, [t, din]);
            using var tw = _b.FromArray(ww, DType.F32, [dout, din]);
            using var tb = _b.FromArray(bb, DType.F32, [dout]);
            using var ty = _b.Allocate(DType.F32, t, dout);
            _b.Gemm(tx, false, tw, true, ty, tb);
            return ty.ToFloatArray();
        }

        using var tx = _b.FromArray(x, DType.F32, [t, din]);
        using var tw = _b.FromArray(w, DType.F32, [dout, din]);
        using var tdy = _b.FromArray(r, DType.F32, [t, dout]);
        using var tdx = _b.Allocate(DType.F32, t, din);
        using var tdw = _b.Allocate(DType.F32, dout, din);
        using var tdb = _b.FromArray(Enumerable.Repeat(1f, dout).ToArray(), DType.F32, [dout]);
        _b.Gemm(tdy, false, tw, false, tdx);
        _b.Gemm(tdy, true, tx, false, tdw);
        _b.BiasBackward(tdy, tdb, accumulate: true);

        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(v, w, bias)), x, tdx.ToFloatArray(), "dx");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(x, v, bias)), w, tdw.ToFloatArray(), "dW");
        var db = tdb.ToFloatArray();
        for (int j = 0; j < dout; j++)
        {
            double s = 1;
            for (int i = 0; i < t; i++) s += r[i * dout + j];
            Assert.True(Math.Abs(db[j] - s) < 1e-5, $"db[{j}] = {db[j]}, expected {s} (column sum accumulated onto 1)");
        }
    }

    [Fact]
    public void Gemm_WithNoRows_DoesNothing()
    {
        using var a = _b.Allocate(DType.F32, 0, 3);
        using var w = _b.Allocate(DType.F32, 4, 3);
        using var c = _b.Allocate(DType.F32, 0, 4);
        _b.Gemm(a, false, w, true, c);
        Assert.Empty(c.ToFloatArray());
    }

    [Fact]
    public void Gemm_InnerDimensionMismatch_IsAClearError()
    {
        using var a = _b.Allocate(DType.F32, 2, 3);
        using var b = _b.Allocate(DType.F32, 4, 5);
        using var c = _b.Allocate(DType.F32, 2, 5);
        var e = Assert.Throws<ArgumentException>(() => _b.Gemm(a, false, b, false, c));
        Assert.Contains("inner dimensions differ", e.Message);
        Assert.Contains("[2, 3]", e.Message);
    }
}
