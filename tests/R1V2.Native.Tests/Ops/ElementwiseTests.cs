namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/elementwise.cu through its ILGPU twin: residual add, scale, accumulate, dtype conversion.</summary>
[Collection("cpu")]
public sealed class ElementwiseTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void Axpby_AddScaleAndAccumulate_MatchDoubleReference()
    {
        const int n = 1031;
        var a = TestData.Uniform(61, n);
        var c = TestData.Uniform(62, n);
        using var ta = _b.FromArray(a, DType.F32, [n]);
        using var tc = _b.FromArray(c, DType.F32, [n]);
        using var y = _b.Allocate(DType.F32, n);

        _b.Add(y, ta, tc);
        Check.Close(a.Select((v, i) => (double)v + c[i]).ToArray(), y.ToFloatArray(), 0, 1e-7, "a + b");
        _b.Scale(y, ta, -2.5f);
        Check.Close(a.Select(v => -2.5 * v).ToArray(), y.ToFloatArray(), 0, 1e-7, "-2.5 a");
        _b.Axpby(ta, ta, tc, 1f, 0.5f); // gradient accumulation in place: a += 0.5 b
        Check.Close(a.Select((v, i) => v + 0.5 * c[i]).ToArray(), ta.ToFloatArray(), 1e-7, 1e-7, "a += 0.5 b");
    }

    [Fact]
    public void Convert_Fp32ToBf16_RoundsToNearestEven_AndBack()
    {
        // 1 + 2^-8 is halfway between two bf16 values and rounds to even (1.0); 1 + 3 * 2^-8 rounds up.
        float[] x = [1f + 1f / 256, 1f + 3f / 256, -3.14159f, 65504f, 1e-3f];
        using var src = _b.FromArray(x, DType.F32, [x.Length]);
        using var half = _b.Allocate(DType.BF16, x.Length);
        using var back = _b.Allocate(DType.F32, x.Length);
        _b.Convert(src, half);
        _b.Convert(half, back);
        var got = back.ToFloatArray();
        Assert.Equal(1f, got[0]);
        Assert.Equal(1f + 4f / 256, got[1]);
        for (int i = 0; i < x.Length; i++)
        {
            Assert.Equal(BFloat16.Round(x[i]), got[i]);
            Assert.True(Math.Abs(got[i] - x[i]) <= Math.Abs(x[i]) / 256, $"bf16({x[i]}) = {got[i]} is more than half an ulp away");
        }
    }
}
