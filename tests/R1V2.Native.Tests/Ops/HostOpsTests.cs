using R1V2.Native.Engine.Backends.Cpu;

namespace R1V2.Native.Tests.Ops;

/// <summary>
/// The CPU backend's host loops (Cpu/HostOps.cs) against the launched ILGPU twins, bit for bit, on the calling thread
/// (small) and split over the cores (at least HostOps.ParallelFrom values); the op tests elsewhere hold both to their
/// references.
/// </summary>
[Collection("cpu")]
public sealed class HostOpsTests(CpuFixture fx) : IDisposable
{
    private readonly CpuBackend _twins = new(launchTwins: true);

    public void Dispose() => _twins.Dispose();

    private static readonly Dictionary<string, Func<Backend, int, float[][]>> Cases = new()
    {
        ["axpby"] = (b, n) =>
        {
            using var x = b.FromArray(TestData.Uniform(1, n), DType.F32, [n]);
            using var y = b.FromArray(TestData.Uniform(2, n), DType.F32, [n]);
            using var o = b.Allocate(DType.F32, n);
            b.Axpby(o, x, y, 0.7f, -1.3f);
            using var o2 = b.Allocate(DType.F32, n);
            b.Axpby(o2, x, null, 1.9f, 0f);
            b.Axpby(x, x, y, 0.5f, 2f); // in place
            return [o.ToFloatArray(), o2.ToFloatArray(), x.ToFloatArray()];
        },
        ["swiglu"] = (b, n) =>
        {
            using var g = b.FromArray(TestData.Uniform(3, n, 4), DType.F32, [n]);
            using var u = b.FromArray(TestData.Uniform(4, n), DType.F32, [n]);
            using var dy = b.FromArray(TestData.Uniform(5, n), DType.F32, [n]);
            using var y = b.Allocate(DType.F32, n);
            using var dg = b.Allocate(DType.F32, n);
            using var du = b.Allocate(DType.F32, n);
            b.SwiGluForward(g, u, y);
            b.SwiGluBackward(dy, g, u, dg, du);
            return [y.ToFloatArray(), dg.ToFloatArray(), du.ToFloatArray()];
        },
        ["gelu"] = (b, n) =>
        {
            using var x = b.FromArray(TestData.Uniform(6, n, 4), DType.F32, [n]);
            using var dy = b.FromArray(TestData.Uniform(7, n), DType.F32, [n]);
            var outs = new List<float[]>();
            foreach (var approx in new[] { GeluApproximation.Erf, GeluApproximation.Tanh })
            {
                using var y = b.Allocate(DType.F32, n);
                using var dx = b.Allocate(DType.F32, n);
                b.GeluForward(x, y, approx);
                b.GeluBackward(dy, x, dx, approx);
                outs.Add(y.ToFloatArray());
                outs.Add(dx.ToFloatArray());
            }
            return [.. outs];
        },
        ["bias"] = (b, n) =>
        {
            int cols = 48, rows = n / cols;
            using var a = b.FromArray(TestData.Uniform(8, rows * 16), DType.F32, [rows, 16]);
            using var w = b.FromArray(TestData.Uniform(9, cols * 16), DType.F32, [cols, 16]);
            using var bias = b.FromArray(TestData.Uniform(10, cols), DType.F32, [cols]);
            using var y = b.Allocate(DType.F32, rows, cols);
            b.Gemm(a, false, w, true, y, bias);
            using var db = b.FromArray(TestData.Uniform(11, cols), DType.F32, [cols]);
            b.BiasBackward(y, db, accumulate: true);
            using var db2 = b.Allocate(DType.F32, cols);
            b.BiasBackward(y, db2, accumulate: false);
            return [y.ToFloatArray(), db.ToFloatArray(), db2.ToFloatArray()];
        },
        ["rmsnorm"] = (b, n) =>
        {
            int cols = 96, rows = n / cols;
            using var x = b.FromArray(TestData.Uniform(12, rows * cols, 3), DType.F32, [rows, cols]);
            using var w = b.FromArray(TestData.Uniform(13, cols), DType.F32, [cols]);
            using var dy = b.FromArray(TestData.Uniform(14, rows * cols), DType.F32, [rows, cols]);
            using var y = b.Allocate(DType.F32, rows, cols);
            using var rstd = b.Allocate(DType.F32, rows);
            using var dx = b.Allocate(DType.F32, rows, cols);
            using var dw = b.FromArray(TestData.Uniform(15, cols), DType.F32, [cols]);
            b.RmsNormForward(x, w, y, rstd, 1e-6f);
            b.RmsNormBackward(dy, x, w, rstd, dx, dw, accumulate: true);
            b.RmsNormBackward(dy, x, w, rstd, dy, null, accumulate: false); // dx aliasing dy
            return [y.ToFloatArray(), rstd.ToFloatArray(), dx.ToFloatArray(), dw.ToFloatArray(), dy.ToFloatArray()];
        },
        ["rope"] = (b, n) =>
        {
            int heads = 4, dim = 24, t = n / (heads * dim);
            using var x = b.FromArray(TestData.Uniform(16, t * heads * dim), DType.F32, [t, heads, dim]);
            using var pos = b.FromArray(TestData.Ints(17, t, 4096), [t]);
            using var y = b.Allocate(DType.F32, t, heads, dim);
            using var dx = b.Allocate(DType.F32, t, heads, dim);
            b.RopeForward(x, pos, y, 1e6f);
            b.RopeBackward(y, pos, dx, 1e6f);
            using var yt = b.Allocate(DType.F32, t, heads, dim);
            b.RopeForward(x, pos, yt, 1e6f, b.RopeTable(1e6f, dim, 2048)); // half the positions read, half computed
            return [y.ToFloatArray(), dx.ToFloatArray(), yt.ToFloatArray()];
        },
        ["embedding"] = (b, n) =>
        {
            int dim = 32, t = n / dim;
            using var table = b.FromArray(TestData.Uniform(18, 300 * dim), DType.F32, [300, dim]);
            using var ids = b.FromArray(TestData.Ints(19, t, 300), [t]);
            using var o = b.Allocate(DType.F32, t, dim);
            b.EmbeddingForward(table, ids, o);
            return [o.ToFloatArray()];
        },
        ["embedding_backward"] = (b, n) =>
        {
            int dim = 32, t = n / dim;
            using var ids = b.FromArray(TestData.Ints(24, t, 7).Select(i => i * 3).ToArray(), [t]); // 7 ids, many times each
            using var dout = b.FromArray(TestData.Uniform(25, t * dim), DType.F32, [t, dim]);
            using var dtable = b.FromArray(TestData.Uniform(26, 30 * dim), DType.F32, [30, dim]);
            b.EmbeddingBackward(dout, ids, dtable);
            return [dtable.ToFloatArray()];
        },
        ["cross_entropy"] = (b, n) =>
        {
            int vocab = 300, rows = Math.Max(2, n / vocab);
            using var logits = b.FromArray(TestData.Uniform(27, rows * vocab, 8), DType.F32, [rows, vocab]);
            var t = TestData.Ints(28, rows, vocab);
            t[1] = Backend.IgnoreIndex;
            using var targets = b.FromArray(t, [rows]);
            using var lp = b.Allocate(DType.F32, rows);
            using var lse = b.Allocate(DType.F32, rows);
            using var dlp = b.FromArray(TestData.Uniform(29, rows), DType.F32, [rows]);
            b.CrossEntropyForward(logits, targets, lp, lse);
            var forward = logits.ToFloatArray();
            b.CrossEntropyBackward(logits, targets, lse, dlp, logits); // in place
            return [lp.ToFloatArray(), lse.ToFloatArray(), forward, logits.ToFloatArray()];
        },
        ["scale_columns"] = (b, n) =>
        {
            int cols = 64, rows = n / cols;
            using var x = b.FromArray(TestData.Uniform(30, rows * cols), DType.F32, [rows, cols]);
            using var sc = b.FromArray(TestData.Uniform(31, cols), DType.F32, [cols]);
            using var dy = b.FromArray(TestData.Uniform(32, rows * cols), DType.F32, [rows, cols]);
            using var y = b.Allocate(DType.F32, rows, cols);
            using var ds = b.FromArray(TestData.Uniform(33, cols), DType.F32, [cols]);
            b.ScaleColumns(x, sc, y);
            b.ScaleColumnsBackward(dy, x, ds, accumulate: true);
            return [y.ToFloatArray(), ds.ToFloatArray()];
        },
        ["rows"] = (b, n) =>
        {
            int cols = 16, rows = n / cols;
            var perm = Enumerable.Range(0, rows + 5).OrderBy(i => (i * 7919) % (rows + 5)).Take(rows).ToArray();
            using var src = b.FromArray(TestData.Uniform(34, rows * cols), DType.F32, [rows, cols]);
            using var dst = b.Allocate(DType.F32, rows + 5, cols);
            using var index = b.Rows(perm, rows + 5, distinct: true);
            b.ScatterRows(src, index, dst);
            using var k = b.FromArray(TestData.Uniform(35, rows * cols), DType.F32, [rows, 2, cols / 2]);
            using var v = b.FromArray(TestData.Uniform(36, rows * cols), DType.F32, [rows, 2, cols / 2]);
            using var kc = b.Allocate(DType.F32, rows + 5, 2, cols / 2);
            using var vc = b.Allocate(DType.F32, rows + 5, 2, cols / 2);
            b.KvAppend(k, v, index, kc, vc);
            return [dst.ToFloatArray(), kc.ToFloatArray(), vc.ToFloatArray()];
        },
        ["convert"] = (b, n) =>
        {
            using var x = b.FromArray(TestData.Uniform(37, n, 50), DType.F32, [n]);
            using var h = b.Allocate(DType.BF16, n);
            using var back = b.Allocate(DType.F32, n);
            b.Convert(x, h);
            b.Convert(h, back);
            using var copy = b.Allocate(DType.F32, n);
            b.Convert(x, copy);
            return [back.ToFloatArray(), copy.ToFloatArray()];
        },
        ["grad_norm"] = (b, n) =>
        {
            // Three tensors, the largest spanning several chunks of the partial sums.
            using var x = b.FromArray(TestData.Uniform(43, n), DType.F32, [n]);
            using var y = b.FromArray(TestData.Uniform(44, 37), DType.F32, [37]);
            using var z = b.FromArray(TestData.Uniform(45, 2 * n + 5, 3), DType.F32, [2 * n + 5]);
            return [[(float)b.GlobalNorm([x, y, z])], [(float)b.GlobalNorm([y])]];
        },
        ["layer_norm"] = (b, n) =>
        {
            int cols = 48, rows = n / cols;
            using var x = b.FromArray(TestData.Uniform(46, rows * cols, 2), DType.F32, [rows, cols]);
            using var w = b.FromArray(TestData.Uniform(47, cols), DType.F32, [cols]);
            using var bias = b.FromArray(TestData.Uniform(48, cols), DType.F32, [cols]);
            using var dy = b.FromArray(TestData.Uniform(49, rows * cols), DType.F32, [rows, cols]);
            using var y = b.Allocate(DType.F32, rows, cols);
            using var mean = b.Allocate(DType.F32, rows);
            using var rstd = b.Allocate(DType.F32, rows);
            using var dx = b.Allocate(DType.F32, rows, cols);
            using var dw = b.FromArray(TestData.Uniform(50, cols), DType.F32, [cols]);
            using var db = b.FromArray(TestData.Uniform(51, cols), DType.F32, [cols]);
            b.LayerNormForward(x, w, bias, y, mean, rstd, 1e-5f);
            b.LayerNormBackward(dy, x, w, mean, rstd, dx, dw, db, accumulate: true);
            using var y2 = b.Allocate(DType.F32, rows, cols);
            b.LayerNormForward(x, w, null, y2, mean, rstd, 1e-6f);
            b.LayerNormBackward(dy, x, w, mean, rstd, dy, dw, null, accumulate: false); // dx aliasing dy, no bias
            return [y.ToFloatArray(), dx.ToFloatArray(), y2.ToFloatArray(), mean.ToFloatArray(), rstd.ToFloatArray(), dw.ToFloatArray(), db.ToFloatArray(), dy.ToFloatArray()];
        },
        ["fused_lm_head_chunks"] = (b, n) =>
        {
            // Two vocabulary chunks of 40 and 23 columns, targets in either, one ignored row.
            int rows = Math.Max(3, n / 63);
            var targets = TestData.Ints(52, rows, 63);
            targets[1] = -100;
            using var tt = b.FromArray(targets, [rows]);
            using var c1 = b.FromArray(TestData.Uniform(53, rows * 40, 4), DType.F32, [rows, 40]);
            using var c2 = b.FromArray(TestData.Uniform(54, rows * 23, 4), DType.F32, [rows, 23]);
            using var m = b.FromArray(Enumerable.Repeat(float.NegativeInfinity, rows).ToArray(), DType.F32, [rows]);
            using var sums = b.Allocate(DType.F32, rows);
            using var tl = b.Allocate(DType.F32, rows);
            b.ChunkLseUpdate(c1, tt, 0, 1f / 0.7f, m, sums, tl);
            b.ChunkLseUpdate(c2, tt, 40, 1f / 0.7f, m, sums, tl);
            using var dlogp = b.FromArray(TestData.Uniform(55, rows), DType.F32, [rows]);
            b.ChunkLogitGrad(c1, m, sums, tt, dlogp, 0, 1f / 0.7f);
            b.ChunkLogitGrad(c2, m, sums, tt, dlogp, 40, 1f / 0.7f);
            return [m.ToFloatArray(), sums.ToFloatArray(), tl.ToFloatArray(), c1.ToFloatArray(), c2.ToFloatArray()];
        },
        ["sample"] = (b, n) =>
        {
            int vocab = 257, rows = Math.Max(2, n / (vocab * 64)); // the loop's work counts 64 passes over the vocabulary a row
            var settings = new[]
            {
                new SamplingParams(0f), new SamplingParams(0.6f, TopP: 0.95f), new SamplingParams(1f, TopK: 20),
                new SamplingParams(0.8f, TopK: 50, TopP: 0.9f, MinP: 0.05f, RepetitionPenalty: 1.3f), new SamplingParams(1.2f, RepetitionPenalty: 0.9f),
                new SamplingParams(0.7f, MinP: 0.2f),
            };
            var sampleRows = Enumerable.Range(0, rows).Select(i => new SampleRow(settings[i % settings.Length], (ulong)(1000 + i), i % 5,
                TestData.Ints(41 + i, 10, vocab))).ToList();
            using var logits = b.FromArray(TestData.Uniform(42, rows * (vocab + 3), 6), DType.F32, [rows, vocab + 3]);
            var (tokens, logp) = b.Sample(logits, sampleRows, vocab);
            return [tokens.Select(t => (float)t).ToArray(), logp];
        },
        ["adamw"] = (b, n) =>
        {
            using var p = b.FromArray(TestData.Uniform(20, n), DType.F32, [n]);
            using var g = b.FromArray(TestData.Uniform(21, n), DType.F32, [n]);
            using var m = b.FromArray(TestData.Uniform(22, n, 0.1f), DType.F32, [n]);
            using var v = b.FromArray(TestData.Uniform(23, n, 0.1f).Select(Math.Abs).ToArray(), DType.F32, [n]);
            using var copy = b.Allocate(DType.BF16, n);
            b.AdamW(p, g, m, v, copy, new AdamWSettings(1e-3f, WeightDecay: 0.1f), step: 3, gradScale: 0.5f);
            using var back = b.Allocate(DType.F32, n);
            b.Convert(copy, back);
            b.AdamW(p, g, m, v, null, new AdamWSettings(1e-3f), step: 4);
            return [p.ToFloatArray(), m.ToFloatArray(), v.ToFloatArray(), back.ToFloatArray()];
        },
    };

    public static TheoryData<string, int> Sizes()
    {
        var data = new TheoryData<string, int>();
        foreach (var op in Cases.Keys)
        {
            data.Add(op, 96 * 32);                                // one thread
            data.Add(op, (int)HostOps.ParallelFrom * 2 + 96 * 32); // split over the cores, uneven chunks
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Sizes))]
    public void HostLoops_EqualTheLaunchedTwins_BitForBit(string op, int n)
    {
        long before = HostOps.LoopsOnThisThread;
        var twin = Cases[op](_twins, n);
        Assert.Equal(before, HostOps.LoopsOnThisThread); // the twins were launched: no host loop ran
        var host = Cases[op](fx.Backend, n);
        Assert.True(HostOps.LoopsOnThisThread > before, "the default backend ran no host loop");
        Assert.Equal(twin.Length, host.Length);
        for (int i = 0; i < host.Length; i++) Assert.Equal(twin[i], host[i]);
    }
}
