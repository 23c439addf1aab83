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
    public void AdamW_ManyTensorsAtOnce_GiveTheOneTensorCallsBits()
    {
        int[] sizes = [300, 7, 4096];
        var s = new AdamWSettings(1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f);
        List<float[]> Run(bool many)
        {
            var ts = sizes.Select((n, i) => (P: _b.FromArray(TestData.Uniform(80 + i, n), DType.F32, [n]), G: _b.FromArray(TestData.Uniform(90 + i, n), DType.F32, [n]),
                M: _b.Allocate(DType.F32, n), V: _b.Allocate(DType.F32, n), C: i == 1 ? null : _b.Allocate(DType.BF16, n))).ToList();
            foreach (var t in ts) { _b.Zero(t.M); _b.Zero(t.V); }
            for (int step = 1; step <= 2; step++)
                if (many) _b.AdamW([.. ts.Select(t => new AdamWTensors(t.P, t.G, t.M, t.V, t.C))], s, step, 0.5f);
                else foreach (var t in ts) _b.AdamW(t.P, t.G, t.M, t.V, t.C, s, step, 0.5f);
            var outs = ts.SelectMany(t => new[] { t.P.ToFloatArray(), t.M.ToFloatArray(), t.V.ToFloatArray(), t.C?.ToFloatArray() ?? [] }).ToList();
            foreach (var t in ts) { t.P.Dispose(); t.G.Dispose(); t.M.Dispose(); t.V.Dispose(); t.C?.Dispose(); }
            return outs;
        }
        var one = Run(false);
        var many = Run(true);
        for (int i = 0; i < one.Count; i++) Assert.True(one[i].SequenceEqual(many[i]), $"output {i}");
        // Each tensor is checked as in the one-tensor call.
        using var p = _b.Allocate(DType.F32, 4);
        using var g = _b.Allocate(DType.F32, 5);
        var e = Assert.Throws<ArgumentException>(() => _b.AdamW([new AdamWTensors(p, g, p, p, null)], s, 1));
        Assert.Contains("grad", e.Message);
    }

    [Fact]
    public void AdamWMultiTable_LaysOutTheKernelsStruct_AndCutsChunks()
    {
        var (table, chunks) = R1V2.Native.Engine.Backends.Cuda.CudaBackend.AdamWTable(
            [(0x1000, 0, 0x2000, 0x3000, 0x4000, 16384 * 2 + 4), (0x5008, 0x6000, 0x7000, 0x8000, 0x9000, 8), (0xA000, 0xB004, 0xC000, 0xD000, 0xE000, 12)]);
        Assert.Equal(3 * 16, table.Length);
        long At(int tensor, int field) => (long)(uint)table[tensor * 16 + 2 * field] | ((long)table[tensor * 16 + 2 * field + 1] << 32);
        Assert.Equal([0x1000L, 0, 0x2000, 0x3000, 0x4000, 16384 * 2 + 4, 0, 1], Enumerable.Range(0, 8).Select(f => At(0, f)));
        Assert.Equal(3, At(1, 6));             // the first tensor spans three chunks
        Assert.Equal(0, At(1, 7));             // a master at 0x5008 is not 16-byte aligned: one element a thread
        Assert.Equal(4, At(2, 6));
        Assert.Equal(0, At(2, 7));             // a working copy at an odd 4-byte address: no 8-byte packed stores
        Assert.Equal(5, chunks);
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
