using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Parallel;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer.Grpo;

/// <summary>What a step's policy update did: loss per optimiser step and token means over every rank's rollouts.</summary>
public sealed record PolicyStepResult(double Loss, double GradNorm, int OptimizerSteps, int Skipped, int MicroBatches, long Tokens, double MeanRatio,
    double ClippedFraction, double DualClippedFraction, double? Kl);

/// <summary>
/// The policy update of one GRPO step over this rank's rollouts: <c>minibatches</c> micro-batches, every
/// <c>gradAccum</c> of them one optimiser step whose loss is the mean over all of its rollouts, on every data-parallel
/// rank together. The rollouts with a policy-gradient term are split front first, and the KL-only ones (zero advantage,
/// kept for a KL term) spread over the same micro-batches. Data parallel: micro-batch i of the step is micro-batch i of
/// every rank; a step's token weights come from the counts of all its rollouts on all ranks before its first backward
/// (<see cref="GrpoMath.SequenceWeights"/>); the optimiser sums the gradients over the ranks before the norm, the clip
/// and AdamW (<see cref="AdamWOptimizer"/>);
/// a rank with nothing in a micro-batch still joins its collectives. One rank with the whole batch and R ranks with
/// its shares take the same step.
/// </summary>
public sealed class GrpoPolicyStep(GrpoUpdate update, LossAggregation aggregation, int minibatches, int gradAccum, DataParallel dataParallel)
{
    /// <param name="withGradient">This rank's rollouts with a policy-gradient term (they count in the loss's mean).</param>
    /// <param name="klOnly">This rank's rollouts kept for a KL term only (weighted on the same scale, not counted).</param>
    /// <param name="referenceLogProbs">The frozen reference's log-probs of a micro-batch (a k2/k3 loss term), or null.</param>
    /// <param name="optimizerStep">Steps the optimiser after the gradients are summed (the non-finite guard, the learning rate).</param>
    public PolicyStepResult Run(IReadOnlyList<Rollout> withGradient, IReadOnlyList<Rollout> klOnly, Func<IReadOnlyList<Rollout>, IReadOnlyList<float[]>>? referenceLogProbs,
        AdamWOptimizer optimizer, Func<StepReport> optimizerStep)
    {
        var dp = dataParallel;
        var counted = new HashSet<Rollout>(withGradient, ReferenceEqualityComparer.Instance);
        static List<Rollout> Part(IReadOnlyList<Rollout> list, int i, int parts)
        {
            int per = (list.Count + parts - 1) / parts;
            return [.. list.Skip(i * per).Take(per)];
        }
        var slots = Enumerable.Range(0, minibatches).Select(i => (IReadOnlyList<Rollout>)[.. Part(withGradient, i, minibatches), .. Part(klOnly, i, minibatches)]).ToList();
        // Empty micro-batches are trailing on every rank; the step runs as many as the fullest rank has.
        int used = slots.Count(s => s.Count > 0);
        used = (int)dp.Max(used)[0];
        double gradNorm = 0;
        var stepLosses = new List<double>();
        int steps = 0, skipped = 0;
        // Sums over this rank's micro-batches of token-weighted statistics: tokens, ratio, clipped, dual-clipped, k3.
        var sums = new double[5];
        foreach (var accumulated in slots.Take(used).Chunk(gradAccum))
        {
            var members = accumulated.SelectMany(c => c).ToList();
            var weights = GrpoMath.SequenceWeights(members.Select(r => r.Response.Length).ToList(), aggregation, members.Select(counted.Contains).ToList(),
                dp.Ranks == 1 ? null : dp.Sum);
            optimizer.ZeroGrad();
            int offset = 0, last = Array.FindLastIndex(accumulated, c => c.Count > 0);
            double stepLoss = 0;
            foreach (var (chunk, index) in accumulated.Select((c, i) => (c, i)))
            {
                if (chunk.Count == 0) continue;
                dp.FinalBackward = index == last;   // this rank's last backward before the step: its gradients may start their sums
                var stats = update.Accumulate(chunk, referenceLogProbs?.Invoke(chunk), weights[offset..(offset + chunk.Count)]);
                offset += chunk.Count;
                stepLoss += stats.Loss;
                sums[0] += stats.Tokens;
                sums[1] += stats.MeanRatio * stats.Tokens;
                sums[2] += stats.ClippedFraction * stats.Tokens;
                sums[3] += stats.DualClippedFraction * stats.Tokens;
                sums[4] += (stats.Kl ?? 0) * stats.Tokens;
            }
            stepLosses.Add(stepLoss);
            // The optimiser sums the gradients over the ranks first; the step losses are summed after the last step (a
            // blocking sum here could meet another rank's gradient buckets, still in flight, on the same communicator).
            var report = optimizerStep();
            if (report.Skipped) skipped++;
            gradNorm += report.GradNorm;
            steps++;
        }
        double loss = (dp.Ranks == 1 ? [.. stepLosses] : dp.Sum([.. stepLosses])).Sum();
        if (dp.Ranks > 1) sums = dp.Sum(sums);
        double n = Math.Max(1, sums[0]), o = Math.Max(1, steps);
        return new PolicyStepResult(loss / o, gradNorm / o, steps, skipped, used, (long)sums[0], sums[1] / n, sums[2] / n, sums[3] / n,
            referenceLogProbs is null ? null : sums[4] / n);
    }
}
