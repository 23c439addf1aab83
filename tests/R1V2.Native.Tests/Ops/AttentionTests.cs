using R1V2.Native.Engine.Backends.Cpu;

namespace R1V2.Native.Tests.Ops;

/// <summary>
/// Row-wise attention on the CPU backend, both paths: kernels/attention.cu through its ILGPU twin (twins = true) and
/// the SIMD host path (the default): packed sequences, GQA, causal and bidirectional.
/// </summary>
[Collection("cpu")]
public sealed class AttentionTests(CpuFixture fx)
{
    private readonly CpuBackend _b = fx.Backend;

    private T With<T>(bool twins, Func<T> body) => fx.WithAttentionTwins(twins, body);
    private static readonly int[] Cu = [0, 3, 3, 7, 8]; // sequences of 3, 0, 4 and 1 tokens
    private const int Heads = 4, KvHeads = 2, Dim = 8;
    private static readonly float Scale = 1f / MathF.Sqrt(Dim);

    private (float[] O, float[] Lse) Forward(float[] q, float[] k, float[] v, bool causal)
    {
        int t = Cu[^1];
        using var seq = _b.Sequences(Cu);
        using var tq = _b.FromArray(q, DType.F32, [t, Heads, Dim]);
        using var tk = _b.FromArray(k, DType.F32, [t, KvHeads, Dim]);
        using var tv = _b.FromArray(v, DType.F32, [t, KvHeads, Dim]);
        using var o = _b.Allocate(DType.F32, t, Heads, Dim);
        using var lse = _b.Allocate(DType.F32, t, Heads);
        _b.AttentionForward(tq, tk, tv, seq, o, lse, Scale, causal);
        return (o.ToFloatArray(), lse.ToFloatArray());
    }

    private static (float[] Q, float[] K, float[] V) Inputs()
    {
        int t = Cu[^1];
        return (TestData.Uniform(1, t * Heads * Dim, 2f), TestData.Uniform(2, t * KvHeads * Dim, 2f), TestData.Uniform(3, t * KvHeads * Dim));
    }

    [Theory]
    [InlineData(true, true)]
    [InlineData(false, true)]
    [InlineData(true, false)]
    [InlineData(false, false)]
    public void AttentionForward_MatchesDoubleReference_PackedGqa(bool causal, bool twins)
    {
        var (q, k, v) = Inputs();
        var (o, lse) = With(twins, () => Forward(q, k, v, causal));
        var expected = Reference.Attention(TestData.ToDouble(q), TestData.ToDouble(k), TestData.ToDouble(v), Cu, Heads, KvHeads, Dim, Scale, causal);
        Check.Close(expected, o, 1e-6, 1e-5, "o");
        // The first token of a causal sequence attends only to itself: o = v of its kv head, lse = its own score.
        for (int h = 0; h < Heads && causal; h++)
        {
            int g = h / (Heads / KvHeads);
            for (int d = 0; d < Dim; d++) Assert.Equal(v[(3 * KvHeads + g) * Dim + d], o[(3 * Heads + h) * Dim + d], 6);
            double self = 0;
            for (int d = 0; d < Dim; d++) self += q[(3 * Heads + h) * Dim + d] * k[(3 * KvHeads + g) * Dim + d];
            Assert.Equal(self * Scale, lse[3 * Heads + h], 5);
        }
    }

