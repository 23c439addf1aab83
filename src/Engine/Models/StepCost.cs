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

/// <summary>Memory of a training step by category, in bytes (on one rank when planned for several).</summary>
public sealed record MemoryEstimate(long Weights, long Masters, long Gradients, long Optimiser, long Activations, long BackwardWorkspace)
{
    public long Total => Weights + Masters + Gradients + Optimiser + Activations + BackwardWorkspace;
}

/// <summary>
/// How a run spreads over ranks: tensor-parallel size (Megatron style in the decoder: attention heads, kv heads, the
/// MLP's intermediate columns and the vocabulary cut tp ways; the ViT, adapter and norms replicated), data-parallel
/// size, and whether AdamW's masters and moments are sharded over the data-parallel ranks (ZeRO-1).
/// </summary>
public sealed record ParallelLayout(int DataParallel = 1, int TensorParallel = 1, bool ShardOptimizer = false)
{
    public static readonly ParallelLayout Single = new();
    public int World => DataParallel * TensorParallel;
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
    /// Peak memory of a step: weights in the activation type, fp32 masters of the trainable parameters (a bf16
    /// device; frozen parts keep none), their gradients and two AdamW moments (each tensor rounded to the pool's size
    /// classes), the activations forward keeps (per layer, listed tensor by tensor below; with per-layer activation
    /// checkpointing only each layer's input, plus one recomputed layer in backward), the LM head's chunked log-probs
    /// over the scored rows (<see cref="StepShape.ScoredTokens"/> x <paramref name="vocabChunk"/> fp32, never [T, V]),
    /// and the largest backward working set.
    /// </summary>
    /// <param name="layout">Several ranks: the decoder's tensor-parallel cut divides its sharded weights, head- and
    /// MLP-wide activations and the LM head's chunk by tp; ZeRO-1 keeps one flat shard of masters (on a bf16 device),
    /// gradients' reduce-scattered sum and both moments per data-parallel rank, beside the full gradients.</param>
    public static MemoryEstimate TrainingMemory(VlmConfig c, StepShape s, TrainableParts trainable, DType activationType, bool checkpointLayers = false,
        int vocabChunk = 8192, ParallelLayout? layout = null)
    {
        var lay = layout ?? ParallelLayout.Single;
        int tp = lay.TensorParallel;
        if (tp < 1 || lay.DataParallel < 1) throw new ArgumentException($"tensor-parallel size {tp} and data-parallel size {lay.DataParallel} must be at least 1");
        if (tp > 1 && (c.Llm.NumHeads % tp != 0 || c.Llm.NumKvHeads % tp != 0 || c.Llm.IntermediateSize % tp != 0))
            throw new ArgumentException($"tensor-parallel size {tp} must divide the decoder's {c.Llm.NumHeads} heads, {c.Llm.NumKvHeads} kv heads and {c.Llm.IntermediateSize} MLP columns");
        int a = activationType.Size();
        long weights = 0, masters = 0, grads = 0, optimiser = 0, trainableValues = 0;
        foreach (var (name, shape) in VlmWeights.Expected(c))
        {
            long n = shape.Aggregate(1L, (x, y) => x * y);
            if (TensorParallelCut(name)) n = (n + tp - 1) / tp;
            weights += Pool(n * a);
            if (!VlmWeights.IsTrainable(name, trainable)) continue;
            trainableValues += n;
            grads += Pool(n * 4);
            if (lay.ShardOptimizer) continue;
            if (activationType != DType.F32) masters += Pool(n * 4);
            optimiser += 2 * Pool(n * 4);
        }
        if (lay.ShardOptimizer && trainableValues > 0)
        {
            // One flat shard of each: master (its fp32 copy of the shard), the reduce-scattered gradient sum, two moments.
            long shard = Pool((trainableValues + lay.DataParallel - 1) / lay.DataParallel * 4);
            masters = shard;
            grads += shard;
            optimiser = 2 * shard;
        }

        var v = c.Vision;
        var l = c.Llm;
        int np = c.TilePatchesPerSide * c.TilePatchesPerSide;
        long vt = s.Tiles * (1L + np), t = s.TextTokens, img = (long)s.Tiles * c.TokensPerTile, r = s.ScoredTokens;
        int cv = v.HiddenSize, fv = v.IntermediateSize, d = l.HiddenSize, f = l.IntermediateSize / tp, hd = l.HeadDim;
        int heads = l.NumHeads / tp, kvHeads = l.NumKvHeads / tp;
        int normStats = v.NormType == VisionNorm.LayerNorm ? 2 : 1;
        // ViT layer keeps N1, Q, K, V, (Qn, Kn), A, P, H1, N2, F1, G, F2, output: 10 or 12 x C + 2F wide; stats fp32.
        long vitLayer = vt * (a * ((v.QkNormalization ? 12L : 10L) * cv + 2L * fv) + 4L * (2 * normStats + v.NumHeads + (v.QkNormalization ? 2 : 0)));
        long vitOther = s.Tiles * (long)np * a * (3L * v.PatchSize * v.PatchSize + 2L * cv) + vt * a * cv; // patches, patch embeddings, output; x
        int shuffled = cv * (int)Math.Round(1 / (c.DownsampleRatio * c.DownsampleRatio));
        long adapter = img * a * (2L * shuffled + 3L * d) + img * 8;
        // Decoder layer keeps N1, Qr, Kr, V, A, H1, N2, Gate, Up, Act, output; rstd x2 and lse fp32.
        long llmLayer = t * (a * (4L * d + 2L * heads * hd + 2L * kvHeads * hd + 3L * f) + 4L * (2 + heads));
        // Embeddings, final norm; ids, positions, targets; final rstd. The LM head's pass 1 keeps the gathered scored
        // rows (when not every row is scored) and their running max, sum, target logit and ids.
        long llmOther = t * (a * 2L * d + 4L * 3 + 4L) + (r < t ? r * a * d : 0) + r * 16;
        // A frozen ViT keeps nothing per layer (its pass frees each layer once the next has read it).
        bool vitTrains = VlmWeights.Expected(c).Any(x => x.Name.StartsWith(VlmWeights.Vit, StringComparison.Ordinal) && VlmWeights.IsTrainable(x.Name, trainable));
        long vitKept = !vitTrains ? 0 : checkpointLayers ? v.NumLayers * vt * a * cv : v.NumLayers * vitLayer;
        long llmKept = checkpointLayers ? l.NumLayers * t * a * d : l.NumLayers * llmLayer;
        long activations = vitKept + vitOther + adapter + llmKept + llmOther;
        // Backward working set: the larger of one decoder layer's and one ViT layer's temporaries (with checkpointing
        // also that layer's recomputed activations), the LM head's pass 2 ([R, chunk] fp32 logits, their bf16 copy on
        // a bf16 device, d hidden of the scored rows in fp32 and scattered to [T, D]), plus the running input gradient
        // of the final norm.
        long llmBack = t * a * (3L * f + 5L * d + 2L * heads * hd + 2L * kvHeads * hd) + t * 4L * heads + (checkpointLayers ? llmLayer : 0);
        long vitBack = !vitTrains ? 0 : vt * a * (2L * fv + 9L * cv) + vt * 4L * v.NumHeads + (checkpointLayers ? vitLayer : 0);
        long chunk = Math.Min(vocabChunk, (l.VocabSize + tp - 1) / tp);
        long headBack = r * chunk * (4L + (a == 4 ? 0 : a)) + r * d * (4L + (a == 4 ? 0 : a)) + t * a * d;
        long workspace = Math.Max(Math.Max(llmBack, vitBack) + t * a * 2L * d, headBack);
        return new MemoryEstimate(weights, masters, grads, optimiser, activations, workspace);
    }

