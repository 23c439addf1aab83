using R1V2.Native.Trainer.Mpo;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Tests.Trainer;

public sealed class SsbAndMpoTests
{
    private static Rollout R(int prompt, double advantage, int born) => new(prompt, [1, 2], null, 0, [3], [-0.5f], 0, advantage, born);

    [Fact]
    public void Build_DropsZeroAdvantage_KeepsInformative_AndTopsUpFromTheBuffer()
    {
        var ssb = new SelectiveSampleBuffer(capacity: 10, maxAge: 5, seed: 1);
        var step0 = new[] { R(0, 0.8, 0), R(0, -0.8, 0), R(1, 0, 0), R(1, 0, 0) };
        var b0 = ssb.Build(step0, targetSize: 4, step: 0);
        Assert.Equal(2, b0.Fresh);
        Assert.Equal(0, b0.Replayed);        // the buffer was empty; this step's two informative samples enter it after
        Assert.Equal(0.5, b0.EffectiveRatio);
        Assert.Equal(2, ssb.Count);
        var step1 = new[] { R(2, 0, 1), R(2, 0, 1), R(3, 1.2, 1), R(3, -1.2, 1) };
        var b1 = ssb.Build(step1, targetSize: 4, step: 1);
        Assert.Equal(2, b1.Fresh);
        Assert.Equal(2, b1.Replayed);        // both earlier samples fill the two empty slots
        Assert.Equal(1.0, b1.EffectiveRatio);
        Assert.All(b1.Samples, s => Assert.NotEqual(0, s.Advantage));
    }

    [Fact]
    public void Buffer_EvictsTheOldestBeyondCapacity_AndExpiresByAge()
    {
        var ssb = new SelectiveSampleBuffer(capacity: 3, maxAge: 2, seed: 2);
        ssb.Build([R(0, 1, 0), R(1, 1, 0)], 0, 0);
        ssb.Build([R(2, 1, 1), R(3, 1, 1)], 0, 1);
        Assert.Equal(3, ssb.Count);
        Assert.DoesNotContain(ssb.Items, r => r.Prompt == 0);                 // capacity: the oldest left first
        ssb.Build([], 0, 4);                                                  // born 1 < 4 - 2: expired
        Assert.Equal(0, ssb.Count);
    }

    [Fact]
    public void Draw_PicksWithProbabilityProportionalToAbsoluteAdvantage()
    {
        double[] adv = [0.1, -0.4, 1.5, -2.0];
        var counts = new double[adv.Length];
        const int draws = 20000;
        for (int i = 0; i < draws; i++)
        {
            var ssb = new SelectiveSampleBuffer(10, 100, seed: (ulong)i * 2654435761);
            ssb.Restore((ulong)i * 2654435761, adv.Select((a, j) => R(j, a, 0)));
            counts[ssb.Draw(1)[0].Prompt]++;
        }
        double total = adv.Sum(Math.Abs);
        // Chi-square, 3 degrees of freedom, false-failure rate 1e-6: critical value 30.66.
        double chi2 = adv.Select((a, j) => Math.Pow(counts[j] - draws * Math.Abs(a) / total, 2) / (draws * Math.Abs(a) / total)).Sum();
        Assert.True(chi2 < 30.66, $"chi-square {chi2:F1}: counts [{string.Join(", ", counts)}] are not proportional to |A|");
    }

    [Fact]
    public void Snapshot_RestoresTheSameFutureDraws()
    {
        var a = new SelectiveSampleBuffer(10, 10, 7);
        a.Build([R(0, 1, 0), R(1, -2, 0), R(2, 0.5, 0)], 0, 0);
        var (rng, items) = a.Snapshot();
        var b = new SelectiveSampleBuffer(10, 10, 99);
        b.Restore(rng, items);
        Assert.Equal(a.Draw(2).Select(r => r.Prompt), b.Draw(2).Select(r => r.Prompt));
    }