    [Theory]
    [InlineData(true, true)]
    [InlineData(false, true)]
    [InlineData(true, false)]
    [InlineData(false, false)]
    public void AttentionBackward_MatchesDoubleReferenceGradients(bool causal, bool twins) => With(twins, () =>
    {
        var (q, k, v) = Inputs();
        int t = Cu[^1];
        var r = TestData.Uniform(4, q.Length);
        var (o, lse) = Forward(q, k, v, causal);
        using var seq = _b.Sequences(Cu);
        using var tq = _b.FromArray(q, DType.F32, [t, Heads, Dim]);
        using var tk = _b.FromArray(k, DType.F32, [t, KvHeads, Dim]);
        using var tv = _b.FromArray(v, DType.F32, [t, KvHeads, Dim]);
        using var to = _b.FromArray(o, DType.F32, [t, Heads, Dim]);
        using var tl = _b.FromArray(lse, DType.F32, [t, Heads]);
        using var tdo = _b.FromArray(r, DType.F32, [t, Heads, Dim]);
        using var dq = _b.Allocate(DType.F32, t, Heads, Dim);
        using var dk = _b.Allocate(DType.F32, t, KvHeads, Dim);
        using var dv = _b.Allocate(DType.F32, t, KvHeads, Dim);
        _b.AttentionBackward(tdo, tq, tk, tv, to, tl, seq, dq, dk, dv, Scale, causal);

        var qd = TestData.ToDouble(q); var kd = TestData.ToDouble(k); var vd = TestData.ToDouble(v); var rd = TestData.ToDouble(r);
        double Loss(double[] qq, double[] kk, double[] vv) => Reference.Dot(rd, Reference.Attention(qq, kk, vv, Cu, Heads, KvHeads, Dim, Scale, causal));
        Check.Close(Reference.Gradient(x => Loss(x, kd, vd), qd), dq.ToFloatArray(), 1e-5, 1e-4, "dq");
        Check.Close(Reference.Gradient(x => Loss(qd, x, vd), kd), dk.ToFloatArray(), 1e-5, 1e-4, "dk");
        Check.Close(Reference.Gradient(x => Loss(qd, kd, x), vd), dv.ToFloatArray(), 1e-5, 1e-4, "dv");
        FiniteDifference.CheckGradient(x => FiniteDifference.Dot(r, Forward(x, k, v, causal).O), q, dq.ToFloatArray(), "dq (backend fd)");
        return 0;
    });

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void HostPath_EqualsTheTwin_OnLongerSequences(bool causal)
    {
        // 3 sequences of 37, 64 and 5 tokens (enough work for the parallel path), 8 heads over 2 kv heads, D = 24.
        int[] cu = [0, 37, 101, 106];
        const int h = 8, hk = 2, d = 24;
        int t = cu[^1];
        var q = TestData.Uniform(11, t * h * d, 2f); var k = TestData.Uniform(12, t * hk * d, 2f); var v = TestData.Uniform(13, t * hk * d);
        var dO = TestData.Uniform(14, t * h * d);
        float[][] Run(bool twins) => With(twins, () =>
        {
            using var seq = _b.Sequences(cu);
            using var tq = _b.FromArray(q, DType.F32, [t, h, d]);
            using var tk = _b.FromArray(k, DType.F32, [t, hk, d]);
            using var tv = _b.FromArray(v, DType.F32, [t, hk, d]);
            using var o = _b.Allocate(DType.F32, t, h, d);
            using var lse = _b.Allocate(DType.F32, t, h);
            _b.AttentionForward(tq, tk, tv, seq, o, lse, 0.2f, causal);
            using var tdo = _b.FromArray(dO, DType.F32, [t, h, d]);
            using var dq = _b.Allocate(DType.F32, t, h, d);
            using var dk = _b.Allocate(DType.F32, t, hk, d);
            using var dv = _b.Allocate(DType.F32, t, hk, d);
            _b.AttentionBackward(tdo, tq, tk, tv, o, lse, seq, dq, dk, dv, 0.2f, causal);
            return new[] { o.ToFloatArray(), lse.ToFloatArray(), dq.ToFloatArray(), dk.ToFloatArray(), dv.ToFloatArray() };
        });
        var twin = Run(true);
        var host = Run(false);
        string[] names = ["o", "lse", "dq", "dk", "dv"];
        for (int i = 0; i < names.Length; i++) Check.Close(twin[i], host[i], 1e-5, 1e-4, names[i]);
    }

    [Fact]
    public void AttentionForward_RejectsSequencesThatDoNotCoverTheTokens()
    {
        using var seq = _b.Sequences([0, 2, 5]);
        using var q = _b.Allocate(DType.F32, 6, 2, 4);
        using var k = _b.Allocate(DType.F32, 6, 1, 4);
        using var o = _b.Allocate(DType.F32, 6, 2, 4);
        using var lse = _b.Allocate(DType.F32, 6, 2);
        var e = Assert.Throws<ArgumentException>(() => _b.AttentionForward(q, k, k, seq, o, lse, 0.5f, true));
        Assert.Contains("hold 5 tokens, q has 6", e.Message);
        Assert.Throws<ArgumentException>(() => _b.Sequences([0, 4, 3]));
    }
}

