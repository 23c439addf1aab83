namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/rope.cu through its ILGPU twin: Qwen2 rotate-half with explicit (restarting) position ids.</summary>
[Collection("cpu")]
public sealed class RopeTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private float[] Run(float[] x, int[] pos, int heads, int dim, float theta, bool forward)
    {
        using var tx = _b.FromArray(x, DType.F32, [pos.Length, heads, dim]);
        using var tp = _b.FromArray(pos, [pos.Length]);
        using var ty = _b.Allocate(DType.F32, pos.Length, heads, dim);
        if (forward) _b.RopeForward(tx, tp, ty, theta); else _b.RopeBackward(tx, tp, ty, theta);
        return ty.ToFloatArray();
    }

    [Theory]
    [InlineData(10000f)]
    [InlineData(1000000f)]
    public void RopeForward_MatchesDoubleReference_PackedPositions(float theta)
    {
        // Two packed sequences: positions restart at the boundary.
        int[] pos = [0, 1, 2, 3, 4, 0, 1, 2, 37];
        const int heads = 3, dim = 16;
        var x = TestData.Uniform(21, pos.Length * heads * dim);
        var y = Run(x, pos, heads, dim, theta, forward: true);
        // Angles up to 37 rad in fp32: sin/cos argument error ~37 * 6e-8; 1e-5 absolute is ample and catches a swapped half.
        Check.Close(Reference.Rope(TestData.ToDouble(x), pos, heads, dim, theta), y, 1e-5, 1e-5, "y");
    }

    [Fact]
    public void RopeBackward_IsTheTransposeOfForward()
    {
        int[] pos = [3, 0, 5, 1];
        const int heads = 2, dim = 8;
        var r = TestData.Uniform(22, pos.Length * heads * dim);
        var x = TestData.Uniform(23, r.Length);
        var dx = Run(r, pos, heads, dim, 10000f, forward: false);
        var gx = Reference.Gradient(v => Reference.Dot(TestData.ToDouble(r), Reference.Rope(v, pos, heads, dim, 10000)), TestData.ToDouble(x));
        Check.Close(gx, dx, 1e-5, 1e-5, "dx");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Run(v, pos, heads, dim, 10000f, true)), x, dx, "dx (backend fd)");
    }

    [Fact]
    public void RopeForward_InPlace_EqualsOutOfPlace()
    {
        int[] pos = [0, 9, 2];
        var x = TestData.Uniform(24, 3 * 4 * 10);
        var expected = Run(x, pos, 4, 10, 10000f, true);
        using var t = _b.FromArray(x, DType.F32, [3, 4, 10]);
        using var p = _b.FromArray(pos, [3]);
        _b.RopeForward(t, p, t, 10000f);
        Assert.Equal(expected, t.ToFloatArray());
    }
}
