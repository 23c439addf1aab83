namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/rmsnorm.cu through its ILGPU twin, against double-precision references.</summary>
[Collection("cpu")]
public sealed class RmsNormTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;
    private const float Eps = 1e-6f;

    private float[] Forward(float[] x, float[] w, int rows, int cols, out float[] rstd)
    {
        using var tx = _b.FromArray(x, DType.F32, [rows, cols]);
        using var tw = _b.FromArray(w, DType.F32, [cols]);
        using var ty = _b.Allocate(DType.F32, rows, cols);
        using var tr = _b.Allocate(DType.F32, rows);
        _b.RmsNormForward(tx, tw, ty, tr, Eps);
        rstd = tr.ToFloatArray();
        return ty.ToFloatArray();
    }

    /// <summary>Backward at (x, w) with dy = r; dw accumulates onto <paramref name="dwInitial"/> when given.</summary>
    private (float[] Dx, float[] Dw) Backward(float[] x, float[] w, float[] r, int rows, int cols, float[]? dwInitial)
    {
        Forward(x, w, rows, cols, out var rstd);
        using var tx = _b.FromArray(x, DType.F32, [rows, cols]);
        using var tw = _b.FromArray(w, DType.F32, [cols]);
        using var tdy = _b.FromArray(r, DType.F32, [rows, cols]);
        using var tr = _b.FromArray(rstd, DType.F32, [rows]);
        using var tdx = _b.Allocate(DType.F32, rows, cols);
        using var tdw = dwInitial is null ? _b.Allocate(DType.F32, cols) : _b.FromArray(dwInitial, DType.F32, [cols]);
        _b.RmsNormBackward(tdy, tx, tw, tr, tdx, tdw, accumulate: dwInitial is not null);
        return (tdx.ToFloatArray(), tdw.ToFloatArray());
    }

    // Shapes: one row, a row count and width that are not multiples of any block, a width larger than a block.
    [Theory]
    [InlineData(1, 7)]
    [InlineData(5, 64)]
    [InlineData(3, 301)]
    public void RmsNormForward_MatchesDoubleReference(int rows, int cols)
    {
        var x = TestData.Uniform(1, rows * cols, 3f);
        var w = TestData.Uniform(2, cols);
        var y = Forward(x, w, rows, cols, out _);
        // fp32 sums of cols squares: relative error ~1e-7 * sqrt(cols); 1e-5 leaves margin and catches a wrong eps or mean.
        Check.Close(Reference.RmsNorm(TestData.ToDouble(x), TestData.ToDouble(w), rows, cols, Eps), y, 1e-6, 1e-5, "y");
    }

    [Theory]
    [InlineData(1, 5)]
    [InlineData(4, 33)]
    public void RmsNormBackward_MatchesDoubleReferenceGradients(int rows, int cols)
    {
        var x = TestData.Uniform(3, rows * cols, 2f);
        var w = TestData.Uniform(4, cols);
        var r = TestData.Uniform(5, rows * cols);
        var (dx, dw) = Backward(x, w, r, rows, cols, Enumerable.Repeat(0.5f, cols).ToArray());

        var xd = TestData.ToDouble(x); var wd = TestData.ToDouble(w); var rd = TestData.ToDouble(r);
        var gx = Reference.Gradient(v => Reference.Dot(rd, Reference.RmsNorm(v, wd, rows, cols, Eps)), xd);
        var gw = Reference.Gradient(v => Reference.Dot(rd, Reference.RmsNorm(xd, v, rows, cols, Eps)), wd);
        Check.Close(gx, dx, 1e-5, 1e-4, "dx");
        Check.Close(gw.Select(g => g + 0.5).ToArray(), dw, 1e-5, 1e-4, "dw (accumulated onto 0.5)");
    }

    [Fact]
    public void RmsNormBackward_MatchesFiniteDifferencesOfBackendForward()
    {
        const int rows = 3, cols = 20;
        var x = TestData.Uniform(6, rows * cols, 2f);
        var w = TestData.Uniform(7, cols);
        var r = TestData.Uniform(8, rows * cols);
        var (dx, dw) = Backward(x, w, r, rows, cols, null);
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(v, w, rows, cols, out _)), x, dx, "dx");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(x, v, rows, cols, out _)), w, dw, "dw");
    }

    [Fact]
    public void RmsNormForward_RejectsMismatchedWeight_NamingTheTensor()
    {
        using var x = _b.Allocate(DType.F32, 2, 8);
        using var w = _b.Allocate(DType.F32, 7);
        using var y = _b.Allocate(DType.F32, 2, 8);
        using var r = _b.Allocate(DType.F32, 2);
        var e = Assert.Throws<ArgumentException>(() => _b.RmsNormForward(x, w, y, r, Eps));
        Assert.Contains("rmsnorm_forward: weight", e.Message);
        Assert.Contains("expected 8 elements", e.Message);
    }
}