/// <summary>kernels/attention_mma.cu's schedule through its CPU twin (AttentionVariant.Tiled).</summary>
[Collection("cpu")]
public sealed class TiledAttentionTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void TheDefault_IsTiledWhereCudaRunsItNatively_AndRowWiseElsewhere()
    {
        // CUDA: bf16 with a head dim of 64, 80, 96 or 128 and 16-byte aligned rows take the tensor-core schedule.
        foreach (int d in Backend.TiledHeadDims) Assert.True(R1V2.Native.Engine.Backends.Cuda.CudaBackend.TiledFits(DType.BF16, d, 0, 4096, 8192));
        Assert.False(R1V2.Native.Engine.Backends.Cuda.CudaBackend.TiledFits(DType.F32, 128, 0, 0, 0));       // fp32: row-wise
        Assert.False(R1V2.Native.Engine.Backends.Cuda.CudaBackend.TiledFits(DType.BF16, 48, 0, 0, 0));      // other head dims
        Assert.False(R1V2.Native.Engine.Backends.Cuda.CudaBackend.TiledFits(DType.BF16, 128, 0, 8, 0));     // an unaligned view
        // The CPU (fp32) keeps row-wise under Auto; Tiled still runs when asked for.
        Assert.Equal(AttentionVariant.Auto, new CpuBackend().Attention);
        using var q = _b.FromArray(new float[2 * 2 * 64], DType.F32, [2, 2, 64]);
        Assert.Equal(AttentionVariant.RowWise, _b.VariantFor(q, q, q));
        var before = _b.Attention;
        _b.Attention = AttentionVariant.Tiled;
        try { Assert.Equal(AttentionVariant.Tiled, _b.VariantFor(q, q, q)); }
        finally { _b.Attention = before; }
    }

    private (float[] O, float[] Lse) Run(AttentionVariant variant, int[] cu, int heads, int kv, int dim, float[] q, float[] k, float[] v, bool causal) =>
        AttentionRuns.Forward(_b, variant, cu, heads, kv, dim, q, k, v, causal);

    [Theory]
    [InlineData(64, true)]
    [InlineData(64, false)]
    [InlineData(128, true)]
    [InlineData(80, false)]
    public void TiledForward_MatchesDoubleReference_AcrossTileBoundaries(int dim, bool causal)
    {
        int[] cu = [0, 150, 151, 217]; // 150 tokens span three 64-row tiles; a single-token sequence; 66 more
        const int heads = 4, kv = 2;
        int t = cu[^1];
        static float[] Bf16(float[] x) => x.Select(BFloat16.Round).ToArray(); // the tensor-core path reads bf16
        var q = Bf16(TestData.Uniform(1, t * heads * dim, 2f));
        var k = Bf16(TestData.Uniform(2, t * kv * dim, 2f));
        var v = Bf16(TestData.Uniform(3, t * kv * dim));
        var (o, lse) = Run(AttentionVariant.Tiled, cu, heads, kv, dim, q, k, v, causal);
        var expected = Reference.Attention(TestData.ToDouble(q), TestData.ToDouble(k), TestData.ToDouble(v), cu, heads, kv, dim, 1 / Math.Sqrt(dim), causal);
        // P is rounded to bf16 (relative error <= 2^-9) before P V, so outputs move by at most 2^-9 max|v| ~ 2e-3.
        Check.Close(expected, o, 2.5e-3, 0, "o");
        var (_, lseRowWise) = Run(AttentionVariant.RowWise, cu, heads, kv, dim, q, k, v, causal);
        Check.Close(TestData.ToDouble(lseRowWise), lse, 1e-5, 1e-5, "lse (sums stay fp32)");
    }

    [Theory]
    [InlineData(64, true)]
    [InlineData(96, false)]
    public void TiledBackward_MatchesTheExactRowWiseBackward_WithinBf16Rounding(int dim, bool causal)
    {
        int[] cu = [0, 70, 71, 100];
        const int heads = 4, kv = 2;
        int t = cu[^1];
        static float[] Bf16(float[] x) => x.Select(BFloat16.Round).ToArray();
        var q = Bf16(TestData.Uniform(4, t * heads * dim, 2f));
        var k = Bf16(TestData.Uniform(5, t * kv * dim, 2f));
        var v = Bf16(TestData.Uniform(6, t * kv * dim));
        var dout = Bf16(TestData.Uniform(7, t * heads * dim));
        float[][] Grads(AttentionVariant variant) => AttentionRuns.Backward(_b, variant, cu, heads, kv, dim, q, k, v, dout, causal, null);
        var exact = Grads(AttentionVariant.RowWise);
        var tiled = Grads(AttentionVariant.Tiled);
        string[] names = ["dq", "dk", "dv"];
        for (int i = 0; i < 3; i++)
        {
            // P and dS rounded to bf16 (2^-9 relative each) inside sums of ~100 terms: ~0.3% in the 2-norm; 1% bound.
            double rel = Check.RelativeL2(TestData.ToDouble(exact[i]), tiled[i]);
            Assert.True(rel <= 1e-2, $"{names[i]}: relative L2 difference {rel:E2} from the exact backward");
            Assert.True(rel > 0, $"{names[i]}: the tiled twin should round P and dS, so it cannot equal the exact backward bit for bit");
        }
    }

    [Fact]
    public void TiledForward_RejectsOtherHeadDims()
    {
        var e = Assert.Throws<ArgumentException>(() => Run(AttentionVariant.Tiled, [0, 4], 2, 2, 8, new float[64], new float[64], new float[64], true));
        Assert.Contains("head dims 64, 80, 96, 128, not 8", e.Message);
    }
}

