using R1V2.Native.Engine.Backends;

namespace R1V2.Native.Trainer.Grpo;

public enum AdvantageMode { MeanStd, MeanOnly, LeaveOneOut }

public enum LossAggregation { SequenceMeanTokenMean, TokenMean }

/// <summary>Which bound of the clipped objective holds a token's gradient at zero, if any.</summary>
public enum ClipState { None, Clipped, DualClipped }

/// <summary>The GRPO formulas on the host, in double: group advantages, token weights, and the per-token objective.</summary>
public static class GrpoMath
{
    /// <summary>
    /// Advantages of <paramref name="rewards"/> laid out as consecutive groups of <paramref name="groupSize"/> (the G
    /// samples of one prompt). MeanStd: (r - mean) / (std + eps) with the unbiased std (n - 1), as TRL and verl;
    /// MeanOnly: r - mean (Dr.GRPO); LeaveOneOut: r - mean of the other samples.
    /// </summary>
    public static double[] Advantages(IReadOnlyList<double> rewards, int groupSize, AdvantageMode mode, double eps = 1e-6)
    {
        if (groupSize < 1 || rewards.Count % groupSize != 0) throw new ArgumentException($"{rewards.Count} rewards are not whole groups of {groupSize}");
        var a = new double[rewards.Count];
        for (int g = 0; g < rewards.Count; g += groupSize)
        {
            double sum = 0;
            for (int i = 0; i < groupSize; i++) sum += rewards[g + i];
            double mean = sum / groupSize;
            double var = 0;
            for (int i = 0; i < groupSize; i++) var += Math.Pow(rewards[g + i] - mean, 2);
            double std = groupSize > 1 ? Math.Sqrt(var / (groupSize - 1)) : 0;
            bool tied = true;
            for (int i = 1; i < groupSize; i++) tied &= rewards[g + i] == rewards[g];
            for (int i = 0; i < groupSize; i++)
                if (tied) a[g + i] = 0; // exactly: a rounded mean would leave r - mean of about 1e-16, over std + eps
                else
                a[g + i] = mode switch
                {
                    AdvantageMode.MeanStd => (rewards[g + i] - mean) / (std + eps),
                    AdvantageMode.MeanOnly => rewards[g + i] - mean,
                    AdvantageMode.LeaveOneOut => groupSize > 1 ? rewards[g + i] - (sum - rewards[g + i]) / (groupSize - 1) : 0,
                    _ => throw new ArgumentOutOfRangeException(nameof(mode)),
                };
        }
        return a;
    }

    /// <summary>
    /// Per-token weights that turn the sum of token losses into the chosen mean: sequence-mean of token-means
    /// (1 / (S |y_i|), the paper) or the mean over all tokens (1 / N, DAPO). lengths: response tokens per sequence.
    /// <paramref name="counted"/>: which sequences S and N count (the ones with a policy-gradient term); the others (the
    /// zero-advantage samples a KL term keeps in the update) get weights on the same scale, so adding them leaves the
    /// policy gradient as it was. Null: all count.
    /// </summary>
    /// <param name="acrossRanks">Data parallel: sums the counts [S, N, all sequences, all tokens] over the ranks whose
    /// sequences make up the loss's batch (each rank holds its share); null: these sequences are the whole batch.</param>
    public static double[] SequenceWeights(IReadOnlyList<int> lengths, LossAggregation aggregation, IReadOnlyList<bool>? counted = null,
        Func<double[], double[]>? acrossRanks = null)
    {
        if (counted is not null && counted.Count != lengths.Count) throw new ArgumentException($"{counted.Count} flags for {lengths.Count} sequences");
        var idx = Enumerable.Range(0, lengths.Count).Where(i => counted is null || counted[i]).ToList();
        double[] totals = [idx.Count, idx.Sum(i => (double)lengths[i]), lengths.Count, lengths.Sum(n => (double)n)];
        if (acrossRanks is not null) totals = acrossRanks(totals);
        // Only KL terms anywhere: their own mean.
        var (s, total) = totals[0] > 0 ? (totals[0], totals[1]) : (totals[2], totals[3]);
        return lengths.Select(n => n == 0 ? 0 : aggregation == LossAggregation.SequenceMeanTokenMean ? 1.0 / (s * n) : 1.0 / Math.Max(1, total)).ToArray();
    }

