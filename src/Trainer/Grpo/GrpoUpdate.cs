using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer.Grpo;

/// <summary>Statistics of one GRPO policy update.</summary>
/// <remarks><see cref="Kl"/> is the mean k3 estimate of KL(policy || reference) over response tokens, null without a reference.
/// <see cref="Distinct"/> is how many sequences the forward and backward ran: identical rollouts run once.
/// <see cref="ClippedFraction"/> is the share of response tokens whose clip is active (<see cref="GrpoMath.Clip"/>: the
/// ratio past 1 + eps_high with A &gt; 0, below 1 - eps_low with A &lt; 0, or the dual clip), <see cref="DualClippedFraction"/>
/// the share where the dual clip is.</remarks>
public sealed record GrpoUpdateStats(double Loss, int Sequences, int Tokens, double MeanRatio, double ClippedFraction, double MeanLogProbChange, double? Kl,
    int Distinct, double DualClippedFraction = 0);

/// <summary>
/// One GRPO policy update on a batch of rollouts: the rollouts are packed (prompt + response, images included), a
/// forward runs to the final hidden states, the fused LM-head loss gives per-token log-probs and d loss / d hidden for
/// the response tokens (old log-probs from generation, one advantage per sequence, the chosen aggregation), and the
/// backward fills the trainable parameters' gradients. The caller steps the optimiser.
/// <para>
/// A confident policy samples the same response several times in a group (at temperature 0.6 the digit model's 4
/// samples of a prompt held 1.7 distinct responses on average). Rollouts with the same prompt, image, response, old
/// log-probs, advantage and reference log-probs have identical token losses, so each distinct one is packed once with
/// its token weights multiplied by its count: the same loss and gradient as packing every copy, for a fraction of the
/// forward and backward. The distinct rollouts of a prompt then share its rows (<see cref="SharePrompts"/>).
/// </para>
/// <para>vocabLimit: the tokenizer's id count when the LM head is wider (the softmax the sampler drew from; see
/// <see cref="FusedGrpoLoss"/>).</para>
/// </summary>
public sealed class GrpoUpdate(VisionLanguageModel model, GrpoLossSettings settings, LossAggregation aggregation = LossAggregation.SequenceMeanTokenMean,
    int vocabChunk = 8192, int? vocabLimit = null)
{
    /// <summary>
    /// Rollouts of one prompt compute its rows once (<see cref="VlmBatch.PackShared"/>; on by default): the same loss
    /// and gradient up to the order of float sums.
    /// </summary>
    public bool SharePrompts { get; init; } = true;

    /// <param name="sequenceWeights">
    /// Each rollout's token weight (<see cref="GrpoMath.SequenceWeights"/>) when the loss is a mean over more rollouts than
    /// this call holds (gradient accumulation: the weights of the whole accumulated batch); null: the mean over these.
    /// </param>
    public GrpoUpdateStats Accumulate(IReadOnlyList<Rollout> rollouts, IReadOnlyList<float[]>? referenceLogProbs = null,
        IReadOnlyList<double>? sequenceWeights = null)
    {
        if (rollouts.Count == 0) throw new ArgumentException("an update needs at least one rollout");
        for (int i = 0; i < rollouts.Count; i++)
        {
            var r = rollouts[i];
            if (r.OldLogProbs.Length != r.Response.Length) throw new ArgumentException($"rollout {i}: {r.OldLogProbs.Length} old log-probs for {r.Response.Length} response tokens");
            if (referenceLogProbs is not null && referenceLogProbs[i].Length != r.Response.Length)
                throw new ArgumentException($"rollout {i}: {referenceLogProbs[i].Length} reference log-probs for {r.Response.Length} response tokens");
        }
        // Weights over every rollout (the mean the loss is), then the distinct rollouts with their counts.
        if (sequenceWeights is not null && sequenceWeights.Count != rollouts.Count)
            throw new ArgumentException($"{sequenceWeights.Count} sequence weights for {rollouts.Count} rollouts");
        var seqWeights = sequenceWeights ?? GrpoMath.SequenceWeights(rollouts.Select(r => r.Response.Length).ToList(), aggregation);
        var firstOf = new Dictionary<RolloutKey, int>();
        var distinct = new List<int>();
        var count = new List<int>();
        for (int i = 0; i < rollouts.Count; i++)
        {
            var key = new RolloutKey(rollouts[i], referenceLogProbs?[i]);
            if (firstOf.TryGetValue(key, out int d)) { count[d]++; continue; }
            firstOf[key] = distinct.Count;
            distinct.Add(i);
            count.Add(1);
        }
        var packedRollouts = distinct.Select(i => rollouts[i]).ToList();
        var (batch, starts) = SharePrompts ? Rollout.PackShared(packedRollouts, model.ImageContextId) : Rollout.Pack(packedRollouts, model.ImageContextId);
        var targets = batch.Targets;
        int total = targets.Length;
        float[] old = new float[total], adv = new float[total], weights = new float[total];
        var copies = new int[total];
        var refs = referenceLogProbs is null ? null : new float[total];
        for (int d = 0; d < distinct.Count; d++)
        {
            int i = distinct[d];
            var r = rollouts[i];
            for (int k = 0; k < r.Response.Length; k++)
            {
                int at = starts[d] + k;
                old[at] = r.OldLogProbs[k];
                adv[at] = (float)r.Advantage;
                weights[at] = (float)(seqWeights[i] * count[d]);
                copies[at] = count[d];
                if (refs is not null) refs[at] = referenceLogProbs![i][k];
            }
        }
        using var pass = model.Forward(batch, withLoss: false);
        var tokens = new GrpoTokens(targets, old, adv, weights, refs);
        using var result = FusedGrpoLoss.Fused(model.Backend, pass.Hidden, model.LmHead, tokens, settings, vocabChunk, vocabLimit, model.TensorParallel);
        model.BackwardFromHidden(pass, result.HiddenGrad);

        // Token statistics over every rollout: a distinct token counts once per copy.
        long n = 0, clipped = 0, dualClipped = 0;
        double ratioSum = 0, change = 0, kl = 0;
        for (int t = 0; t < targets.Length; t++)
        {
            if (targets[t] < 0) continue;
            int c = copies[t];
            double ratio = Math.Exp(result.LogProbs[t] - old[t]);
            ratioSum += c * ratio;
            change += c * (result.LogProbs[t] - old[t]);
            if (refs is not null)
            {
                double dl = refs[t] - result.LogProbs[t];
                kl += c * (Math.Exp(dl) - dl - 1);
            }
            var clip = GrpoMath.Clip(ratio, adv[t], settings);
            if (clip != ClipState.None) clipped += c;
            if (clip == ClipState.DualClipped) dualClipped += c;
            n += c;
        }
        return new GrpoUpdateStats(result.Loss, rollouts.Count, (int)n, ratioSum / Math.Max(1, n), clipped / (double)Math.Max(1, n), change / Math.Max(1, n),
            refs is null ? null : kl / Math.Max(1, n), distinct.Count, dualClipped / (double)Math.Max(1, n));
    }

    /// <summary>What makes two rollouts' token losses identical: prompt, image, response, old log-probs, advantage, reference log-probs.</summary>
    private readonly struct RolloutKey(Rollout r, float[]? reference) : IEquatable<RolloutKey>
    {
        private readonly Rollout _r = r;
        private readonly float[]? _ref = reference;

        public bool Equals(RolloutKey o) =>
            _r.Advantage.Equals(o._r.Advantage) && _r.Tiles == o._r.Tiles
            && (ReferenceEquals(_r.Pixels, o._r.Pixels) || (_r.Pixels is not null && o._r.Pixels is not null && _r.Pixels.AsSpan().SequenceEqual(o._r.Pixels)))
            && _r.Response.AsSpan().SequenceEqual(o._r.Response) && _r.PromptIds.AsSpan().SequenceEqual(o._r.PromptIds)
            && _r.OldLogProbs.AsSpan().SequenceEqual(o._r.OldLogProbs)
            && (_ref is null ? o._ref is null : o._ref is not null && _ref.AsSpan().SequenceEqual(o._ref));

        public override bool Equals(object? obj) => obj is RolloutKey o && Equals(o);

        public override int GetHashCode()
        {
            var h = new HashCode();
            h.Add(_r.Advantage);
            h.Add(_r.Response.Length);
            foreach (var t in _r.Response) h.Add(t);
            if (_r.OldLogProbs.Length > 0) h.Add(_r.OldLogProbs[^1]);
            return h.ToHashCode();
        }
    }
}
