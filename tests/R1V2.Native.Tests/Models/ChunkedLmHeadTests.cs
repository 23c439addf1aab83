using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>
/// The one log-prob path of every stage (<see cref="ChunkedLmHead"/>) against double-precision loops over the full
/// [T, V] logits, and its memory: only the scored rows enter the head, never [T, V].
/// </summary>
[Collection("cpu")]
public sealed class ChunkedLmHeadTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    /// <summary>log softmax(h W^T / T)[target] per row, d loss / d hidden and d loss / d W for a given d loss / d log p, in double.</summary>
    private static (double[] LogP, double[] DHidden, double[] DHead) Reference(float[] h, float[] w, int[] targets, double[] dlogp, int t, int d, int v, double temperature)
    {
        var logp = new double[t];
        var dh = new double[t * d];
        var dw = new double[v * d];
        for (int i = 0; i < t; i++)
        {
            if (targets[i] < 0) continue;
            var z = new double[v];
            for (int j = 0; j < v; j++)
            {
                double s = 0;
                for (int k = 0; k < d; k++) s += (double)h[i * d + k] * w[j * d + k];
                z[j] = s / temperature;
            }
            double m = z.Max(), sum = z.Sum(x => Math.Exp(x - m)), lse = m + Math.Log(sum);
            logp[i] = z[targets[i]] - lse;
            for (int j = 0; j < v; j++)
            {
                double g = dlogp[i] * ((j == targets[i] ? 1 : 0) - Math.Exp(z[j] - lse)) / temperature; // d loss / d logit
                for (int k = 0; k < d; k++)
                {
                    dh[i * d + k] += g * w[j * d + k];
                    dw[j * d + k] += g * h[i * d + k];
                }
            }
        }
        return (logp, dh, dw);
    }

    [Theory]
    [InlineData(7, 1f, null)]
    [InlineData(64, 0.6f, null)]
    [InlineData(1000, 1f, 90)]
    public void LogProbsAndGradients_MatchDoubleLoops_AndUnscoredRowsGetNothing(int chunk, float temperature, int? vocabLimit)
    {
        const int t = 29, d = 12, v = 100;
        var h = TestData.Uniform(1, t * d, 1.5f);
        var w = TestData.Uniform(2, v * d, 0.6f);
        var rng = new Random(3);
        int rows = vocabLimit ?? v;
        var targets = Enumerable.Range(0, t).Select(i => i % 3 == 1 ? Backend.IgnoreIndex : rng.Next(rows)).ToArray();
        var dlogp = targets.Select(x => x < 0 ? 0 : rng.NextDouble() * 2 - 1).ToArray();
        using var hidden = _b.FromArray(h, DType.F32, [t, d]);
        using var head = Parameter.Create(_b, "lm_head.weight", [v, d], w);
        head.ZeroGrad();

        using var scored = ChunkedLmHead.Forward(_b, hidden, head, targets, temperature, chunk, vocabLimit);
        Assert.Equal(Enumerable.Range(0, t).Where(i => targets[i] >= 0), scored.Rows);
        var logp = scored.Spread(scored.RowLogProbs());
        using var dl = _b.FromArray(scored.Pick(dlogp.Select(x => (float)x).ToArray()), DType.F32, [scored.Rows.Length]);
        using var dHidden = ChunkedLmHead.Backward(_b, scored, head, dl, DType.F32, chunk);

        // The reference's softmax covers the limited vocabulary: the head's first `rows` rows.
        var (refLogp, refDh, refDw) = Reference(h, w[..(rows * d)], targets, dlogp, t, d, rows, temperature);
        Check.Close(refLogp, logp, 1e-5, 1e-5, "log p");
        var dh = dHidden.ToFloatArray();
        Check.Close(refDh, dh, 1e-5, 1e-4, "d hidden");
        var dw = head.Grad!.ToFloatArray();
        Check.Close(refDw, dw[..(rows * d)], 1e-5, 1e-4, "d head");
        Assert.All(dw[(rows * d)..], x => Assert.Equal(0f, x)); // padding rows past the limit: nothing
        for (int i = 0; i < t; i++)
            if (targets[i] < 0)
            {
                Assert.Equal(0f, logp[i]);
                Assert.All(dh.AsSpan(i * d, d).ToArray(), x => Assert.Equal(0f, x));
            }
    }

    [Fact]
    public void NoScoredRow_GivesZeroGradientAndNoHeadWork()
    {
        using var hidden = _b.FromArray(TestData.Uniform(4, 5 * 8, 1f), DType.F32, [5, 8]);
        using var head = Parameter.Create(_b, "lm_head.weight", [30, 8], TestData.Uniform(5, 30 * 8, 1f));
        head.ZeroGrad();
        var targets = Enumerable.Repeat(Backend.IgnoreIndex, 5).ToArray();
        using var scored = ChunkedLmHead.Forward(_b, hidden, head, targets);
        Assert.Empty(scored.Rows);
        using var none = _b.Allocate(DType.F32, 0);
        using var dh = ChunkedLmHead.Backward(_b, scored, head, none, DType.F32);
        Assert.All(dh.ToFloatArray(), x => Assert.Equal(0f, x));
        Assert.All(head.Grad!.ToFloatArray(), x => Assert.Equal(0f, x));
    }

    [Fact]
    public void TargetPastTheCoveredVocabulary_IsAnErrorNamingThePosition()
    {
        using var hidden = _b.FromArray(TestData.Uniform(4, 3 * 8, 1f), DType.F32, [3, 8]);
        using var head = Parameter.Create(_b, "lm_head.weight", [30, 8], TestData.Uniform(5, 30 * 8, 1f));
        var e = Assert.Throws<ArgumentException>(() => ChunkedLmHead.Forward(_b, hidden, head, [1, 25, -100], vocabLimit: 20));
        Assert.Contains("target 1 is token 25", e.Message);
    }

    /// <summary>
    /// A supervised step's loss path at a long prompt: 512 rows of which 32 are response rows, vocabulary 32000. The
    /// [T, V] logits alone would be 65.5 MB; the chunked head over the scored rows holds [32, chunk] fp32 and the
    /// gathered rows, so its peak above the inputs stays below the hidden states' own size plus 3 chunks.
    /// </summary>
    [Fact]
    public void PeakMemory_IsScoredRowsTimesChunk_NotTokensTimesVocabulary()
    {
        const int t = 512, d = 64, v = 32000, scoredRows = 32, chunk = 2048;
        using var b = new CpuBackend();
        using var hidden = b.FromArray(TestData.Uniform(6, t * d, 1f), DType.F32, [t, d]);
        using var head = Parameter.Create(b, "lm_head.weight", [v, d], TestData.Uniform(7, v * d, 0.3f));
        var rng = new Random(8);
        var targets = Enumerable.Range(0, t).Select(i => i >= t - scoredRows ? rng.Next(v) : Backend.IgnoreIndex).ToArray();
        b.Synchronize();
        long before = b.Memory.BytesInUse;
        using (var scored = ChunkedLmHead.Forward(b, hidden, head, targets, vocabChunk: chunk))
        {
            using var dl = b.FromArray(Enumerable.Repeat(-1f / scoredRows, scoredRows).ToArray(), DType.F32, [scoredRows]);
            using var dh = ChunkedLmHead.Backward(b, scored, head, dl, DType.F32, chunk);
        }
        long peak = b.Memory.PeakBytesInUse - before;
        long logits = (long)t * v * 4, bound = (long)t * d * 4 + 3L * scoredRows * chunk * 4 + 4L * scoredRows * d * 4 + 64 * 1024;
        Assert.True(peak <= bound, $"loss peak {peak:N0} B above {bound:N0} B (the [T, V] logits would be {logits:N0} B)");
        Assert.True(peak < logits / 20, $"loss peak {peak:N0} B is not far below the {logits:N0} B of [T, V] logits");
    }
}
