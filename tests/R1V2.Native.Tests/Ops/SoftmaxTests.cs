namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/softmax.cu through its ILGPU twin.</summary>
[Collection("cpu")]
public sealed class SoftmaxTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private float[] Forward(float[] x, int rows, int cols, float scale)
    {
        using var tx = _b.FromArray(x, DType.F32, [rows, cols]);
        using var ty = _b.Allocate(DType.F32, rows, cols);
        _b.SoftmaxForward(tx, ty, scale);
        return ty.ToFloatArray();
    }

    [Theory]
    [InlineData(1, 1, 1f)]
    [InlineData(3, 257, 0.125f)]
    [InlineData(2, 50, 1f)]
    public void SoftmaxForward_MatchesDoubleReference(int rows, int cols, float scale)
    {
        var x = TestData.Uniform(41, rows * cols, 8f);
        Check.Close(Reference.Softmax(TestData.ToDouble(x), rows, cols, scale), Forward(x, rows, cols, scale), 1e-7, 1e-5, "y");
    }

    [Fact]
    public void SoftmaxForward_LargeLogits_DoNotOverflow()
    {
        var x = new[] { 1000f, 999f, -1000f, 80f, 90f, 100f };
        var y = Forward(x, 2, 3, 1f);
        Check.Close(Reference.Softmax(TestData.ToDouble(x), 2, 3, 1), y, 1e-7, 1e-5, "y");
    }

    [Fact]
    public void SoftmaxBackward_MatchesDoubleReferenceAndFiniteDifferences()
    {
        const int rows = 3, cols = 17;
        const float scale = 0.5f;
        var x = TestData.Uniform(42, rows * cols, 3f);
        var r = TestData.Uniform(43, rows * cols);
        var y = Forward(x, rows, cols, scale);
        using var ty = _b.FromArray(y, DType.F32, [rows, cols]);
        using var tdy = _b.FromArray(r, DType.F32, [rows, cols]);
        using var tdx = _b.Allocate(DType.F32, rows, cols);
        _b.SoftmaxBackward(tdy, ty, tdx, scale);
        var rd = TestData.ToDouble(r);
        Check.Close(Reference.Gradient(v => Reference.Dot(rd, Reference.Softmax(v, rows, cols, scale)), TestData.ToDouble(x)), tdx.ToFloatArray(), 1e-6, 1e-4, "dx");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(v, rows, cols, scale)), x, tdx.ToFloatArray(), "dx (backend fd)");
    }
}
