using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Trainer.Grpo;

namespace R1V2.Native.Tests.Trainer;

/// <summary>GRPO formulas pinned to hand-computed values, and the fused LM-head loss against the unfused composition.</summary>
[Collection("cpu")]
public sealed class GrpoTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void Advantages_MatchHandComputedValues()
    {
        double[] r = [1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5];
        var a = GrpoMath.Advantages(r, 4, AdvantageMode.MeanStd);
        // mean 0.5, unbiased std sqrt(4 x 0.25 / 3) = 0.57735: (1 - 0.5) / 0.57735 = 0.866025
        Assert.Equal(0.866025, a[0], 5);
        Assert.Equal(-0.866025, a[1], 5);
        Assert.All(a[4..], x => Assert.Equal(0, x)); // a group that agrees carries no signal
        Assert.Equal([0.5, -0.5, -0.5, 0.5], GrpoMath.Advantages(r, 4, AdvantageMode.MeanOnly)[..4]);
        var loo = GrpoMath.Advantages(r, 4, AdvantageMode.LeaveOneOut);
        Assert.Equal(2.0 / 3, loo[0], 10);   // 1 - (0 + 0 + 1) / 3
        Assert.Equal(-2.0 / 3, loo[1], 10);  // 0 - (1 + 0 + 1) / 3
    }

    [Fact]
    public void SequenceWeights_GiveSequenceMeanOfTokenMeans_OrTokenMean()
    {
        Assert.Equal([0.25, 0.125], GrpoMath.SequenceWeights([2, 4], LossAggregation.SequenceMeanTokenMean));
        Assert.Equal([1.0 / 6, 1.0 / 6], GrpoMath.SequenceWeights([2, 4], LossAggregation.TokenMean));
    }

    [Theory]
    // logp, old, advantage, eps_low, eps_high, dual clip -> loss, dloss/dlogp (weight 1, no KL)
    [InlineData(-1.0, -1.2, 2.0, 0.2, 0.28, 0.0, -2.442806, -2.442806)]  // r = e^0.2 = 1.2214 inside [0.8, 1.28]: unclipped
    [InlineData(-1.0, -1.2, 2.0, 0.2, 0.2, 0.0, -2.4, 0.0)]             // r > 1.2 with A > 0: clipped at 1.2 A, flat
    [InlineData(-1.6931472, -1.0, -1.0, 0.2, 0.2, 0.0, 0.8, 0.0)]       // r = 0.5 < 0.8 with A < 0: clipped at 0.8 A
    [InlineData(0.6094379, -1.0, -1.0, 0.2, 0.2, 3.0, 3.0, 0.0)]        // r = 5, A = -1: dual clip caps the loss at -3 A = 3
    [InlineData(0.6094379, -1.0, -1.0, 0.2, 0.2, 0.0, 5.0, 5.0)]        // without dual clip: loss = -r A = 5, grad = -r A = 5
    public void TokenLoss_ClipAndDualClip_MatchHandComputedValues(double logp, double old, double adv, float epsLow, float epsHigh, float dual, double loss, double grad)
    {
        var (l, g) = GrpoMath.TokenLoss(logp, old, null, adv, 1, new GrpoLossSettings(epsLow, epsHigh, dual));
        Assert.Equal(loss, l, 5);
        Assert.Equal(grad, g, 5);
    }

    [Fact]
    public void TokenLoss_KlEstimators_MatchHandComputedValues()
    {
        // logp = old (r = 1, A = 0): only the KL term; ref - logp = -0.5.
        var k3 = GrpoMath.TokenLoss(-1, -1, -1.5, 0, 1, new GrpoLossSettings(KlCoef: 1, Kl: KlEstimator.K3));
        Assert.Equal(Math.Exp(-0.5) + 0.5 - 1, k3.Loss, 10);   // 0.106531
        Assert.Equal(1 - Math.Exp(-0.5), k3.Grad, 10);          // 0.393469
        var k2 = GrpoMath.TokenLoss(-1, -1, -1.5, 0, 2, new GrpoLossSettings(KlCoef: 0.1f, Kl: KlEstimator.K2));
        Assert.Equal(2 * 0.1 * 0.5 * 0.25, k2.Loss, 6);         // weight 2, coef 0.1, d^2 / 2 = 0.125
        Assert.Equal(2 * 0.1 * 0.5, k2.Grad, 6);                // d/dlogp of (ref - logp)^2 / 2 = logp - ref = 0.5
        var clamped = GrpoMath.TokenLoss(-20, -20, -5, 0, 1, new GrpoLossSettings(KlCoef: 1, Kl: KlEstimator.K3)); // e^15: clamped at 10
        Assert.Equal(10, clamped.Loss, 10);
        Assert.Equal(0, clamped.Grad);
        var far = GrpoMath.TokenLoss(-20, -20, -5, 0, 1, new GrpoLossSettings(KlCoef: 1, Kl: KlEstimator.K2));     // k2 is not clamped
        Assert.Equal((112.5, -15.0), far);
    }

    [Fact]
    public void ClipIsActive_ExactlyWhereTheTokenGradientIsZero_AndTheDualClipApart()
    {
        // The clipped fraction counts a token when its clip holds its gradient at zero: ratio past 1 + eps_high with A > 0,
        // below 1 - eps_low with A < 0, or above the dual clip c with A < 0. Checked against the objective's own gradient
        // (GrpoMath.TokenLoss, no KL) over a sweep of ratios and both signs.
        var s = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, DualClip: 3f);
        int dual = 0, clipped = 0;
        foreach (double a in new[] { 1.3, -0.7 })
            for (double r = 0.05; r < 5; r += 0.01)
            {
                var state = GrpoMath.Clip(r, a, s);
                var (loss, grad) = GrpoMath.TokenLoss(Math.Log(r), 0, null, a, 1, s);
                Assert.True((state != ClipState.None) == (grad == 0), $"ratio {r:F2}, A {a}: {state}, gradient {grad}");
                Assert.True((state == ClipState.DualClipped) == (a < 0 && Math.Abs(loss - -3 * a) < 1e-12 && r > 3), $"ratio {r:F2}, A {a}: {state}, loss {loss}");
                dual += state == ClipState.DualClipped ? 1 : 0;
                clipped += state == ClipState.Clipped ? 1 : 0;
            }
        Assert.True(dual > 100 && clipped > 100, $"{dual} dual-clipped, {clipped} clipped: the sweep should reach every branch");
        // A ratio outside the band on the side that does not clip its sign is not clipped (counted before the fix).
        Assert.Equal(ClipState.None, GrpoMath.Clip(0.5, 1, s));
        Assert.Equal(ClipState.None, GrpoMath.Clip(1.5, -1, s));
        Assert.Equal(ClipState.DualClipped, GrpoMath.Clip(1.5, -1, s with { DualClip = 1.4f }));
        Assert.Equal(ClipState.None, GrpoMath.Clip(3, 0, s));   // no advantage: nothing to clip
    }

    [Fact]
    public void K1Penalty_EntersTheAdvantages_CentredInItsGroup_AtItsCoefficient()
    {
        // Groups of 3: task advantages plus -coef (k1 - the group's mean k1), by hand.
        double[] task = [1, -1, 0, 0, 0, 0];
        double[] k1 = [0.2, 0.5, 0.2, 1.0, 2.0, 3.0];
        var a = GrpoMath.PenalisedAdvantages(task, k1, 0.1, 3);
        double m1 = 0.3, m2 = 2.0;
        Assert.Equal([1 - 0.1 * (0.2 - m1), -1 - 0.1 * (0.5 - m1), -0.1 * (0.2 - m1), -0.1 * (1.0 - m2), 0, -0.1 * (3.0 - m2)], a,
            (x, y) => Math.Abs(x - y) < 1e-12);
        // A tied group keeps advantages of the penalty's size, not the 0.7 that dividing by its spread would give.
        Assert.All(a[3..], x => Assert.True(Math.Abs(x) <= 0.1 + 1e-12));
    }

    [Fact]
    public void SequenceWeights_OfUncountedSamples_AreOnTheCountedSamplesScale()
    {
        int[] lengths = [4, 2, 3, 5];
        bool[] counted = [true, false, true, false];
        var seq = GrpoMath.SequenceWeights(lengths, LossAggregation.SequenceMeanTokenMean, counted);
        Assert.Equal([1 / 8.0, 1 / 4.0, 1 / 6.0, 1 / 10.0], seq);                 // S = 2 counted sequences
        var tok = GrpoMath.SequenceWeights(lengths, LossAggregation.TokenMean, counted);
        Assert.All(tok, w => Assert.Equal(1 / 7.0, w));                          // N = 4 + 3 counted tokens
        Assert.Equal(GrpoMath.SequenceWeights(lengths, LossAggregation.TokenMean), GrpoMath.SequenceWeights(lengths, LossAggregation.TokenMean, [false, false, false, false]));
    }

    [Fact]
    public void KlTerm_PullsAPolicyTowardTheReference_ForK2K3AndTheK1RewardPenalty()
    {
        // A tabular policy over a 6-token vocabulary (one-token responses), trained with the KL term only (no task reward):
        // log-probs, sampling, GRPO advantages (with the k1 penalty, GrpoMath.PenalisedAdvantages) and the per-token loss
        // gradient are the trainer's (GrpoMath); the KL to the
        // reference is enumerated exactly over the vocabulary. k2 and k3 as loss terms and k1 as a reward penalty must
        // each bring KL(pi || ref) down; k1 as a loss term (what grpo.kl=k1 used to be) has zero expected gradient.
        const int v = 6, g = 16, steps = 300;
        double[] refLogits = [1.0, 0.2, -0.5, 0.8, -1.2, 0.0], start = [-1.0, 1.5, 0.7, -0.8, 0.9, -0.3];
        static double[] LogSoftmax(double[] x) { double m = x.Max(), z = Math.Log(x.Sum(y => Math.Exp(y - m))) + m; return x.Select(y => y - z).ToArray(); }
        var refLp = LogSoftmax(refLogits);
        double Kl(double[] logits) { var lp = LogSoftmax(logits); return lp.Select((l, i) => Math.Exp(l) * (l - refLp[i])).Sum(); }
        double before = Kl(start);

        double Train(string mode, int seed)
        {
            var logits = (double[])start.Clone();
            var rng = new Random(seed);
            for (int step = 0; step < steps; step++)
            {
                var lp = LogSoftmax(logits);
                var ys = Enumerable.Range(0, g).Select(_ =>
                {
                    double u = rng.NextDouble(), c = 0;
                    for (int k = 0; k < v; k++) { c += Math.Exp(lp[k]); if (u < c) return k; }
                    return v - 1;
                }).ToArray();
                var adv = GrpoMath.Advantages(new double[g], g, AdvantageMode.MeanStd);     // no task reward: all 0
                if (mode == "k1-penalty") adv = GrpoMath.PenalisedAdvantages(adv, ys.Select(y => lp[y] - refLp[y]).ToArray(), 0.5, g);
                var kl = mode switch { "k2" => KlEstimator.K2, "k3" => KlEstimator.K3, _ => KlEstimator.None };
                var settings = new GrpoLossSettings(KlCoef: kl == KlEstimator.None ? 0 : 0.5f, Kl: kl);
                var grad = new double[v];
                for (int i = 0; i < g; i++)
                {
                    int y = ys[i];
                    double dlogp = mode == "k1-loss" ? 0.5 / g : GrpoMath.TokenLoss(lp[y], lp[y], refLp[y], adv[i], 1.0 / g, settings).Grad;
                    for (int k = 0; k < v; k++) grad[k] += dlogp * ((k == y ? 1 : 0) - Math.Exp(lp[k]));   // d logp(y) / d logit_k
                }
                for (int k = 0; k < v; k++) logits[k] -= 0.5 * grad[k];
            }
            return Kl(logits);
        }
        foreach (var mode in new[] { "k2", "k3", "k1-penalty" })
        {
            double after = new[] { 1, 2, 3 }.Average(seed => Train(mode, seed));
            Assert.True(after < 0.25 * before, $"{mode}: KL(pi || ref) {before:F4} -> {after:F4}, expected a fall to under a quarter");
        }
        double k1Loss = new[] { 1, 2, 3 }.Average(seed => Train("k1-loss", seed));
        Assert.True(k1Loss > 0.5 * before, $"k1 as a loss term: KL {before:F4} -> {k1Loss:F4} (its expected gradient is zero; it should not pull toward the reference)");
    }

    private static (Tensor Hidden, Parameter Head, GrpoTokens Tokens) Problem(Backend b, int t, int d, int v, int seed)
    {
        var hidden = b.FromArray(TestData.Uniform(seed, t * d, 1.5f), DType.F32, [t, d]);
        var head = Parameter.Create(b, "lm_head.weight", [v, d], TestData.Uniform(seed + 1, v * d, 0.5f));
        var rng = new Random(seed + 2);
        var targets = Enumerable.Range(0, t).Select(i => i % 7 == 3 ? Backend.IgnoreIndex : rng.Next(v)).ToArray();
        var old = Enumerable.Range(0, t).Select(_ => (float)(-Math.Log(v) + rng.NextDouble() * 2 - 1)).ToArray();
        var refLp = old.Select(x => x + (float)(rng.NextDouble() - 0.5)).ToArray();
        var adv = Enumerable.Range(0, t).Select(i => (float)((i / 5) % 3 - 1) * 1.3f).ToArray();
        int[] lengths = [t / 4 + 1, t / 4 - 1, t / 4, t - 3 * (t / 4)]; // four sequences of unequal lengths
        var weights = GrpoMath.SequenceWeights(lengths, LossAggregation.SequenceMeanTokenMean);
        var w = new float[t];
        int at = 0;
        for (int s = 0; s < 4; s++) for (int i = 0; i < lengths[s]; i++) w[at++] = (float)weights[s];
        return (hidden, head, new GrpoTokens(targets, old, adv, w, refLp));
    }

    [Theory]
    [InlineData(128, 0.7f)]
    [InlineData(5000, 1f)]
    public void TokenLogProbs_EqualTheFullSoftmaxAtTheTemperature(int chunk, float temperature)
    {
        var settings = new GrpoLossSettings(Temperature: temperature);
        var (hidden, head, tokens) = Problem(_b, 37, 24, 1000, 5);
        using var _h = hidden;
        using var _w = head;
        using var unfused = FusedGrpoLoss.Unfused(_b, hidden, head, tokens, settings); // log softmax(logits / T) over all V
        var logp = FusedGrpoLoss.TokenLogProbs(_b, hidden, head, tokens.Targets, temperature, chunk);
        for (int i = 0; i < tokens.Targets.Length; i++)
            if (tokens.Targets[i] < 0) Assert.Equal(0f, logp[i]);
            else Assert.True(Math.Abs(unfused.LogProbs[i] - logp[i]) < 1e-5, $"position {i}: {logp[i]} vs {unfused.LogProbs[i]}");
    }

    [Theory]
    [InlineData(128, KlEstimator.K3)]
    [InlineData(333, KlEstimator.K3)]
    [InlineData(5000, KlEstimator.K3)]
    [InlineData(333, KlEstimator.K2)]
    public void FusedLoss_EqualsTheUnfusedComposition(int chunk, KlEstimator kl)
    {
        var settings = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, DualClip: 3f, KlCoef: 0.05f, Kl: kl, Temperature: 0.7f);
        var (hidden, head, tokens) = Problem(_b, 37, 24, 1000, 3);
        using var _h = hidden;
        using var _w = head;
        using var fused = FusedGrpoLoss.Fused(_b, hidden, head, tokens, settings, chunk);
        var fusedHead = head.Grad!.ToFloatArray();
        head.ZeroGrad();
        using var unfused = FusedGrpoLoss.Unfused(_b, hidden, head, tokens, settings);
        Assert.Equal(unfused.Loss, fused.Loss, 5);
        Check.Close(TestData.ToDouble(unfused.LogProbs), fused.LogProbs, 1e-5, 1e-5, "logp");
        Assert.True(Check.RelativeL2(TestData.ToDouble(unfused.HiddenGrad.ToFloatArray()), fused.HiddenGrad.ToFloatArray()) < 1e-5, "d hidden");
        Assert.True(Check.RelativeL2(TestData.ToDouble(head.Grad!.ToFloatArray()), fusedHead) < 1e-5, "d head");
    }

    [Fact]
    public void FusedLoss_HiddenGradient_MatchesFiniteDifferences()
    {
        var settings = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, KlCoef: 0.1f, Kl: KlEstimator.K3, Temperature: 0.9f);
        var (hidden, head, tokens) = Problem(_b, 12, 8, 50, 9);
        using var _h = hidden;
        using var _w = head;
        // Old log-probs near the current ones keep every token on the smooth (unclipped) branch for the probe.
        using (var probe = FusedGrpoLoss.Unfused(_b, hidden, head, tokens, settings))
            tokens = tokens with { OldLogProbs = probe.LogProbs.Select(x => x + 0.01f).ToArray() };
        using var fused = FusedGrpoLoss.Fused(_b, hidden, head, tokens, settings, vocabChunk: 16);
        var h = hidden.ToFloatArray();
        FiniteDifference.CheckGradient(x =>
        {
            using var t = _b.FromArray(x, DType.F32, [12, 8]);
            using var r = FusedGrpoLoss.Fused(_b, t, head, tokens, settings, 16);
            return r.Loss;
        }, h, fused.HiddenGrad.ToFloatArray(), "d loss / d hidden", samples: 16, h: 1e-2f, tolerance: 2e-3);
    }

    [Fact]
    public void FusedLoss_PeakMemory_IsFarBelowTheUnfusedPath()
    {
        var settings = new GrpoLossSettings();
        long Peak(bool fused)
        {
            using var b = new CpuBackend();
            var (hidden, head, tokens) = Problem(b, 256, 64, 32000, 5);
            using var _h = hidden;
            using var _w = head;
            b.Synchronize();
            long before = b.Memory.BytesInUse;
            using var r = fused ? FusedGrpoLoss.Fused(b, hidden, head, tokens, settings, 2048) : FusedGrpoLoss.Unfused(b, hidden, head, tokens, settings);
            return b.Memory.PeakBytesInUse - before;
        }
        long fusedPeak = Peak(true), unfusedPeak = Peak(false);
        long logitsBytes = 256L * 32000 * 4;
        Assert.True(unfusedPeak >= logitsBytes, $"the unfused path should hold [T, V] logits ({logitsBytes} B), peak {unfusedPeak}");
        Assert.True(fusedPeak < logitsBytes / 8, $"fused peak {fusedPeak} B should be a small fraction of the {logitsBytes} B of logits");
    }
}
