namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/rows.cu through its ILGPU twin: scatter rows, LayerScale forward and backward.</summary>
[Collection("cpu")]
public sealed class RowsTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void ScatterRows_SetsTheIndexedRows_AndGatherRowsReadsThemBack()
    {
        var src = TestData.Uniform(1, 3 * 5);
        using var s = _b.FromArray(src, DType.F32, [3, 5]);
        using var dst = _b.FromArray(Enumerable.Repeat(9f, 6 * 5).ToArray(), DType.F32, [6, 5]);
        using var idx = _b.Rows([4, 0, 2], 6, distinct: true);
        _b.ScatterRows(s, idx, dst);
        var got = dst.ToFloatArray();
        int[] target = [4, 0, 2];
        for (int r = 0; r < 6; r++)
            for (int c = 0; c < 5; c++)
            {
                int from = Array.IndexOf(target, r);
                Assert.Equal(from >= 0 ? src[from * 5 + c] : 9f, got[r * 5 + c]);
            }
        using var back = _b.Allocate(DType.F32, 3, 5);
        _b.GatherRows(dst, idx, back);
        Assert.Equal(src, back.ToFloatArray());
    }

    [Fact]
    public void RowIndex_RejectsRepeatsForScatter_AndOutOfRangeRows()
    {
        Assert.Contains("repeats", Assert.Throws<ArgumentException>(() => _b.Rows([1, 1], 4, distinct: true)).Message);
        Assert.Contains("outside [0, 4)", Assert.Throws<ArgumentException>(() => _b.Rows([4], 4, distinct: false)).Message);
    }

    [Fact]
    public void ScaleColumns_ForwardAndBackward_MatchReferenceAndFiniteDifferences()
    {
        const int rows = 5, cols = 7;
        var x = TestData.Uniform(2, rows * cols);
        var s = TestData.Uniform(3, cols);
        var r = TestData.Uniform(4, rows * cols);
        float[] Forward(float[] xx, float[] ss)
        {
            using var tx = _b.FromArray(xx, DType.F32, [rows, cols]);
            using var ts = _b.FromArray(ss, DType.F32, [cols]);
            using var y = _b.Allocate(DType.F32, rows, cols);
            _b.ScaleColumns(tx, ts, y);
            return y.ToFloatArray();
        }
        Check.Close(x.Select((v, i) => (double)v * s[i % cols]).ToArray(), Forward(x, s), 1e-7, 1e-6, "y");

        using var tx = _b.FromArray(x, DType.F32, [rows, cols]);
        using var tdy = _b.FromArray(r, DType.F32, [rows, cols]);
        using var ds = _b.FromArray(Enumerable.Repeat(1f, cols).ToArray(), DType.F32, [cols]);
        _b.ScaleColumnsBackward(tdy, tx, ds, accumulate: true);
        var expected = Enumerable.Range(0, cols).Select(c => 1 + Enumerable.Range(0, rows).Sum(t => (double)r[t * cols + c] * x[t * cols + c])).ToArray();
        Check.Close(expected, ds.ToFloatArray(), 1e-6, 1e-6, "ds");
        var grad = ds.ToFloatArray().Select(g => g - 1f).ToArray();
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Forward(x, v)), s, grad, "ds (backend fd)");
    }
}