/// <summary>kernels/attention_flash.cu's schedule through its CPU twins (AttentionVariant.Flash).</summary>
[Collection("cpu")]
public sealed class FlashAttentionTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private static float[] Bf16(float[] x) => x.Select(BFloat16.Round).ToArray(); // the tensor-core path reads bf16

    private (float[] O, float[] Lse) Forward(AttentionVariant variant, int[] cu, int heads, int kv, int dim, float[] q, float[] k, float[] v, bool causal) =>
        AttentionRuns.Forward(_b, variant, cu, heads, kv, dim, q, k, v, causal);

    [Theory]
    [InlineData(64, true)]
    [InlineData(128, true)]
    [InlineData(128, false)]
    [InlineData(80, false)]
    [InlineData(96, true)]
    public void FlashForward_MatchesDoubleReference_AcrossTileBoundaries(int dim, bool causal)
    {
        int[] cu = [0, 300, 301, 367]; // 300 tokens: three 128-row query tiles and five 64-key tiles; a single token; 66 more
        const int heads = 4, kv = 2;
        int t = cu[^1];
        var q = Bf16(TestData.Uniform(11, t * heads * dim, 2f));
        var k = Bf16(TestData.Uniform(12, t * kv * dim, 2f));
        var v = Bf16(TestData.Uniform(13, t * kv * dim));
        var (o, lse) = Forward(AttentionVariant.Flash, cu, heads, kv, dim, q, k, v, causal);
        var expected = Reference.Attention(TestData.ToDouble(q), TestData.ToDouble(k), TestData.ToDouble(v), cu, heads, kv, dim, 1 / Math.Sqrt(dim), causal);
        // P is rounded to bf16 (relative error <= 2^-9) before P V: outputs move by at most 2^-9 max|v| ~ 2e-3.
        Check.Close(expected, o, 2.5e-3, 0, "o");
        var (_, lseRowWise) = Forward(AttentionVariant.RowWise, cu, heads, kv, dim, q, k, v, causal);
        Check.Close(TestData.ToDouble(lseRowWise), lse, 1e-5, 1e-5, "lse (sums stay fp32)");
    }

    [Fact]
    public void FlashForward_RescalesOncePer64Keys_AtEveryHeadDim()
    {
        // At D = 128 the tiled kernel rescales every 32 keys and the flash kernel every 64: the twins follow their
        // kernels, so the two schedules' outputs differ in the last bits (both within bf16 rounding of the reference).
        int[] cu = [0, 200];
        const int heads = 2, kv = 1, dim = 128;
        var q = Bf16(TestData.Uniform(21, 200 * heads * dim, 3f));
        var k = Bf16(TestData.Uniform(22, 200 * kv * dim, 3f));
        var v = Bf16(TestData.Uniform(23, 200 * kv * dim));
        var (flash, _) = Forward(AttentionVariant.Flash, cu, heads, kv, dim, q, k, v, causal: true);
        var (tiled, _) = Forward(AttentionVariant.Tiled, cu, heads, kv, dim, q, k, v, causal: true);
        Assert.False(flash.SequenceEqual(tiled), "the 64-key and 32-key schedules round P after different rescales");
        Check.Close(TestData.ToDouble(tiled), flash, 2.5e-3, 0, "flash vs tiled");
    }

    private float[][] Grads(AttentionVariant variant, int[] cu, int heads, int kv, int dim, bool causal, int? splits, int seed)
    {
        int t = cu[^1];
        var q = Bf16(TestData.Uniform(seed, t * heads * dim, 2f));
        var k = Bf16(TestData.Uniform(seed + 1, t * kv * dim, 2f));
        var v = Bf16(TestData.Uniform(seed + 2, t * kv * dim));
        var dout = Bf16(TestData.Uniform(seed + 3, t * heads * dim));
        return AttentionRuns.Backward(_b, variant, cu, heads, kv, dim, q, k, v, dout, causal, splits);
    }

    [Theory]
    [InlineData(64, true, 1)]
    [InlineData(64, true, 3)]
    [InlineData(128, false, 2)]
    [InlineData(80, true, 4)]
    public void FlashBackward_MatchesTheExactRowWiseBackward_WithinBf16Rounding(int dim, bool causal, int splits)
    {
        int[] cu = [0, 300, 301, 380]; // five 128-key tiles: every split owns one or more, some split owns tiles of two sequences
        const int heads = 4, kv = 2;
        var exact = Grads(AttentionVariant.RowWise, cu, heads, kv, dim, causal, null, 31);
        var flash = Grads(AttentionVariant.Flash, cu, heads, kv, dim, causal, splits, 31);
        string[] names = ["dq", "dk", "dv"];
        for (int i = 0; i < 3; i++)
        {
            // P and dS rounded to bf16 (2^-9 relative each) inside sums of ~300 terms: ~0.3% in the 2-norm; 1% bound.
            double rel = Check.RelativeL2(TestData.ToDouble(exact[i]), flash[i]);
            Assert.True(rel <= 1e-2, $"{names[i]}: relative L2 difference {rel:E2} from the exact backward");
            Assert.True(rel > 0, $"{names[i]}: the flash twin rounds P and dS, so it cannot equal the exact backward bit for bit");
        }
    }

    [Fact]
    public void FlashBackward_RepeatsBitForBit_AndItsSplitsOnlyRegroupTheDqSum()
    {
        int[] cu = [0, 300, 301, 380];
        var a = Grads(AttentionVariant.Flash, cu, 4, 2, 64, true, 3, 41);
        var b = Grads(AttentionVariant.Flash, cu, 4, 2, 64, true, 3, 41);
        for (int i = 0; i < 3; i++) Assert.True(a[i].SequenceEqual(b[i]), $"gradient {i}: two runs differ");
        var one = Grads(AttentionVariant.Flash, cu, 4, 2, 64, true, 1, 41);
        // dk and dv do not depend on the splits; dq's fp32 sum is regrouped (same terms, other order): equal to rounding.
        Assert.True(one[1].SequenceEqual(a[1]) && one[2].SequenceEqual(a[2]), "dk and dv must not depend on the dq splits");
        Assert.False(one[0].SequenceEqual(a[0]), "three splits add dq in three groups, one split in one");
        Check.Close(TestData.ToDouble(one[0]), a[0], 1e-5, 1e-4, "dq, 1 vs 3 splits");
    }

    [Fact]
    public void TheFlashKernelsSharedMemory_FitsA100AndHopper_ButNotThe99KbGpusAtLargeHeadDims()
    {
        // Per-block opt-in limits: A100 163 KB, H100/H200 227 KB, sm_86/sm_89 99 KB (Auto runs the tiled kernels there).
        const int a100 = 166912, hopper = 232448, ada = 101376;
        int[] expected = [82944, 107520, 123904, 148480]; // backward: K, V, two Q/dO buffers, dS^T, lse/delta
        for (int i = 0; i < 4; i++)
        {
            int d = Backend.TiledHeadDims[i], bytes = R1V2.Native.Engine.Backends.Cuda.CudaBackend.FlashBackwardSharedBytes(d);
            Assert.Equal(expected[i], bytes);
            Assert.True(bytes <= a100 && bytes <= hopper, $"D {d}: {bytes} B");
            Assert.True(R1V2.Native.Engine.Backends.Cuda.CudaBackend.FlashForwardSharedBytes(d) <= 65536, $"D {d} forward");
        }
        Assert.True(expected[0] <= ada && expected[1] > ada);
    }

    [Fact]
    public void FlashSplits_FillTheDevice_WithinMemoryAndTileBounds()
    {
        // H200 (132 SMs), the 38B decoder (40 heads, D 128) at 8192 tokens in 64 key tiles: 7 splits, 1.2 GB of partials.
        Assert.Equal(7, Backend.FlashSplits(132, 40, 64, 8192, 128));
        Assert.Equal(2, Backend.FlashSplits(132, 40, 2, 256, 128));          // never more splits than key tiles
        Assert.Equal(1, Backend.FlashSplits(132, 64, 1024, 131072, 128));    // 4 GiB per partial: one split
        Assert.Equal(33, Backend.FlashSplits(132, 8, 100, 4096, 64));        // few heads: more splits
        Assert.Equal(1, Backend.FlashSplits(132, 40, 0, 0, 128));
    }
}