    [Fact]
    public void DynamicSampling_StopsAtTheTarget_OrAfterTheRoundLimit()
    {
        IReadOnlyList<IReadOnlyList<Rollout>> Round(int k) => [[R(k, 0, 0), R(k, 0, 0)], [R(k, 1, 0), R(k, -1, 0)]];
        var (groups, rounds) = DynamicSampling.Fill(Round, targetGroups: 3, maxRounds: 10);
        Assert.Equal(3, groups.Count);
        Assert.Equal(3, rounds);
        Assert.Equal(2, DynamicSampling.Fill(Round, 5, 2).Groups.Count);
        Assert.False(DynamicSampling.Informative([1, 1, 1, 1]));
        Assert.True(DynamicSampling.Informative([1, 0, 1, 1]));
    }

    [Fact]
    public void MpoLoss_MatchesHandComputedValues()
    {
        // beta 0.1; chosen: logp -10, ref -12 (lr 2, 5 tokens); rejected: logp -15, ref -14 (lr -1); delta 0.05.
        var l = MpoMath.Loss(-10, -12, 5, -15, -14, beta: 0.1, delta: 0.05);
        Assert.Equal(-Math.Log(1 / (1 + Math.Exp(-0.3))), l.Preference, 10);                 // 0.554355
        Assert.Equal(2 * -Math.Log(1 / (1 + Math.Exp(-0.15))), l.Quality, 10);              // 1.241912
        Assert.Equal(2.0, l.Generation, 10);
        Assert.Equal(0.8 * 0.554355 + 0.2 * 1.241912 + 2.0, l.Loss, 5);                     // 2.691866
        Assert.Equal(-Math.Log(1 / (1 + Math.Exp(-1.0))), MpoMath.BradleyTerry(1, 0).Loss, 10); // 0.313262
    }

    [Fact]
    public void MpoLoss_GradientsMatchFiniteDifferences()
    {
        const double h = 1e-6;
        var l = MpoMath.Loss(-10, -12, 5, -15, -14, 0.3, 0.2);
        double dc = (MpoMath.Loss(-10 + h, -12, 5, -15, -14, 0.3, 0.2).Loss - MpoMath.Loss(-10 - h, -12, 5, -15, -14, 0.3, 0.2).Loss) / (2 * h);
        double dr = (MpoMath.Loss(-10, -12, 5, -15 + h, -14, 0.3, 0.2).Loss - MpoMath.Loss(-10, -12, 5, -15 - h, -14, 0.3, 0.2).Loss) / (2 * h);
        Assert.Equal(dc, l.GradChosen, 6);
        Assert.Equal(dr, l.GradRejected, 6);
        var bt = MpoMath.BradleyTerry(0.7, -0.2);
        double dbt = (MpoMath.BradleyTerry(0.7 + h, -0.2).Loss - MpoMath.BradleyTerry(0.7 - h, -0.2).Loss) / (2 * h);
        Assert.Equal(dbt, bt.GradChosen, 6);
    }

    [Fact]
    public void BcoDelta_IsTheRunningMeanOfEveryImplicitReward_TheCurrentBatchIncluded()
    {
        // Three batches of implicit rewards beta lr(y), chosen and rejected of each pair, by hand:
        // after batch 1: (0.4 - 0.2) / 2 = 0.1; after 2: (0.4 - 0.2 + 1.0 + 0.6 + 0.2 - 0.4) / 6 = 1.6 / 6;
        // after 3: (1.6 + 2.0 + 0.0) / 8 = 0.45. (The old EMA with decay 0.99 from 0 gave 0.001, 0.0036, 0.0136.)
        var d = new BcoDelta();
        d.Update([0.4, -0.2]);
        Assert.Equal(0.1, d.Value, 12);
        d.Update([1.0, 0.6, 0.2, -0.4]);
        Assert.Equal(1.6 / 6, d.Value, 12);
        d.Update([2.0, 0.0]);
        Assert.Equal(0.45, d.Value, 12);
        Assert.Equal(8, d.Count);
        var restored = new BcoDelta();
        restored.Restore(d.Count, d.Value);
        restored.Update([1.35]);
        d.Update([1.35]);
        Assert.Equal((d.Count, d.Value), (restored.Count, restored.Value));
        Assert.Equal(0.55, d.Value, 12);  // (3.6 + 1.35) / 9
    }
}
