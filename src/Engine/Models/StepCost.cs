using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>One packed training batch's shape, for cost and memory planning.</summary>
public sealed record StepShape(int TextTokens, int Tiles, int[] SequenceLengths)
{
    /// <summary>The rows whose next token is scored (their hidden states enter the LM head); all of them when not set.</summary>
    public int? Scored { get; init; }

    public int ScoredTokens => Scored ?? TextTokens;

    public static StepShape Uniform(int sequences, int tokensPerSequence, int tilesPerSequence) =>
        new(sequences * tokensPerSequence, sequences * tilesPerSequence, Enumerable.Repeat(tokensPerSequence, sequences).ToArray());
}

/// <summary>Memory of a training step by category, in bytes.</summary>
public sealed record MemoryEstimate(long Weights, long Masters, long Gradients, long Optimiser, long Activations, long BackwardWorkspace)
{
    public long Total => Weights + Masters + Gradients + Optimiser + Activations + BackwardWorkspace;
}

/// <summary>
/// FLOPs and memory of one forward + backward + AdamW step of the VLM, counted from the same shapes the model code
/// allocates (see docs/ARCHITECTURE.md, "Memory of a training step").
/// </summary>
public static class StepCost
{
    /// <summary>
    /// Model FLOPs: 6 per matmul weight per token (2 forward, 4 backward) for the ViT tokens (n (1 + P)), the adapter
    /// tokens and the LLM tokens, plus attention: QK^T and PV are 4 T^2 d per layer forward (half that causal), x3
    /// with backward. Embedding lookups count nothing; the LM head counts as a matmul.
    /// </summary>
    public static double TrainingFlops(VlmConfig c, StepShape s)
    {
        var v = c.Vision;
        var l = c.Llm;
        int np = c.TilePatchesPerSide * c.TilePatchesPerSide, vitTokens = s.Tiles * (1 + np), imageTokens = s.Tiles * c.TokensPerTile;
        double vitMatmul = v.NumLayers * (4.0 * v.HiddenSize * v.HiddenSize + 2.0 * v.HiddenSize * v.IntermediateSize) + 3.0 * c.Vision.PatchSize * c.Vision.PatchSize * v.HiddenSize;
        int shuffled = v.HiddenSize * (int)Math.Round(1 / (c.DownsampleRatio * c.DownsampleRatio));
        double adapterMatmul = (double)shuffled * l.HiddenSize + (double)l.HiddenSize * l.HiddenSize;
        int hd = l.HeadDim;
        double llmMatmul = l.NumLayers * ((double)l.HiddenSize * hd * (2 * l.NumHeads + 2 * l.NumKvHeads) + 3.0 * l.HiddenSize * l.IntermediateSize)
                           + (double)l.VocabSize * l.HiddenSize;
        double flops = 6 * (vitMatmul * vitTokens + adapterMatmul * imageTokens + llmMatmul * s.TextTokens);
        flops += 3 * 4.0 * v.NumLayers * s.Tiles * (double)(1 + np) * (1 + np) * v.HiddenSize;
        flops += 3 * 4.0 * l.NumLayers * s.SequenceLengths.Sum(n => (double)n * n / 2) * l.NumHeads * hd;
        return flops;
    }

    /// <summary>
    /// Peak memory of a step: weights in the activation type, fp32 masters, gradients and two AdamW moments of the
    /// trainable parameters, the activations forward keeps (per layer, listed tensor by tensor below), and the
    /// largest backward working set (one layer's temporaries).
    /// </summary>
    public static MemoryEstimate TrainingMemory(VlmConfig c, StepShape s, TrainableParts trainable, DType activationType)
    {
        int a = activationType.Size();
        long all = 0, train = 0;
        foreach (var (name, shape) in VlmWeights.Expected(c))
        {
            long n = shape.Aggregate(1L, (x, y) => x * y);
            all += n;
            if (VlmWeights.IsTrainable(name, trainable)) train += n;
        }
        long weights = all * a;
        long masters = activationType == DType.F32 ? 0 : all * 4L;
        long grads = train * 4, optimiser = train * 8;

        var v = c.Vision;
        var l = c.Llm;
        int np = c.TilePatchesPerSide * c.TilePatchesPerSide;
        long vt = s.Tiles * (1L + np), t = s.TextTokens, img = (long)s.Tiles * c.TokensPerTile;
        int cv = v.HiddenSize, fv = v.IntermediateSize, d = l.HiddenSize, f = l.IntermediateSize, hd = l.HeadDim;
        int normStats = v.NormType == VisionNorm.LayerNorm ? 2 : 1;
        // ViT layer keeps N1, Q, K, V, (Qn, Kn), A, P, H1, N2, F1, G, F2, output: 10 or 12 x C + 2F wide; stats fp32.
        long vitLayer = vt * (a * ((v.QkNormalization ? 12L : 10L) * cv + 2L * fv) + 4L * (2 * normStats + v.NumHeads + (v.QkNormalization ? 2 : 0)));
        long vitOther = s.Tiles * (long)np * a * (3L * v.PatchSize * v.PatchSize + 2L * cv) + vt * a * cv; // patches, patch embeddings, output; x
        int shuffled = cv * (int)Math.Round(1 / (c.DownsampleRatio * c.DownsampleRatio));
        long adapter = img * a * (2L * shuffled + 3L * d) + img * 8;
        // Decoder layer keeps N1, Qr, Kr, V, A, H1, N2, Gate, Up, Act, output; rstd x2 and lse fp32.
        long llmLayer = t * (a * (4L * d + 2L * l.NumHeads * hd + 2L * l.NumKvHeads * hd + 3L * f) + 4L * (2 + l.NumHeads));
        long llmOther = t * (a * (2L * d + l.VocabSize) + 4L * 3 + 4L * 3); // embeddings, final norm, logits; ids, positions, targets; lse, logprob, rstd
        long activations = v.NumLayers * vitLayer + vitOther + adapter + l.NumLayers * llmLayer + llmOther;
        // Backward working set: the larger of one decoder layer's and one ViT layer's temporaries, plus the running
        // input gradient of the LM head and final norm.
        long llmBack = t * a * (3L * f + 5L * d + 2L * l.NumHeads * hd + 2L * l.NumKvHeads * hd) + t * 4L * l.NumHeads;
        long vitBack = vt * a * (2L * fv + 9L * cv) + vt * 4L * v.NumHeads;
        long workspace = Math.Max(llmBack, vitBack) + t * a * 2L * d;
        return new MemoryEstimate(weights, masters, grads, optimiser, activations, workspace);
    }
}