/// <summary>One attention forward in a given schedule on fp32 tensors (the twins' tests).</summary>
internal static class AttentionRuns
{
    public static (float[] O, float[] Lse) Forward(Backend b, AttentionVariant variant, int[] cu, int heads, int kv, int dim, float[] q, float[] k, float[] v, bool causal)
    {
        int t = cu[^1];
        using var seq = b.Sequences(cu);
        using var tq = b.FromArray(q, DType.F32, [t, heads, dim]);
        using var tk = b.FromArray(k, DType.F32, [t, kv, dim]);
        using var tv = b.FromArray(v, DType.F32, [t, kv, dim]);
        using var o = b.Allocate(DType.F32, t, heads, dim);
        using var lse = b.Allocate(DType.F32, t, heads);
        var before = b.Attention;
        b.Attention = variant;
        try { b.AttentionForward(tq, tk, tv, seq, o, lse, 1f / MathF.Sqrt(dim), causal); }
        finally { b.Attention = before; }
        return (o.ToFloatArray(), lse.ToFloatArray());
    }

    /// <summary>dq, dk, dv of one backward in a given schedule (and dq split count), after the same row-wise forward.</summary>
    public static float[][] Backward(Backend b, AttentionVariant variant, int[] cu, int heads, int kv, int dim, float[] q, float[] k, float[] v, float[] dout,
        bool causal, int? splits)
    {
        int t = cu[^1];
        using var seq = b.Sequences(cu);
        using var tq = b.FromArray(q, DType.F32, [t, heads, dim]);
        using var tk = b.FromArray(k, DType.F32, [t, kv, dim]);
        using var tv = b.FromArray(v, DType.F32, [t, kv, dim]);
        using var tdo = b.FromArray(dout, DType.F32, [t, heads, dim]);
        using var o = b.Allocate(DType.F32, t, heads, dim);
        using var lse = b.Allocate(DType.F32, t, heads);
        using var dq = b.Allocate(DType.F32, t, heads, dim);
        using var dk = b.Allocate(DType.F32, t, kv, dim);
        using var dv = b.Allocate(DType.F32, t, kv, dim);
        var (before, beforeSplits) = (b.Attention, b.AttentionSplits);
        try
        {
            b.Attention = AttentionVariant.RowWise; // the same forward for every schedule: only the backward differs
            b.AttentionForward(tq, tk, tv, seq, o, lse, 1f / MathF.Sqrt(dim), causal);
            b.Attention = variant;
            b.AttentionSplits = splits;
            b.AttentionBackward(tdo, tq, tk, tv, o, lse, seq, dq, dk, dv, 1f / MathF.Sqrt(dim), causal);
        }
        finally { (b.Attention, b.AttentionSplits) = (before, beforeSplits); }
        return [dq.ToFloatArray(), dk.ToFloatArray(), dv.ToFloatArray()];
    }
}
