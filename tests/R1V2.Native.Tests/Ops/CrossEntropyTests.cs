namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/cross_entropy.cu through its ILGPU twin: fused log-softmax, gather and NLL gradient.</summary>
[Collection("cpu")]
public sealed class CrossEntropyTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private (float[] LogProb, float[] Lse) Forward(float[] logits, int[] targets, int vocab)
    {
        using var tl = _b.FromArray(logits, DType.F32, [targets.Length, vocab]);
        using var tt = _b.FromArray(targets, [targets.Length]);
        using var lp = _b.Allocate(DType.F32, targets.Length);
        using var lse = _b.Allocate(DType.F32, targets.Length);
        _b.CrossEntropyForward(tl, tt, lp, lse);
        return (lp.ToFloatArray(), lse.ToFloatArray());
    }

    [Theory]
    [InlineData(1, 2, 1f)]
    [InlineData(5, 1000, 4f)]
    [InlineData(3, 151, 60f)]
    public void CrossEntropyForward_MatchesDoubleReference(int rows, int vocab, float scale)
    {
        var logits = TestData.Uniform(81, rows * vocab, scale);
        var targets = TestData.Ints(82, rows, vocab);
        var (lp, lse) = Forward(logits, targets, vocab);
        var (elp, expLse) = Reference.LogSoftmaxGather(TestData.ToDouble(logits), targets, vocab, Backend.IgnoreIndex);
        // |lse| up to ~scale: fp32 absolute error ~ |lse| * 1e-7 per term; 1e-5 + 1e-5 relative is tight for that.
        Check.Close(expLse, lse, 1e-5, 1e-5, "lse");
        Check.Close(elp, lp, 1e-5, 1e-5, "logprob");
    }

    [Fact]
    public void CrossEntropyForward_LargeLogits_StayFinite()
    {
        float[] logits = [1e4f, -1e4f, 9990f, 0f, 88f, 89f];
        var (lp, _) = Forward(logits, [2, 1], 3);
        var (elp, _) = Reference.LogSoftmaxGather(TestData.ToDouble(logits), [2, 1], 3, Backend.IgnoreIndex);
        Check.Close(elp, lp, 1e-3, 1e-6, "logprob");
    }

    [Fact]
    public void CrossEntropyBackward_MatchesReference_InPlace_WithIgnoredRow()
    {
        const int rows = 4, vocab = 13;
        var logits = TestData.Uniform(83, rows * vocab, 3f);
        int[] targets = [5, Backend.IgnoreIndex, 0, 12];
        var dlp = TestData.Uniform(84, rows);
        var (_, lse) = Forward(logits, targets, vocab);

        using var tl = _b.FromArray(logits, DType.F32, [rows, vocab]);
        using var tt = _b.FromArray(targets, [rows]);
        using var tlse = _b.FromArray(lse, DType.F32, [rows]);
        using var tdlp = _b.FromArray(dlp, DType.F32, [rows]);
        _b.CrossEntropyBackward(tl, tt, tlse, tdlp, tl); // in place: logits become dlogits
        var got = tl.ToFloatArray();

        var dd = TestData.ToDouble(dlp);
        var expected = Reference.Gradient(v => Reference.Dot(dd, Reference.LogSoftmaxGather(v, targets, vocab, Backend.IgnoreIndex).LogProb), TestData.ToDouble(logits));
        Check.Close(expected, got, 1e-6, 1e-4, "dlogits");
        Assert.All(got[vocab..(2 * vocab)], g => Assert.Equal(0f, g));
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(dlp, Forward(v, targets, vocab).LogProb), logits, got, "dlogits (backend fd)");
    }

    [Fact]
    public void CrossEntropyForward_MaskedLogitsAtMinusInfinity_AreIgnoredNotNaN()
    {
        // -inf first in the row: the online sum must not form exp(-inf - -inf).
        float[] logits = [float.NegativeInfinity, 1f, 2f, float.NegativeInfinity, float.NegativeInfinity, 0.5f];
        var (lp, lse) = Forward(logits, [2, 2], 3);
        double l0 = Math.Log(Math.Exp(1) + Math.Exp(2));
        Assert.Equal(l0, lse[0], 5);
        Assert.Equal(2 - l0, lp[0], 5);
        Assert.Equal(0.5, lse[1], 5);
        Assert.Equal(0.0, lp[1], 5);
    }

    [Fact]
    public void CrossEntropyForward_VectorPath_SkipsAllMaskedVectors_AndRescalesOncePerVector()
    {
        // vocab 8: read as two 4-wide vectors (the kernels' packed path). Row 0's first vector is all -inf; row 1's
        // maximum sits in its second vector, after smaller values that must be rescaled once.
        float ninf = float.NegativeInfinity;
        float[] logits = [ninf, ninf, ninf, ninf, 1f, 2f, ninf, 0.5f, -3f, 1f, -2f, 0f, 30f, 29f, ninf, -1f];
        var (lp, lse) = Forward(logits, [5, 4], 8);
        var (elp, expLse) = Reference.LogSoftmaxGather(TestData.ToDouble(logits), [5, 4], 8, Backend.IgnoreIndex);
        Check.Close(expLse, lse, 1e-6, 1e-6, "lse");
        Check.Close(elp, lp, 1e-6, 1e-6, "logprob");
    }

    [Fact]
    public void CrossEntropyForward_TargetOutsideVocabulary_IsAnError()
    {
        using var tl = _b.Allocate(DType.F32, 2, 5);
        using var tt = _b.FromArray([1, 5], [2]);
        using var lp = _b.Allocate(DType.F32, 2);
        using var lse = _b.Allocate(DType.F32, 2);
        var e = Assert.Throws<ArgumentException>(() => _b.CrossEntropyForward(tl, tt, lp, lse));
        Assert.Equal("cross_entropy_forward: targets[1] = 5 is outside [0, 5)", e.Message);
    }
}
