using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Trainer.Grpo;

/// <summary>Per-token inputs of the GRPO loss for T positions (targets -100 where a position is not a response token).</summary>
public sealed record GrpoTokens(int[] Targets, float[] OldLogProbs, float[] Advantages, float[] Weights, float[]? RefLogProbs = null);

/// <summary>Result of one loss evaluation: the loss, each token's log-prob, and d loss / d hidden [T, D] in fp32.</summary>
public sealed class GrpoLossResult(double loss, float[] logProbs, Tensor hiddenGrad) : IDisposable
{
    public double Loss { get; } = loss;
    public float[] LogProbs { get; } = logProbs;
    public Tensor HiddenGrad { get; } = hiddenGrad;
    public void Dispose() => HiddenGrad.Dispose();
}

/// <summary>
/// The LM head and the GRPO loss together. <see cref="Fused"/> runs <see cref="ChunkedLmHead"/> over the response rows
/// alone (prompt and image rows never enter the head): pass 1 folds each vocabulary chunk's fp32 logits into a running
/// log-sum-exp and the target logit; the per-token loss and d loss / d logp follow (<c>grpo_token_loss</c>); pass 2
/// remakes each chunk, turns it into its logit gradient in place and applies it to the hidden-state gradient and the
/// head's weight gradient. Only [R, chunk] logits ever exist. <see cref="Unfused"/> is the plain composition over the
/// full [T, V] logits with the loss computed on the host, the reference for tests. Logits are fp32 on every backend
/// (the GEMM writes fp32 from bf16 operands on CUDA), as the sampler's are, so the old and new log-probs of a PPO
/// ratio carry no bf16 rounding.
/// <para>
/// <c>vocabLimit</c>: the softmax runs over the head's first rows only (the tokenizer's ids, as sampling does), so a head
/// padded wider than its tokenizer gives the same log-probs as the sampler and a PPO ratio of 1 before any update; the
/// padding rows get no gradient. Null: every row.
/// </para>
/// </summary>
public static class FusedGrpoLoss
{
    /// <param name="tensorParallel">A vocabulary-parallel head: the log-sum-exp is combined over the ranks (two small
    /// all-reduces), every rank computes the same token losses, and d hidden is summed over the ranks; [T, V] never exists.</param>
    public static GrpoLossResult Fused(Backend b, Tensor hidden, Parameter head, GrpoTokens tokens, GrpoLossSettings settings, int vocabChunk = ChunkedLmHead.DefaultChunk,
        int? vocabLimit = null, TensorParallel? tensorParallel = null)
    {
        int t = hidden.Rows;
        if (tokens.Targets.Length != t) throw new ArgumentException($"{tokens.Targets.Length} targets for {t} hidden rows");
        using var scored = ChunkedLmHead.Forward(b, hidden, head, tokens.Targets, settings.Temperature, vocabChunk, vocabLimit, tensorParallel);
        int r = scored.Rows.Length;
        using var held = new Activations();
        var old = held.Keep(b.FromArray(scored.Pick(tokens.OldLogProbs), DType.F32, [r]));
        var refLp = tokens.RefLogProbs is null ? null : held.Keep(b.FromArray(scored.Pick(tokens.RefLogProbs), DType.F32, [r]));
        var adv = held.Keep(b.FromArray(scored.Pick(tokens.Advantages), DType.F32, [r]));
        var weight = held.Keep(b.FromArray(scored.Pick(tokens.Weights), DType.F32, [r]));
        var loss = held.Keep(b.Allocate(DType.F32, r));
        var dlogp = held.Keep(b.Allocate(DType.F32, r));
        var logp = held.Keep(b.Allocate(DType.F32, r));
        if (r > 0) b.GrpoTokenLoss(scored.Max, scored.Sum, scored.TargetLogit, scored.Targets, old, refLp, adv, weight, settings, loss, dlogp, logp);
        var dHidden = ChunkedLmHead.Backward(b, scored, head, dlogp, DType.F32, vocabChunk);
        double total = r == 0 ? 0 : loss.ToFloatArray().Sum(x => (double)x);
        return new GrpoLossResult(total, scored.Spread(r == 0 ? [] : logp.ToFloatArray()), dHidden);
    }

    /// <summary>
    /// log softmax(logits / temperature)[target] of each position (0 where the target is ignored), over the scored rows
    /// alone like <see cref="Fused"/>'s first pass: the reference model's log-probs at the policy's temperature.
    /// </summary>
    public static float[] TokenLogProbs(Backend b, Tensor hidden, Parameter head, int[] targets, float temperature, int vocabChunk = ChunkedLmHead.DefaultChunk,
        int? vocabLimit = null, TensorParallel? tensorParallel = null) => ChunkedLmHead.LogProbs(b, hidden, head, targets, temperature, vocabChunk, vocabLimit, tensorParallel);

    public static GrpoLossResult Unfused(Backend b, Tensor hidden, Parameter head, GrpoTokens tokens, GrpoLossSettings settings, int? vocabLimit = null)
    {
        int t = hidden.Rows, v = ChunkedLmHead.HeadRows(head, vocabLimit);
        var weight = head.Value.SliceRows(0, v);
        using var logits = Linear.ForwardF32(b, hidden, weight);                              // [T, V]: what the fused path avoids
        b.Scale(logits, logits, 1f / settings.Temperature);
        using var targets = b.FromArray(tokens.Targets, [t], "targets");
        using var logp = b.Allocate(DType.F32, t);
        using var lse = b.Allocate(DType.F32, t);
        b.CrossEntropyForward(logits, targets, logp, lse);
        var lp = logp.ToFloatArray();
        double total = 0;
        var dlp = new float[t];
        for (int i = 0; i < t; i++)
        {
            if (tokens.Targets[i] < 0) continue;
            var (l, g) = GrpoMath.TokenLoss(lp[i], tokens.OldLogProbs[i], tokens.RefLogProbs?[i], tokens.Advantages[i], tokens.Weights[i], settings);
            total += l;
            dlp[i] = (float)g;
        }
        using var dlogp = b.FromArray(dlp, DType.F32, [t]);
        b.CrossEntropyBackward(logits, targets, lse, dlogp, logits);
        b.Scale(logits, logits, 1f / settings.Temperature);
        var dHidden = b.Allocate(DType.F32, t, hidden.Cols);
        using var stored = weight.DType == DType.F32 ? null : b.Allocate(weight.DType, t, v);
        if (stored is not null) b.Convert(logits, stored);
        b.Gemm(stored ?? logits, false, weight, false, dHidden);
        if (head.Grad is not null) b.Gemm(stored ?? logits, true, hidden, false, head.Grad.SliceRows(0, v), beta: 1f);
        return new GrpoLossResult(total, lp, dHidden);
    }
}
