namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/adamw.cu and kernels/grad_norm.cu through their ILGPU twins.</summary>
[Collection("cpu")]
public sealed class OptimizerTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void AdamW_ThreeSteps_MatchDoubleReference_WithBiasCorrectionDecayAndBf16Copy()
    {
        const int n = 300;
        var p0 = TestData.Uniform(91, n);
        var s = new AdamWSettings(LearningRate: 1e-2f, Beta1: 0.9f, Beta2: 0.95f, Epsilon: 1e-8f, WeightDecay: 0.1f);
        using var p = _b.FromArray(p0, DType.F32, [n]);
        using var m = _b.Allocate(DType.F32, n);
        using var v = _b.Allocate(DType.F32, n);
        using var copy = _b.Allocate(DType.BF16, n);
        using var g = _b.Allocate(DType.F32, n);

        var pd = TestData.ToDouble(p0);
        var md = new double[n];
        var vd = new double[n];
        const float gradScale = 0.5f;
        for (int step = 1; step <= 3; step++)
        {
            var grad = TestData.Uniform(100 + step, n, 2f);
            g.CopyFrom(grad);
            _b.AdamW(p, g, m, v, copy, s, step, gradScale);
            for (int i = 0; i < n; i++)
            {
                double gi = grad[i] * gradScale;
                md[i] = 0.9 * md[i] + 0.1 * gi;
                vd[i] = 0.95 * vd[i] + 0.05 * gi * gi;
                double mhat = md[i] / (1 - Math.Pow(0.9, step)), vhat = vd[i] / (1 - Math.Pow(0.95, step));
                pd[i] -= 1e-2 * (mhat / (Math.Sqrt(vhat) + 1e-8) + 0.1 * pd[i]);
            }
        }
        // Updates are ~lr = 1e-2; fp32 error relative to them is ~1e-6.
        var got = p.ToFloatArray();
        Check.Close(pd, got, 1e-6, 1e-6, "master");
        Check.Close(md, m.ToFloatArray(), 1e-7, 1e-5, "m");
        Check.Close(vd, v.ToFloatArray(), 1e-8, 1e-5, "v");
        Assert.Equal(got.Select(BFloat16.Round).ToArray(), copy.ToFloatArray());
    }

    [Fact]
    public void GlobalNorm_MatchesDoubleReference_AcrossTensors()
    {
        var a = TestData.Uniform(95, 40_000, 0.1f); // spans several partial-sum chunks
        var c = TestData.Uniform(96, 17, 3f);
        using var ta = _b.FromArray(a, DType.F32, [200, 200]);
        using var tc = _b.FromArray(c, DType.F32, [17]);
        double expected = Math.Sqrt(a.Sum(x => (double)x * x) + c.Sum(x => (double)x * x));
        double got = _b.GlobalNorm([ta, tc]);
        Assert.True(Math.Abs(got - expected) <= 1e-5 * expected, $"norm {got:R}, expected {expected:R}");
    }

    [Fact]
    public void ClipByGlobalNorm_ScalesToMaxNorm_AndLeavesSmallGradientsAlone()
    {
        var a = TestData.Uniform(97, 1000, 1f);
        using var ta = _b.FromArray(a, DType.F32, [1000]);
        double before = _b.ClipByGlobalNorm([ta], maxNorm: 1.0);
        Assert.True(before > 10, "test data should need clipping");
        double after = _b.GlobalNorm([ta]);
        Assert.True(Math.Abs(after - 1.0) < 1e-4, $"norm after clipping {after}");

        var small = TestData.Uniform(98, 10, 0.01f);
        using var ts = _b.FromArray(small, DType.F32, [10]);
        _b.ClipByGlobalNorm([ts], maxNorm: 1.0);
        Assert.Equal(small, ts.ToFloatArray());
    }

    [Fact]
    public void GlobalNorm_IsBitIdenticalAcrossRuns()
    {
        var a = TestData.Uniform(99, 70_001);
        using var ta = _b.FromArray(a, DType.F32, [70_001]);
        Assert.Equal(_b.GlobalNorm([ta]), _b.GlobalNorm([ta]));
    }
}