    /// <summary>
    /// The k1 reward penalty in the advantages: A_i - coef (k1_i - mean of k1 over the group), with A_i the group
    /// advantage of the task rewards and k1_i = sum over the response of log pi_old - log pi_ref (PPO-RLHF's penalty,
    /// whose expectation is KL(pi || ref)). It is the penalty subtracted from the reward before a mean-only advantage;
    /// it enters after the std division of mean_std advantages, so the coefficient keeps its meaning: divided by a
    /// group's reward spread, a penalty difference of 1e-3 nat in a group whose task rewards tie would become an
    /// advantage of about 0.7.
    /// </summary>
    public static double[] PenalisedAdvantages(IReadOnlyList<double> taskAdvantages, IReadOnlyList<double> k1, double coef, int groupSize)
    {
        if (k1.Count != taskAdvantages.Count || groupSize < 1 || k1.Count % groupSize != 0)
            throw new ArgumentException($"{k1.Count} penalties for {taskAdvantages.Count} advantages in groups of {groupSize}");
        var a = new double[k1.Count];
        for (int g = 0; g < k1.Count; g += groupSize)
        {
            double mean = 0;
            for (int i = 0; i < groupSize; i++) mean += k1[g + i] / groupSize;
            for (int i = 0; i < groupSize; i++) a[g + i] = taskAdvantages[g + i] - coef * (k1[g + i] - mean);
        }
        return a;
    }

    /// <summary>
    /// Whether a token's clip is active: the ratio above 1 + eps_high with A &gt; 0 or below 1 - eps_low with A &lt; 0
    /// (the clipped branch is the minimum), or, for A &lt; 0, the dual clip c A bounding the loss (ratio above c). A
    /// ratio outside the band on the side that does not clip its advantage's sign still has a gradient: not counted.
    /// </summary>
    public static ClipState Clip(double ratio, double advantage, GrpoLossSettings s)
    {
        if (advantage < 0 && s.DualClip > 1 && ratio > s.DualClip) return ClipState.DualClipped;
        return (advantage > 0 && ratio > 1 + s.EpsHigh) || (advantage < 0 && ratio < 1 - s.EpsLow) ? ClipState.Clipped : ClipState.None;
    }

    /// <summary>One token's loss and d loss / d logp: weight (-J + beta KL), J the clipped (and dual-clipped) objective.</summary>
    public static (double Loss, double Grad) TokenLoss(double logp, double oldLogp, double? refLogp, double advantage, double weight, GrpoLossSettings s)
    {
        double r = Math.Exp(logp - oldLogp);
        double unclipped = r * advantage, clipped = Math.Clamp(r, 1 - s.EpsLow, 1 + s.EpsHigh) * advantage;
        double j = Math.Min(unclipped, clipped), dj = unclipped <= clipped ? r * advantage : 0;
        if (s.DualClip > 1 && advantage < 0 && s.DualClip * advantage > j) { j = s.DualClip * advantage; dj = 0; }
        double kl = 0, dkl = 0;
        if (s.Kl != KlEstimator.None)
        {
            double d = (refLogp ?? throw new ArgumentException("a KL penalty needs a reference log-prob")) - logp;
            (kl, dkl) = s.Kl == KlEstimator.K2 ? (0.5 * d * d, -d) : (Math.Exp(d) - d - 1, 1 - Math.Exp(d));
            // k3's exponential is clamped (as verl's low-variance KL); k2 is not: its gradient grows with the drift.
            if (s.Kl == KlEstimator.K3 && (kl > 10 || kl < -10)) { kl = Math.Clamp(kl, -10, 10); dkl = 0; }
        }
        return (weight * (-j + s.KlCoef * kl), weight * (-dj + s.KlCoef * dkl));
    }
}