    /// <summary>
    /// The weights a Megatron-style tensor-parallel decoder cuts tp ways: q/k/v (and their biases), gate and up by
    /// output column, o_proj and down by input row, the embedding and LM head by vocabulary. Norms, the ViT and the
    /// adapter are whole on every rank.
    /// </summary>
    public static bool TensorParallelCut(string name) =>
        name.StartsWith(VlmWeights.Llm, StringComparison.Ordinal)
        && (name.Contains(".self_attn.", StringComparison.Ordinal) || name.Contains(".mlp.", StringComparison.Ordinal)
            || name.Contains("embed_tokens", StringComparison.Ordinal) || name.Contains("lm_head", StringComparison.Ordinal));

    /// <summary>
    /// Bytes of the paged KV cache for <paramref name="sequences"/> sequences of <paramref name="tokens"/> tokens (prompt
    /// and response) on one rank: K and V of every decoder layer, kv heads cut tp ways, in blocks of
    /// <paramref name="blockTokens"/> tokens.
    /// </summary>
    public static long KvCacheBytes(VlmConfig c, int sequences, int tokens, DType activationType, int tensorParallel = 1, int blockTokens = 16)
    {
        var l = c.Llm;
        long blocks = (long)sequences * ((tokens + blockTokens - 1) / blockTokens);
        return blocks * blockTokens * 2L * l.NumLayers * (l.NumKvHeads / tensorParallel) * l.HeadDim * activationType.Size();
    }

    /// <summary>The frozen copy of the model a stage holds beside the policy (MPO's and a KL term's reference), on one rank.</summary>
    public static long FrozenCopyBytes(VlmConfig c, DType activationType, int tensorParallel = 1) =>
        VlmWeights.Expected(c).Sum(x =>
        {
            long n = x.Shape.Aggregate(1L, (p, q) => p * q);
            return Pool((TensorParallelCut(x.Name) ? (n + tensorParallel - 1) / tensorParallel : n) * activationType.Size());
        });

    /// <summary>What the memory pool hands out for a request (its size classes).</summary>
    private static long Pool(long bytes) => Backends.MemoryPool<Backends.DeviceBlock>.RoundUp(bytes);
}
