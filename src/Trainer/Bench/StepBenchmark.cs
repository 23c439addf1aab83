using System.Diagnostics;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Trainer.Grpo;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer.Bench;

/// <summary>Result of timing training steps of one config and batch shape.</summary>
public sealed record StepTiming(string Config, string Backend, string Trainable, int Sequences, int TokensPerSequence, int Tiles, int Steps,
    double MedianSeconds, double TokensPerSecond, double ModelTflopsPerStep, double AchievedTflops, double? Mfu,
    long PeakBytes, long EstimatedBytes, double PeakOverEstimate)
{
    /// <summary>With profiling: each op's calls and synchronized milliseconds per step, the most expensive first.</summary>
    public IReadOnlyList<OpProfile.Entry>? Ops { get; init; }

    /// <summary>The stage whose loss the steps ran (model, sft, rm, mpo, grpo) and the rows whose next token it scored.</summary>
    public string Stage { get; init; } = "model";
    public int ScoredTokens { get; init; }

    /// <summary>The loss path's peak above the hidden states (LM head over the scored rows, forward and backward), and what [T, V] fp32 logits would take.</summary>
    public long LossPeakBytes { get; init; }
    public long FullLogitsBytes { get; init; }

    /// <summary>With profiling: the profiled step's wall time (longer than <see cref="MedianSeconds"/>: every op synchronizes).</summary>
    public double? ProfiledStepMilliseconds { get; init; }
}

/// <summary>The training stage whose loss a model benchmark runs.</summary>
public enum BenchStage
{
    /// <summary>Every text row scored (the op-level view; the default).</summary>
    Model,
    /// <summary>Supervised: the mean NLL of each sequence's response (its last half of text tokens).</summary>
    Sft,
    /// <summary>Reward model: a scalar head on each sequence's last token, pairwise loss; no LM head.</summary>
    Rm,
    /// <summary>MPO: the reference's log-probs of the responses (no gradient), then the policy's with their gradient.</summary>
    Mpo,
    /// <summary>GRPO: forward to the hidden states, the fused clipped loss over the response rows, backward.</summary>
    Grpo,
}

