namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/rope.cu through its ILGPU twin: Qwen2 rotate-half with explicit (restarting) position ids.</summary>
[Collection("cpu")]
public sealed class RopeTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private float[] Run(float[] x, int[] pos, int heads, int dim, float theta, bool forward, int tablePositions = -1)
    {
        using var tx = _b.FromArray(x, DType.F32, [pos.Length, heads, dim]);
        using var tp = _b.FromArray(pos, [pos.Length]);
        using var ty = _b.Allocate(DType.F32, pos.Length, heads, dim);
        var table = tablePositions >= 0 ? _b.RopeTable(theta, dim, tablePositions) : null;
        if (forward) _b.RopeForward(tx, tp, ty, theta, table); else _b.RopeBackward(tx, tp, ty, theta, table);
        return ty.ToFloatArray();
    }

    [Theory]
    [InlineData(10000f)]
    [InlineData(1000000f)]
    public void RopeTable_GivesTheExactlyRoundedCosineAndSine_OfTheFp32Angle(float theta)
    {
        const int dim = 128, positions = 5000;
        var v = RopeTable.Build(theta, dim, positions);
        for (int p = 0; p < positions; p += 7)
            for (int i = 0; i < dim / 2; i += 5)
            {
                float angle = p * (1f / MathF.Pow(theta, (float)(2 * i) / dim)); // the angle HF forms in fp32
                Assert.Equal((float)Math.Cos(angle), v[(p * (dim / 2) + i) * 2]);
                Assert.Equal((float)Math.Sin(angle), v[(p * (dim / 2) + i) * 2 + 1]);
            }
    }

    [Fact]
    public void RopeForward_WithATable_MatchesDoubleReference_AndFallsBackPastIt()
    {
        // The table holds positions 0..9: 37 and 4000 are computed per pair; the rest are read.
        int[] pos = [0, 1, 2, 3, 9, 0, 37, 4000, 8];
        const int heads = 3, dim = 16;
        var x = TestData.Uniform(25, pos.Length * heads * dim);
        var y = Run(x, pos, heads, dim, 1e4f, forward: true, tablePositions: 10);
        // Angles up to 4000 rad: the fp32 angle carries ~4000 * 6e-8 of error against the double reference.
        Check.Close(Reference.Rope(TestData.ToDouble(x), pos, heads, dim, 1e4), y, 5e-4, 1e-5, "y");
        var without = Run(x, pos, heads, dim, 1e4f, forward: true);
        int row = heads * dim;
        // Positions past the table: the same expressions as without a table, bit for bit.
        Assert.Equal(without[(6 * row)..(8 * row)], y[(6 * row)..(8 * row)]);
        // Positions in it: the exactly rounded table differs from MathF's sine and cosine by at most an ulp or two.
        Check.Close(TestData.ToDouble(without), y, 1e-6, 1e-6, "table vs computed");
        var dx = Run(y, pos, heads, dim, 1e4f, forward: false, tablePositions: 10);
        Check.Close(TestData.ToDouble(x), dx, 1e-5, 1e-5, "backward undoes forward");
    }

    [Fact]
    public void RopeForward_RejectsATableOfAnotherThetaOrHeadDim()
    {
        using var x = _b.FromArray(new float[2 * 2 * 8], DType.F32, [2, 2, 8]);
        using var p = _b.FromArray(new[] { 0, 1 }, [2]);
        var e = Assert.Throws<ArgumentException>(() => _b.RopeForward(x, p, x, 1e4f, _b.RopeTable(1e6f, 8, 4)));
        Assert.Contains("theta 1000000 and head dim 8, the call has theta 10000", e.Message);
        e = Assert.Throws<ArgumentException>(() => _b.RopeForward(x, p, x, 1e4f, _b.RopeTable(1e4f, 16, 4)));
        Assert.Contains("head dim 16", e.Message);
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
