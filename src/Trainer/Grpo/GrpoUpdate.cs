using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer.Grpo;

/// <summary>Statistics of one GRPO policy update.</summary>
/// <remarks><see cref="Kl"/> is the mean k3 estimate of KL(policy || reference) over response tokens, null without a reference.</remarks>
public sealed record GrpoUpdateStats(double Loss, int Sequences, int Tokens, double MeanRatio, double ClippedFraction, double MeanLogProbChange, double? Kl = null);

/// <summary>
/// One GRPO policy update on a batch of rollouts: the rollouts are packed (prompt + response, images included), a
/// forward runs to the final hidden states, the fused LM-head loss gives per-token log-probs and d loss / d hidden for
/// the response tokens (old log-probs from generation, one advantage per sequence, the chosen aggregation), and the
/// backward fills the trainable parameters' gradients. The caller steps the optimiser.
/// </summary>
public sealed class GrpoUpdate(VisionLanguageModel model, GrpoLossSettings settings, LossAggregation aggregation = LossAggregation.SequenceMeanTokenMean,
    int vocabChunk = 8192)
{
    public GrpoUpdateStats Accumulate(IReadOnlyList<Rollout> rollouts, IReadOnlyList<float[]>? referenceLogProbs = null)
    {
        if (rollouts.Count == 0) throw new ArgumentException("an update needs at least one rollout");
        var (batch, starts) = Rollout.Pack(rollouts, model.ImageContextId);
        var targets = batch.Targets;
        int total = targets.Length;
        float[] old = new float[total], adv = new float[total], weights = new float[total];
        var refs = referenceLogProbs is null ? null : new float[total];
        var seqWeights = GrpoMath.SequenceWeights(rollouts.Select(r => r.Response.Length).ToList(), aggregation);
        for (int i = 0; i < rollouts.Count; i++)
        {
            var r = rollouts[i];
            if (r.OldLogProbs.Length != r.Response.Length) throw new ArgumentException($"rollout {i}: {r.OldLogProbs.Length} old log-probs for {r.Response.Length} response tokens");
            if (referenceLogProbs is not null && referenceLogProbs[i].Length != r.Response.Length)
                throw new ArgumentException($"rollout {i}: {referenceLogProbs[i].Length} reference log-probs for {r.Response.Length} response tokens");
            for (int k = 0; k < r.Response.Length; k++)
            {
                int at = starts[i] + k;
                old[at] = r.OldLogProbs[k];
                adv[at] = (float)r.Advantage;
                weights[at] = (float)seqWeights[i];
                if (refs is not null) refs[at] = referenceLogProbs![i][k];
            }
        }
        using var pass = model.Forward(batch, withLoss: false);
        var tokens = new GrpoTokens(targets, old, adv, weights, refs);
        using var result = FusedGrpoLoss.Fused(model.Backend, pass.Hidden, model.LmHead, tokens, settings, vocabChunk);
        model.BackwardFromHidden(pass, result.HiddenGrad);

        int n = 0, clipped = 0;
        double ratioSum = 0, change = 0, kl = 0;
        for (int t = 0; t < targets.Length; t++)
        {
            if (targets[t] < 0) continue;
            double ratio = Math.Exp(result.LogProbs[t] - old[t]);
            ratioSum += ratio;
            change += result.LogProbs[t] - old[t];
            if (refs is not null)
            {
                double d = refs[t] - result.LogProbs[t];
                kl += Math.Exp(d) - d - 1;
            }
            if (ratio < 1 - settings.EpsLow || ratio > 1 + settings.EpsHigh) clipped++;
            n++;
        }
        return new GrpoUpdateStats(result.Loss, rollouts.Count, n, ratioSum / Math.Max(1, n), clipped / (double)Math.Max(1, n), change / Math.Max(1, n),
            refs is null ? null : kl / Math.Max(1, n));
    }
}
