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
/// The LM head and the GRPO loss together. <see cref="Fused"/> walks the vocabulary in chunks: pass 1 makes each
/// chunk's logits with a GEMM and folds them into a running log-sum-exp and the target logit; the per-token loss and
/// d loss / d logp follow; pass 2 remakes each chunk, turns it into its logit gradient in place and applies it to the
/// hidden-state gradient and the head's weight gradient. Only [T, chunk] logits ever exist. <see cref="Unfused"/> is
/// the plain composition over the full [T, V] logits with the loss computed on the host, the reference for tests
/// and for the peak-memory comparison. Logits are fp32 on every backend (the GEMM writes fp32 from bf16 operands on
/// CUDA), as the sampler's are, so the old and new log-probs of a PPO ratio carry no bf16 rounding.
/// <para>
/// <c>vocabLimit</c>: the softmax runs over the head's first rows only (the tokenizer's ids, as sampling does), so a head
/// padded wider than its tokenizer gives the same log-probs as the sampler and a PPO ratio of 1 before any update; the
/// padding rows get no gradient. Null: every row.
/// </para>
/// </summary>
public static class FusedGrpoLoss
{
    public static GrpoLossResult Fused(Backend b, Tensor hidden, Parameter head, GrpoTokens tokens, GrpoLossSettings settings, int vocabChunk = 8192,
        int? vocabLimit = null)
    {
        int t = hidden.Rows, v = Rows(head, vocabLimit);
        if (vocabChunk < 1) throw new ArgumentOutOfRangeException(nameof(vocabChunk));
        CheckTargets(tokens.Targets, v);
        float invT = 1f / settings.Temperature;
        using var held = new Activations();
        var targets = held.Keep(b.FromArray(tokens.Targets, [t], "targets"));
        var (m, s, target) = LogSumExpPass(b, hidden, head, v, targets, invT, vocabChunk, held);
        var old = held.Keep(b.FromArray(tokens.OldLogProbs, DType.F32, [t]));
        var refLp = tokens.RefLogProbs is null ? null : held.Keep(b.FromArray(tokens.RefLogProbs, DType.F32, [t]));
        var adv = held.Keep(b.FromArray(tokens.Advantages, DType.F32, [t]));
        var weight = held.Keep(b.FromArray(tokens.Weights, DType.F32, [t]));
        var loss = held.Keep(b.Allocate(DType.F32, t));
        var dlogp = held.Keep(b.Allocate(DType.F32, t));
        var logp = held.Keep(b.Allocate(DType.F32, t));
        b.GrpoTokenLoss(m, s, target, targets, old, refLp, adv, weight, settings, loss, dlogp, logp);

        var dHidden = b.Allocate(DType.F32, t, hidden.Cols);
        for (int c0 = 0; c0 < v; c0 += vocabChunk)
        {
            int n = Math.Min(vocabChunk, v - c0);
            var w = head.Value.SliceRows(c0, n);
            using var chunk = Linear.ForwardF32(b, hidden, w);
            b.ChunkLogitGrad(chunk, m, s, targets, dlogp, c0, invT);
            // The GEMMs take dlogits in the storage type (bf16 on CUDA: gradients tolerate its rounding, log-probs do not).
            using var stored = w.DType == DType.F32 ? null : b.Allocate(w.DType, t, n);
            if (stored is not null) b.Convert(chunk, stored);
            var dlogits = stored ?? chunk;
            b.Gemm(dlogits, false, w, false, dHidden, beta: 1f);                                  // dH += dlogits W_chunk
            if (head.Grad is not null) b.Gemm(dlogits, true, hidden, false, head.Grad.SliceRows(c0, n), beta: 1f); // dW_chunk += dlogits^T H
        }
        return new GrpoLossResult(loss.ToFloatArray().Sum(x => (double)x), logp.ToFloatArray(), dHidden);
    }

    /// <summary>
    /// log softmax(logits / temperature)[target] of each position (0 where the target is ignored), walking the vocabulary
    /// in chunks like <see cref="Fused"/>'s first pass: the reference model's log-probs at the policy's temperature.
    /// </summary>
    public static float[] TokenLogProbs(Backend b, Tensor hidden, Parameter head, int[] targets, float temperature, int vocabChunk = 8192, int? vocabLimit = null)
    {
        int t = hidden.Rows;
        if (targets.Length != t) throw new ArgumentException($"{targets.Length} targets for {t} hidden rows");
        if (vocabChunk < 1) throw new ArgumentOutOfRangeException(nameof(vocabChunk));
        using var held = new Activations();
        var ids = held.Keep(b.FromArray(targets, [t], "targets"));
        int v = Rows(head, vocabLimit);
        CheckTargets(targets, v);
        var (m, s, target) = LogSumExpPass(b, hidden, head, v, ids, 1f / temperature, vocabChunk, held);
        float[] mh = m.ToFloatArray(), sh = s.ToFloatArray(), th = target.ToFloatArray();
        var logp = new float[t];
        for (int i = 0; i < t; i++) if (targets[i] >= 0) logp[i] = (float)(th[i] - mh[i] - Math.Log(sh[i]));
        return logp;
    }

    /// <summary>Pass 1 over the vocabulary in chunks: each row's running max and sum of exp(logit / T) and its target's scaled logit.</summary>
    private static (Tensor Max, Tensor Sum, Tensor Target) LogSumExpPass(Backend b, Tensor hidden, Parameter head, int v, Tensor targets, float invT, int vocabChunk,
        Activations held)
    {
        int t = hidden.Rows;
        var m = held.Keep(b.FromArray(Enumerable.Repeat(float.NegativeInfinity, t).ToArray(), DType.F32, [t], "lse_max"));
        var s = held.Keep(b.Allocate(DType.F32, [t], "lse_sum"));
        var target = held.Keep(b.Allocate(DType.F32, [t], "target_logit"));
        for (int c0 = 0; c0 < v; c0 += vocabChunk)
        {
            int n = Math.Min(vocabChunk, v - c0);
            using var chunk = Linear.ForwardF32(b, hidden, head.Value.SliceRows(c0, n));   // fp32 logits [T, chunk]
            b.ChunkLseUpdate(chunk, targets, c0, invT, m, s, target);
        }
        return (m, s, target);
    }

    /// <summary>The head rows the softmax covers: all, or the first <paramref name="vocabLimit"/>; a target past them is an error.</summary>
    private static int Rows(Parameter head, int? vocabLimit)
    {
        int v = head.Value.Dim(0);
        if (vocabLimit is { } limit && (limit < 1 || limit > v)) throw new ArgumentOutOfRangeException(nameof(vocabLimit), $"vocabulary limit {limit} outside [1, {v}] head rows");
        return vocabLimit ?? v;
    }

    private static void CheckTargets(int[] targets, int v)
    {
        for (int i = 0; i < targets.Length; i++)
            if (targets[i] >= v) throw new ArgumentException($"target {i} is token {targets[i]}, outside the {v} vocabulary rows the loss covers");
    }

    public static GrpoLossResult Unfused(Backend b, Tensor hidden, Parameter head, GrpoTokens tokens, GrpoLossSettings settings, int? vocabLimit = null)
    {
        int t = hidden.Rows, v = Rows(head, vocabLimit);
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
