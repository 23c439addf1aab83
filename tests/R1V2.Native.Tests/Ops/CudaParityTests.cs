using R1V2.Native.Engine.Backends.Cuda;

namespace R1V2.Native.Tests.Ops;

/// <summary>
/// Every op on the CUDA backend against the CPU backend on the same inputs: fp32 storage (tight: the two differ only
/// in summation order and libm) and bf16 storage (inputs rounded to bf16 on both sides; outputs carry bf16 rounding,
/// 2^-8 relative, through at most two stored intermediates). Skipped with the reason where no GPU is present.
/// </summary>
[Collection("cpu")]
public sealed class CudaParityTests(CpuFixture fx)
{
    private delegate float[][] OpRun(Backend b, DType dtype, Func<float[], float[]> prepare);

    private static readonly Dictionary<string, OpRun> Cases = new()
    {
        ["gemm_nt_bias"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(1, 37 * 64)), dt, [37, 64]);
            using var w = b.FromArray(prep(TestData.Uniform(2, 48 * 64)), dt, [48, 64]);
            using var bias = b.FromArray(prep(TestData.Uniform(3, 48)), dt, [48]);
            using var y = b.Allocate(dt, 37, 48);
            b.Gemm(x, false, w, true, y, bias);
            using var dw = b.Allocate(DType.F32, 48, 64);
            b.Gemm(y, true, x, false, dw); // weight-gradient shape: bf16 inputs, fp32 output
            return [y.ToFloatArray(), dw.ToFloatArray()];
        },
        ["gemm_batched_tn"] = (b, dt, prep) =>
        {
            using var a = b.FromArray(prep(TestData.Uniform(4, 3 * 20 * 9)), dt, [3, 20, 9]);
            using var c = b.FromArray(prep(TestData.Uniform(5, 3 * 20 * 11)), dt, [3, 20, 11]);
            using var bias = b.FromArray(prep(TestData.Uniform(6, 11)), dt, [11]);
            using var y = b.Allocate(dt, 3, 9, 11);
            b.Gemm(a, true, c, false, y, bias, alpha: 0.5f);
            return [y.ToFloatArray()];
        },
        ["bias_backward"] = (b, dt, prep) =>
        {
            using var dy = b.FromArray(prep(TestData.Uniform(7, 300 * 70)), dt, [300, 70]);
            using var db = b.Allocate(DType.F32, 70);
            b.BiasBackward(dy, db, false);
            return [db.ToFloatArray()];
        },
        ["elementwise_axpby"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(8, 5000)), dt, [5000]);
            using var z = b.FromArray(prep(TestData.Uniform(9, 5000)), dt, [5000]);
            using var y = b.Allocate(dt, 5000);
            b.Axpby(y, x, z, 0.25f, -2f);
            return [y.ToFloatArray()];
        },
        ["rmsnorm"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(10, 7 * 900, 3)), dt, [7, 900]);
            using var w = b.FromArray(prep(TestData.Uniform(11, 900)), dt, [900]);
            using var dy = b.FromArray(prep(TestData.Uniform(12, 7 * 900)), dt, [7, 900]);
            using var y = b.Allocate(dt, 7, 900);
            using var r = b.Allocate(DType.F32, 7);
            using var dx = b.Allocate(dt, 7, 900);
            using var dw = b.Allocate(DType.F32, 900);
            b.RmsNormForward(x, w, y, r, 1e-6f);
            b.RmsNormBackward(dy, x, w, r, dx, dw, false);
            return [y.ToFloatArray(), r.ToFloatArray(), dx.ToFloatArray(), dw.ToFloatArray()];
        },
        ["layernorm"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(13, 5 * 333, 3)), dt, [5, 333]);
            using var w = b.FromArray(prep(TestData.Uniform(14, 333)), dt, [333]);
            using var bias = b.FromArray(prep(TestData.Uniform(15, 333)), dt, [333]);
            using var dy = b.FromArray(prep(TestData.Uniform(16, 5 * 333)), dt, [5, 333]);
            using var y = b.Allocate(dt, 5, 333);
            using var m = b.Allocate(DType.F32, 5);
            using var r = b.Allocate(DType.F32, 5);
            using var dx = b.Allocate(dt, 5, 333);
            using var dw = b.Allocate(DType.F32, 333);
            using var db = b.Allocate(DType.F32, 333);
            b.LayerNormForward(x, w, bias, y, m, r, 1e-5f);
            b.LayerNormBackward(dy, x, w, m, r, dx, dw, db, false);
            return [y.ToFloatArray(), dx.ToFloatArray(), dw.ToFloatArray(), db.ToFloatArray()];
        },
        ["rope"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(17, 9 * 4 * 64)), dt, [9, 4, 64]);
            using var pos = b.FromArray([0, 1, 2, 3, 0, 1, 2, 100, 4000], [9]);
            using var y = b.Allocate(dt, 9, 4, 64);
            using var dx = b.Allocate(dt, 9, 4, 64);
            b.RopeForward(x, pos, y, 1e6f);
            b.RopeBackward(x, pos, dx, 1e6f);
            return [y.ToFloatArray(), dx.ToFloatArray()];
        },
        ["swiglu"] = (b, dt, prep) =>
        {
            using var g = b.FromArray(prep(TestData.Uniform(18, 3000, 6)), dt, [3000]);
            using var u = b.FromArray(prep(TestData.Uniform(19, 3000)), dt, [3000]);
            using var dy = b.FromArray(prep(TestData.Uniform(20, 3000)), dt, [3000]);
            using var y = b.Allocate(dt, 3000);
            using var dg = b.Allocate(dt, 3000);
            using var du = b.Allocate(dt, 3000);
            b.SwiGluForward(g, u, y);
            b.SwiGluBackward(dy, g, u, dg, du);
            return [y.ToFloatArray(), dg.ToFloatArray(), du.ToFloatArray()];
        },
        ["gelu"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(21, 3000, 5)), dt, [3000]);
            using var dy = b.FromArray(prep(TestData.Uniform(22, 3000)), dt, [3000]);
            var outs = new List<float[]>();
            foreach (var a in new[] { GeluApproximation.Erf, GeluApproximation.Tanh })
            {
                using var y = b.Allocate(dt, 3000);
                using var dx = b.Allocate(dt, 3000);
                b.GeluForward(x, y, a);
                b.GeluBackward(dy, x, dx, a);
                outs.Add(y.ToFloatArray());
                outs.Add(dx.ToFloatArray());
            }
            return [.. outs];
        },
        ["softmax"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(23, 6 * 1000, 10)), dt, [6, 1000]);
            using var dy = b.FromArray(prep(TestData.Uniform(24, 6 * 1000)), dt, [6, 1000]);
            using var y = b.Allocate(dt, 6, 1000);
            using var dx = b.Allocate(dt, 6, 1000);
            b.SoftmaxForward(x, y, 0.125f);
            b.SoftmaxBackward(dy, y, dx, 0.125f);
            return [y.ToFloatArray(), dx.ToFloatArray()];
        },
        ["embedding"] = (b, dt, prep) =>
        {
            using var table = b.FromArray(prep(TestData.Uniform(25, 50 * 33)), dt, [50, 33]);
            using var ids = b.FromArray(TestData.Ints(26, 40, 50), [40]);
            using var o = b.Allocate(dt, 40, 33);
            using var dout = b.FromArray(prep(TestData.Uniform(27, 40 * 33)), dt, [40, 33]);
            using var dtable = b.Allocate(DType.F32, 50, 33);
            b.EmbeddingForward(table, ids, o);
            b.EmbeddingBackward(dout, ids, dtable);
            return [o.ToFloatArray(), dtable.ToFloatArray()];
        },
        ["cross_entropy"] = (b, dt, prep) =>
        {
            using var logits = b.FromArray(prep(TestData.Uniform(28, 6 * 5000, 8)), dt, [6, 5000]);
            var t = TestData.Ints(29, 6, 5000);
            t[2] = Backend.IgnoreIndex;
            using var targets = b.FromArray(t, [6]);
            using var lp = b.Allocate(DType.F32, 6);
            using var lse = b.Allocate(DType.F32, 6);
            using var dlp = b.FromArray(TestData.Uniform(30, 6), DType.F32, [6]);
            b.CrossEntropyForward(logits, targets, lp, lse);
            b.CrossEntropyBackward(logits, targets, lse, dlp, logits);
            return [lp.ToFloatArray(), lse.ToFloatArray(), logits.ToFloatArray()];
        },
        ["adamw"] = (b, dt, prep) =>
        {
            using var p = b.FromArray(TestData.Uniform(31, 4000), DType.F32, [4000]);
            using var g = b.FromArray(TestData.Uniform(32, 4000), DType.F32, [4000]);
            using var m = b.Allocate(DType.F32, 4000);
            using var v = b.Allocate(DType.F32, 4000);
            using var copy = b.Allocate(DType.BF16, 4000);
            for (int step = 1; step <= 3; step++) b.AdamW(p, g, m, v, copy, new AdamWSettings(1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f), step, 0.7f);
            return [p.ToFloatArray(), m.ToFloatArray(), v.ToFloatArray()];
        },
        ["adamw_multi"] = (b, dt, prep) =>
        {
            // Sizes across the 16384-element chunks, odd ones on the one-element path, with and without a working copy.
            int[] sizes = [4000, 3, 16384 * 2 + 8, 17, 40000];
            var ts = sizes.Select((n, i) => (P: b.FromArray(TestData.Uniform(60 + i, n), DType.F32, [n]), G: b.FromArray(TestData.Uniform(70 + i, n), DType.F32, [n]),
                M: b.Allocate(DType.F32, n), V: b.Allocate(DType.F32, n), C: i % 2 == 0 ? b.Allocate(DType.BF16, n) : null)).ToList();
            foreach (var t in ts) { b.Zero(t.M); b.Zero(t.V); }
            var items = ts.Select(t => new AdamWTensors(t.P, t.G, t.M, t.V, t.C)).ToList();
            for (int step = 1; step <= 3; step++) b.AdamW(items, new AdamWSettings(1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f), step, 0.7f);
            var outs = ts.SelectMany(t => new[] { t.P.ToFloatArray(), t.M.ToFloatArray(), t.V.ToFloatArray() }).ToArray();
            foreach (var t in ts) { t.P.Dispose(); t.G.Dispose(); t.M.Dispose(); t.V.Dispose(); t.C?.Dispose(); }
            return outs;
        },
        ["attention"] = (b, dt, prep) =>
        {
            int[] cu = [0, 37, 40, 105];
            using var seq = b.Sequences(cu);
            var outs = new List<float[]>();
            foreach (var (heads, kv, d) in new[] { (8, 2, 64), (4, 4, 128), (2, 1, 80) })
                foreach (var causal in new[] { true, false })
                {
                    using var q = b.FromArray(prep(TestData.Uniform(40 + d, 105 * heads * d, 2)), dt, [105, heads, d]);
                    using var k = b.FromArray(prep(TestData.Uniform(41 + d, 105 * kv * d, 2)), dt, [105, kv, d]);
                    using var v = b.FromArray(prep(TestData.Uniform(42 + d, 105 * kv * d)), dt, [105, kv, d]);
                    using var dout = b.FromArray(prep(TestData.Uniform(43 + d, 105 * heads * d)), dt, [105, heads, d]);
                    using var o = b.Allocate(dt, 105, heads, d);
                    using var lse = b.Allocate(DType.F32, 105, heads);
                    using var dq = b.Allocate(dt, 105, heads, d);
                    using var dk = b.Allocate(dt, 105, kv, d);
                    using var dv = b.Allocate(dt, 105, kv, d);
                    float scale = 1f / MathF.Sqrt(d);
                    b.AttentionForward(q, k, v, seq, o, lse, scale, causal);
                    b.AttentionBackward(dout, q, k, v, o, lse, seq, dq, dk, dv, scale, causal);
                    outs.AddRange([o.ToFloatArray(), lse.ToFloatArray(), dq.ToFloatArray(), dk.ToFloatArray(), dv.ToFloatArray()]);
                }
            return [.. outs];
        },
        ["rows"] = (b, dt, prep) =>
        {
            using var x = b.FromArray(prep(TestData.Uniform(50, 300 * 40)), dt, [300, 40]);
            using var s = b.FromArray(prep(TestData.Uniform(51, 40)), dt, [40]);
            using var y = b.Allocate(dt, 300, 40);
            using var ds = b.Allocate(DType.F32, 40);
            b.ScaleColumns(x, s, y);
            b.ScaleColumnsBackward(y, x, ds, false);
            using var idx = b.Rows(Enumerable.Range(0, 300).Select(i => (i * 7) % 300).ToArray(), 300, distinct: true);
            using var z = b.Allocate(dt, 300, 40);
            b.ScatterRows(y, idx, z);
            return [y.ToFloatArray(), ds.ToFloatArray(), z.ToFloatArray()];
        },
        ["paged_attention"] = (b, dt, prep) =>
        {
            const int blockSize = 16, numBlocks = 40;
            using var kc = b.FromArray(prep(TestData.Uniform(60, numBlocks * blockSize * 2 * 64, 2)), dt, [numBlocks * blockSize, 2, 64]);
            using var vc = b.FromArray(prep(TestData.Uniform(61, numBlocks * blockSize * 2 * 64)), dt, [numBlocks * blockSize, 2, 64]);
            using var batch = b.Paged([[3, 7, 1, 30], [3, 7, 12], [39]], [60, 37, 5], blockSize, numBlocks);
            using var q = b.FromArray(prep(TestData.Uniform(62, 3 * 8 * 64, 2)), dt, [3, 8, 64]);
            using var o = b.Allocate(dt, 3, 8, 64);
            b.PagedAttentionDecode(q, kc, vc, batch, o, 0.125f, splitBlocks: 1);
            using var k = b.FromArray(prep(TestData.Uniform(63, 2 * 2 * 64)), dt, [2, 2, 64]);
            using var slots = b.Rows([100, 5], numBlocks * blockSize, distinct: true);
            b.KvAppend(k, k, slots, kc, vc);
            return [o.ToFloatArray(), kc.ToFloatArray()];
        },
        ["sampling"] = (b, dt, prep) =>
        {
            var logits = prep(TestData.Uniform(64, 6 * 1000, 4));
            using var t = b.FromArray(logits, dt, [6, 1000]);
            SampleRow[] rows =
            [
                new(SamplingParams.Greedy, 0, 0, []), new(new SamplingParams(0.7f, 50, 0.9f), 1, 3, []), new(new SamplingParams(1f, 0, 1f, 0.1f), 2, 9, []),
                new(new SamplingParams(0.9f, 0, 0.95f, 0f, 1.3f), 3, 1, [5, 9, 5, 700]), new(new SamplingParams(1f, 1), 4, 2, []), new(new SamplingParams(2f), 5, 7, []),
            ];
            var (tokens, logp) = b.Sample(t, rows);
            // Greedy and top-1 are exact; the others are draws from identical distributions with the same uniform, so
            // they agree unless the draw falls within float rounding of a bucket edge (compared as log-probs too).
            return [tokens.Take(1).Concat(tokens.Skip(4).Take(1)).Select(x => (float)x).ToArray(), logp.Take(1).ToArray()];
        },
        ["grpo_loss"] = (b, dt, prep) =>
        {
            using var hidden = b.FromArray(prep(TestData.Uniform(70, 40 * 64, 1.5f)), dt, [40, 64]);
            using var head = R1V2.Native.Engine.Layers.Parameter.Create(b, "lm_head", [3000, 64], prep(TestData.Uniform(71, 3000 * 64, 0.3f)));
            var rng = new Random(72);
            var tokens = new R1V2.Native.Trainer.Grpo.GrpoTokens(
                Enumerable.Range(0, 40).Select(i => i % 9 == 0 ? Backend.IgnoreIndex : rng.Next(3000)).ToArray(),
                Enumerable.Range(0, 40).Select(_ => -8f + (float)rng.NextDouble()).ToArray(),
                Enumerable.Range(0, 40).Select(i => (i % 3 - 1) * 0.7f).ToArray(),
                Enumerable.Repeat(1f / 40, 40).ToArray(),
                Enumerable.Range(0, 40).Select(_ => -8f + (float)rng.NextDouble()).ToArray());
            var settings = new GrpoLossSettings(0.2f, 0.28f, 3f, 0.05f, KlEstimator.K3, 0.8f);
            using var r = R1V2.Native.Trainer.Grpo.FusedGrpoLoss.Fused(b, hidden, head, tokens, settings, 1024);
            return [[(float)r.Loss], r.LogProbs, r.HiddenGrad.ToFloatArray(), head.Grad!.ToFloatArray()];
        },
        ["grad_norm"] = (b, dt, prep) =>
        {
            using var a = b.FromArray(prep(TestData.Uniform(33, 100_000)), dt, [100_000]);
            using var c = b.FromArray(prep(TestData.Uniform(34, 77)), dt, [77]);
            return [[(float)b.GlobalNorm([a, c])]];
        },
    };

    public static TheoryData<string> Names => new(Cases.Keys);

    /// <summary>The CPU side of a parity check runs the ILGPU twins (also for attention, whose default CPU path is host SIMD).</summary>
    private float[][] OnTwins(Func<float[][]> run)
    {
        bool before = fx.Backend.AttentionTwins;
        fx.Backend.AttentionTwins = true;
        try { return run(); }
        finally { fx.Backend.AttentionTwins = before; }
    }

    /// <summary>The parity cases themselves run on the CPU (so a GPU machine finds a working harness), with finite outputs.</summary>
    [Theory]
    [MemberData(nameof(Names))]
    public void ParityCase_RunsOnCpu_WithFiniteOutputs(string op)
    {
        var outputs = Cases[op](fx.Backend, DType.F32, x => x);
        Assert.NotEmpty(outputs);
        Assert.All(outputs, o => Assert.All(o, v => Assert.True(float.IsFinite(v), $"{op}: non-finite output")));
    }

    [SkippableTheory]
    [MemberData(nameof(Names))]
    public void CudaMatchesCpu_Fp32(string op)
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        using var cuda = new CudaBackend(activationType: DType.F32);
        var expected = OnTwins(() => Cases[op](fx.Backend, DType.F32, x => x));
        var actual = Cases[op](cuda, DType.F32, x => x);
        for (int i = 0; i < expected.Length; i++)
            Check.Close(expected[i], actual[i], 1e-5, 2e-4, $"{op} output {i} (fp32)");
    }

    [SkippableTheory]
    [MemberData(nameof(Names))]
    public void CudaMatchesCpu_Bf16(string op)
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        using var cuda = new CudaBackend(activationType: DType.BF16);
        static float[] Round(float[] x) => x.Select(BFloat16.Round).ToArray();
        var expected = OnTwins(() => Cases[op](fx.Backend, DType.F32, Round));
        var actual = Cases[op](cuda, DType.BF16, Round);
        for (int i = 0; i < expected.Length; i++)
        {
            double scale = expected[i].Max(v => Math.Abs((double)v));
            Check.Close(expected[i], actual[i], 2e-2 * scale, 3e-2, $"{op} output {i} (bf16)");
        }
    }

    /// <summary>
    /// The tensor-core attention against its CPU twin on the same bf16 inputs: both round P to bf16 before P V and
    /// sum in fp32, so they differ by summation order and the bf16 output rounding (2^-9 relative).
    /// </summary>
    [SkippableTheory]
    [InlineData(64, true, AttentionVariant.Tiled)]
    [InlineData(80, false, AttentionVariant.Tiled)]
    [InlineData(96, true, AttentionVariant.Tiled)]
    [InlineData(128, true, AttentionVariant.Tiled)]
    [InlineData(128, false, AttentionVariant.Tiled)]
    [InlineData(64, true, AttentionVariant.Flash)]
    [InlineData(80, false, AttentionVariant.Flash)]
    [InlineData(96, true, AttentionVariant.Flash)]
    [InlineData(128, true, AttentionVariant.Flash)]
    [InlineData(128, false, AttentionVariant.Flash)]
    public void CudaTensorCoreAttention_ForwardAndBackward_MatchTheirCpuTwins(int dim, bool causal, AttentionVariant variant)
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        int[] cu = [0, 200, 201, 330];
        const int heads = 8, kv = 2;
        int t = cu[^1];
        var q = TestData.Uniform(1, t * heads * dim, 2f).Select(BFloat16.Round).ToArray();
        var k = TestData.Uniform(2, t * kv * dim, 2f).Select(BFloat16.Round).ToArray();
        var v = TestData.Uniform(3, t * kv * dim).Select(BFloat16.Round).ToArray();
        var dout = TestData.Uniform(9, t * heads * dim).Select(BFloat16.Round).ToArray();
        float[][] Run(Backend b, DType dt)
        {
            using var seq = b.Sequences(cu);
            using var tq = b.FromArray(q, dt, [t, heads, dim]);
            using var tk = b.FromArray(k, dt, [t, kv, dim]);
            using var tv = b.FromArray(v, dt, [t, kv, dim]);
            using var o = b.Allocate(dt, t, heads, dim);
            using var lse = b.Allocate(DType.F32, t, heads);
            using var tdo = b.FromArray(dout, dt, [t, heads, dim]);
            using var dq = b.Allocate(dt, t, heads, dim);
            using var dk = b.Allocate(dt, t, kv, dim);
            using var dv = b.Allocate(dt, t, kv, dim);
            b.Attention = variant;
            b.AttentionSplits = 3; // the flash backward adds dq in the same three groups on both sides
            b.AttentionForward(tq, tk, tv, seq, o, lse, 1f / MathF.Sqrt(dim), causal);
            b.AttentionBackward(tdo, tq, tk, tv, o, lse, seq, dq, dk, dv, 1f / MathF.Sqrt(dim), causal);
            return [o.ToFloatArray(), lse.ToFloatArray(), dq.ToFloatArray(), dk.ToFloatArray(), dv.ToFloatArray()];
        }
        using var cuda = new CudaBackend(activationType: DType.BF16);
        var before = fx.Backend.Attention;
        float[][] expected;
        try { expected = Run(fx.Backend, DType.F32); } finally { fx.Backend.Attention = before; fx.Backend.AttentionSplits = null; }
        var actual = Run(cuda, DType.BF16);
        Check.Close(expected[0], actual[0], 4e-3, 8e-3, $"o (d = {dim}, causal = {causal})");
        Check.Close(expected[1], actual[1], 1e-4, 1e-4, $"lse (d = {dim}, causal = {causal})");
        // Gradients: the same bf16 roundings of P and dS on both sides; bf16 storage of o, dq, dk, dv adds 2^-9.
        for (int i = 2; i < 5; i++)
        {
            double rel = Check.RelativeL2(TestData.ToDouble(expected[i]), actual[i]);
            Assert.True(rel <= 1e-2, $"gradient {i - 2} (d = {dim}, causal = {causal}): relative L2 error {rel:E2}");
        }
    }

    /// <summary>cuBLASLt's algorithm is asked once per problem and pinned: the same GEMM on other buffers gives the same bits.</summary>
    [SkippableFact]
    public void CudaGemm_PinsOneAlgorithmPerProblem_AndRepeatsBitForBit()
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        using var cuda = new CudaBackend(activationType: DType.BF16);
        float[] Run()
        {
            using var a = cuda.FromArray(TestData.Uniform(51, 300 * 512), DType.BF16, [300, 512]);
            using var w = cuda.FromArray(TestData.Uniform(52, 384 * 512), DType.BF16, [384, 512]);
            using var c = cuda.Allocate(DType.BF16, 300, 384);
            cuda.Gemm(a, false, w, true, c);
            return c.ToFloatArray();
        }
        var first = Run();
        int pinned = cuda.PinnedGemmAlgorithms;
        Assert.True(pinned >= 1);
        Assert.Equal(first, Run());
        Assert.Equal(pinned, cuda.PinnedGemmAlgorithms);   // the second run asked the heuristic nothing new
    }

    [SkippableFact]
    public void CudaEmbeddingBackward_RepeatedIds_GiveTheCpuBits_RunAfterRun()
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        const int vocab = 64, dim = 96, tokens = 4096;
        var ids = TestData.Ints(31, tokens, 5); // five ids, each about 800 times
        var dout = TestData.Uniform(32, tokens * dim);
        float[] Run(Backend b)
        {
            using var ti = b.FromArray(ids, [tokens]);
            using var tdo = b.FromArray(dout, DType.F32, [tokens, dim]);
            using var tdt = b.Allocate(DType.F32, vocab, dim);
            b.EmbeddingBackward(tdo, ti, tdt);
            return tdt.ToFloatArray();
        }
        using var cuda = new CudaBackend(activationType: DType.F32);
        var first = Run(cuda);
        Assert.Equal(first, Run(cuda));
        Assert.Equal(Run(fx.Backend), first); // the same additions in the same order
    }

    [SkippableFact]
    public void CudaEmbedding_IdOutsideVocabulary_GivesTheSameErrorAsCpu()
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        using var cuda = new CudaBackend();
        using var table = cuda.Allocate(DType.BF16, 11, 4);
        using var ids = cuda.FromArray([1, 2, 11, 4], [4]);
        using var o = cuda.Allocate(DType.BF16, 4, 4);
        var e = Assert.Throws<ArgumentException>(() => cuda.EmbeddingForward(table, ids, o));
        Assert.Equal("embedding_forward: ids[2] = 11 is outside [0, 11)", e.Message);
    }
}
