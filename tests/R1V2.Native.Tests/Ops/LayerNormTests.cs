namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/layernorm.cu through its ILGPU twin.</summary>
[Collection("cpu")]
public sealed class LayerNormTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;
    private const float Eps = 1e-5f;

    private float[] Forward(float[] x, float[] w, float[]? bias, int rows, int cols, out float[] mean, out float[] rstd)
    {
        using var tx = _b.FromArray(x, DType.F32, [rows, cols]);
        using var tw = _b.FromArray(w, DType.F32, [cols]);
        using var tb = bias is null ? null : _b.FromArray(bias, DType.F32, [cols]);
        using var ty = _b.Allocate(DType.F32, rows, cols);
        using var tm = _b.Allocate(DType.F32, rows);
        using var tr = _b.Allocate(DType.F32, rows);
        _b.LayerNormForward(tx, tw, tb, ty, tm, tr, Eps);
        mean = tm.ToFloatArray();
        rstd = tr.ToFloatArray();
        return ty.ToFloatArray();
    }

    [Theory]
    [InlineData(1, 9, true)]
    [InlineData(6, 130, false)]
    public void LayerNormForward_MatchesDoubleReference(int rows, int cols, bool withBias)
    {
        // An offset of 50 tests the two-pass (centred) variance: a one-pass E[x^2] - E[x]^2 loses digits here.
        var x = TestData.Uniform(11, rows * cols).Select(v => v + 50f).ToArray();
        var w = TestData.Uniform(12, cols);
        var bias = withBias ? TestData.Uniform(13, cols) : null;
        var y = Forward(x, w, bias, rows, cols, out _, out _);
        var expected = Reference.LayerNorm(TestData.ToDouble(x), TestData.ToDouble(w), bias is null ? null : TestData.ToDouble(bias), rows, cols, Eps);
        Check.Close(expected, y, 1e-4, 1e-4, "y");
    }

    [Fact]
    public void LayerNormBackward_MatchesDoubleReferenceAndFiniteDifferences()
    {
        const int rows = 4, cols = 19;
        var x = TestData.Uniform(14, rows * cols, 2f);
        var w = TestData.Uniform(15, cols);
        var bias = TestData.Uniform(16, cols);
        var r = TestData.Uniform(17, rows * cols);
        Forward(x, w, bias, rows, cols, out var mean, out var rstd);

        using var tx = _b.FromArray(x, DType.F32, [rows, cols]);
        using var tw = _b.FromArray(w, DType.F32, [cols]);
        using var tdy = _b.FromArray(r, DType.F32, [rows, cols]);
        using var tm = _b.FromArray(mean, DType.F32, [rows]);
        using var tr = _b.FromArray(rstd, DType.F32, [rows]);
        using var tdx = _b.Allocate(DType.F32, rows, cols);
        using var tdw = _b.Allocate(DType.F32, cols);
        using var tdb = _b.Allocate(DType.F32, cols);
        _b.LayerNormBackward(tdy, tx, tw, tm, tr, tdx, tdw, tdb, accumulate: false);

        var xd = TestData.ToDouble(x); var wd = TestData.ToDouble(w); var bd = TestData.ToDouble(bias); var rd = TestData.ToDouble(r);
        Check.Close(Reference.Gradient(v => Reference.Dot(rd, Reference.LayerNorm(v, wd, bd, rows, cols, Eps)), xd), tdx.ToFloatArray(), 1e-5, 1e-4, "dx");
        Check.Close(Reference.Gradient(v => Reference.Dot(rd, Reference.LayerNorm(xd, v, bd, rows, cols, Eps)), wd), tdw.ToFloatArray(), 1e-5, 1e-4, "dw");
        Check.Close(Reference.Gradient(v => Reference.Dot(rd, Reference.LayerNorm(xd, wd, v, rows, cols, Eps)), bd), tdb.ToFloatArray(), 1e-5, 1e-4, "db");

        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(v, w, bias, rows, cols, out _, out _)), x, tdx.ToFloatArray(), "dx (backend fd)");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(x, v, bias, rows, cols, out _, out _)), w, tdw.ToFloatArray(), "dw (backend fd)");
    }
}