/// <summary>
/// Times forward + backward + AdamW steps of a randomly initialised VLM on a synthetic packed batch (text with image
/// tiles), reporting tokens/s, model FLOP/s (6N plus attention, <see cref="StepCost"/>), MFU when the backend knows its
/// peak, and the pool's peak memory against <see cref="StepCost.TrainingMemory"/>. A stage other than
/// <see cref="BenchStage.Model"/> runs that stage's loss on sequences whose last half of text tokens is the response.
/// </summary>
public static class StepBenchmark
{
    public static StepTiming Run(Backend backend, VlmConfig config, string configName, StepShape shape, TrainableParts trainable, int steps,
        double? peakFlops, int imageContextId = 261, bool profile = false, BenchStage stage = BenchStage.Model, bool checkpointLayers = false,
        Parallel.DataParallel? dataParallel = null, bool shardOptimizer = false)
    {
        var dp = dataParallel ?? Parallel.DataParallel.Single;
        using var store = new ParameterStore(backend, config, trainable, (n, s) => VlmWeights.RandomInit(config, n, s, 1));
        GC.Collect(); // the initial values' host arrays (gigabytes at real widths) are garbage now
        using var model = new VisionLanguageModel(backend, config, store, imageContextId) { CheckpointLlm = checkpointLayers, CheckpointVit = checkpointLayers };
        var rm = stage == BenchStage.Rm ? RewardModel.WithNewHead(model) : null;
        var trainableParameters = rm?.Trainable.ToList() ?? store.Trainable.ToList();
        using var opt = new AdamWOptimizer(backend, trainableParameters, new AdamWSettings(1e-4f), dataParallel: dp, shardState: shardOptimizer);
        var batch = stage == BenchStage.Model ? SyntheticBatch(config, shape, imageContextId) : StageBatch(config, shape, imageContextId);
        shape = shape with { Scored = stage == BenchStage.Rm ? 0 : batch.Targets.Count(x => x != Backend.IgnoreIndex) }; // a reward model never runs the LM head
        void Step()
        {
            opt.ZeroGrad();
            switch (stage)
            {
                case BenchStage.Model or BenchStage.Sft:
                    using (var pass = model.Forward(batch)) model.Backward(pass);
                    break;
                case BenchStage.Mpo:
                    MpoLoss(model, batch);
                    break;
                case BenchStage.Rm:
                    using (var scored = rm!.Score(batch))
                    {
                        int n = scored.Scores.Length;
                        rm.Backward(scored, Enumerable.Range(0, n).Select(i => (i % 2 == 0 ? -1f : 1f) / n).ToArray());
                    }
                    break;
                case BenchStage.Grpo:
                    GrpoLoss(model, batch);
                    break;
            }
            opt.Step(1e-4f);
        }
        try
        {
            var times = new List<double>();
            for (int i = 0; i < steps + 1; i++) // the first step compiles kernels and fills the pool: not timed
            {
                var sw = Stopwatch.StartNew();
                Step();
                backend.Synchronize();
                if (i > 0) times.Add(sw.Elapsed.TotalSeconds);
            }
            times.Sort();
            IReadOnlyList<OpProfile.Entry>? ops = null;
            double? profiledStep = null;
            if (profile)
            {
                var p = backend.StartProfiling();
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < steps; i++) Step();
                backend.Synchronize();
                backend.StopProfiling();
                profiledStep = sw.Elapsed.TotalMilliseconds / steps;
                ops = [.. p.Entries.Select(e => e with { Calls = e.Calls / steps, Milliseconds = e.Milliseconds / steps })];
            }
            double median = times[times.Count / 2];
            double flops = StepCost.TrainingFlops(config, shape);
            var estimate = StepCost.TrainingMemory(config, shape, trainable, backend.ActivationType, checkpointLayers,
                layout: new ParallelLayout(dp.Ranks, 1, shardOptimizer));
            long peak = backend.Memory.PeakBytesInUse;
            var (lossPeak, fullLogits) = LossPeak(backend, model, rm, batch, stage);
            return new StepTiming(configName, backend.Name, trainable.ToString(), shape.SequenceLengths.Length, shape.SequenceLengths[0], shape.Tiles, steps,
                median, shape.TextTokens / median, flops / 1e12, flops / median / 1e12, peakFlops is null ? null : flops / median / peakFlops,
                peak, estimate.Total, (double)peak / estimate.Total) { Ops = ops, ProfiledStepMilliseconds = profiledStep, Stage = stage.ToString().ToLowerInvariant(),
                ScoredTokens = shape.ScoredTokens, LossPeakBytes = lossPeak, FullLogitsBytes = fullLogits };
        }
        finally
        {
            if (rm is not null) { rm.Weight.Dispose(); rm.Bias.Dispose(); }
        }
    }

    /// <summary>
    /// The loss path's own peak above the forward's hidden states: the LM head's passes over the scored rows (or the
    /// reward head), forward and backward, after a forward to the final norm; and the bytes the [T, V] fp32 logits of
    /// every row would take (what the chunked head replaced; none for the reward model).
    /// </summary>
    private static (long Peak, long FullLogits) LossPeak(Backend backend, VisionLanguageModel model, RewardModel? rm, VlmBatch batch, BenchStage stage)
    {
        using var pass = model.Forward(batch, withLoss: false);
        backend.Synchronize();
        long before = backend.Memory.BytesInUse;
        backend.ResetPeakMemory();
        if (stage == BenchStage.Rm)
        {
            var lastRows = batch.CuSeqlens.Skip(1).Select(e => e - 1).ToArray();
            using var index = backend.Rows(lastRows, batch.InputIds.Length, distinct: true, "last_tokens");
            using var last = backend.Activations(lastRows.Length, model.Config.Llm.HiddenSize);
            backend.GatherRows(pass.Hidden, index, last);
            using var scores = Engine.Layers.Linear.Forward(backend, last, rm!.Weight.Value, rm.Bias.Value);
        }
        else if (stage == BenchStage.Grpo)
        {
            int t = batch.Targets.Length;
            using var r = FusedGrpoLoss.Fused(backend, pass.Hidden, model.LmHead, new GrpoTokens(batch.Targets, new float[t], new float[t], Enumerable.Repeat(1f / t, t).ToArray()),
                new GrpoLossSettings());
        }
        else
        {
            using var scored = Engine.Layers.ChunkedLmHead.Forward(backend, pass.Hidden, model.LmHead, batch.Targets, 1f, model.VocabChunk);
            using var d = backend.FromArray(Enumerable.Repeat(-1f, scored.Rows.Length).ToArray(), DType.F32, [scored.Rows.Length]);
            using var dh = Engine.Layers.ChunkedLmHead.Backward(backend, scored, model.LmHead, d, backend.ActivationType, model.VocabChunk);
        }
        backend.Synchronize();
        long full = stage == BenchStage.Rm ? 0 : (long)batch.InputIds.Length * model.Config.Llm.VocabSize * 4;
        return (backend.Memory.PeakBytesInUse - before, full);
    }

    /// <summary>The reference pass's log-probs (released before the policy's pass, as the trainer does), then the policy's with a DPO-shaped gradient.</summary>
    private static void MpoLoss(VisionLanguageModel model, VlmBatch batch)
    {
        float[] reference;
        using (var refPass = model.Forward(batch)) reference = refPass.LogProbs;
        using var pass = model.Forward(batch);
        int n = Math.Max(1, batch.Targets.Count(x => x != Backend.IgnoreIndex));
        var d = new float[batch.Targets.Length];
        for (int t = 0; t < d.Length; t++)
            if (batch.Targets[t] != Backend.IgnoreIndex) d[t] = (float)(-0.5 / n * (1 + Math.Tanh(pass.LogProbs[t] - reference[t])));
        model.Backward(pass, d);
    }

    /// <summary>Final hidden states, the fused clipped loss over the response rows (advantage +1 / -1 by sequence), backward.</summary>
    private static void GrpoLoss(VisionLanguageModel model, VlmBatch batch)
    {
        int t = batch.Targets.Length, n = Math.Max(1, batch.Targets.Count(x => x != Backend.IgnoreIndex));
        float[] old = new float[t], adv = new float[t], weights = new float[t];
        for (int s = 0; s + 1 < batch.CuSeqlens.Length; s++)
            for (int i = batch.CuSeqlens[s]; i < batch.CuSeqlens[s + 1]; i++)
            {
                if (batch.Targets[i] == Backend.IgnoreIndex) continue;
                old[i] = -MathF.Log(model.Config.Llm.VocabSize);
                adv[i] = s % 2 == 0 ? 1f : -1f;
                weights[i] = 1f / n;
            }
        using var pass = model.Forward(batch, withLoss: false);
        var settings = new GrpoLossSettings(0.2f, 0.28f, 3f);
        using var result = FusedGrpoLoss.Fused(model.Backend, pass.Hidden, model.LmHead, new GrpoTokens(batch.Targets, old, adv, weights), settings);
        model.BackwardFromHidden(pass, result.HiddenGrad);
    }

    /// <summary>
    /// Sequences like <see cref="SyntheticBatch"/>'s whose last half of text tokens is a response: only the rows that
    /// predict a response token have a target (as the trainers pack them).
    /// </summary>
    public static VlmBatch StageBatch(VlmConfig config, StepShape shape, int imageContextId)
    {
        var all = SyntheticBatch(config, shape, imageContextId);
        var targets = Enumerable.Repeat(Backend.IgnoreIndex, all.Targets.Length).ToArray();
        int tilesPerSeq = shape.Tiles / shape.SequenceLengths.Length;
        for (int s = 0; s < shape.SequenceLengths.Length; s++)
        {
            int start = all.CuSeqlens[s], end = all.CuSeqlens[s + 1];
            int text = end - start - (tilesPerSeq * config.TokensPerTile + 2), response = Math.Max(1, text / 2);
            for (int i = end - response - 1; i < end - 1; i++) targets[i] = all.InputIds[i + 1];
        }
        return all with { Targets = targets };
    }

    /// <summary>Sequences of <c>TokensPerSequence</c> tokens, each starting with its image tiles' context tokens.</summary>
    public static VlmBatch SyntheticBatch(VlmConfig config, StepShape shape, int imageContextId)
    {
        var rng = new Random(7);
        var ids = new List<int>();
        var cu = new List<int> { 0 };
        int tilesPerSeq = shape.Tiles / shape.SequenceLengths.Length;
        foreach (var n in shape.SequenceLengths)
        {
            int image = tilesPerSeq * config.TokensPerTile;
            if (image + 2 > n) throw new ArgumentException($"{n} tokens per sequence cannot hold {image} image tokens");
            ids.Add(imageContextId - 2);
            ids.AddRange(Enumerable.Repeat(imageContextId, image));
            ids.Add(imageContextId - 1);
            while (ids.Count < cu[^1] + n) ids.Add(rng.Next(256));
            cu.Add(ids.Count);
        }
        var targets = ids.Select((_, i) => i + 1 < ids.Count && !cu.Contains(i + 1) ? ids[i + 1] : Backend.IgnoreIndex).ToArray();
        int s = config.ForceImageSize;
        var pixels = new float[shape.Tiles * 3 * s * s];
        for (int i = 0; i < pixels.Length; i++) pixels[i] = (float)(rng.NextDouble() * 4 - 2);
        return new VlmBatch([.. ids], targets, [.. cu], pixels, shape.Tiles);
    }
}
