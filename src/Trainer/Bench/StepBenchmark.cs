using System.Diagnostics;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer.Bench;

/// <summary>Result of timing training steps of one config and batch shape.</summary>
public sealed record StepTiming(string Config, string Backend, string Trainable, int Sequences, int TokensPerSequence, int Tiles, int Steps,
    double MedianSeconds, double TokensPerSecond, double ModelTflopsPerStep, double AchievedTflops, double? Mfu,
    long PeakBytes, long EstimatedBytes, double PeakOverEstimate)
{
    /// <summary>With profiling: each op's calls and synchronized milliseconds per step, the most expensive first.</summary>
    public IReadOnlyList<OpProfile.Entry>? Ops { get; init; }

    /// <summary>With profiling: the profiled step's wall time (longer than <see cref="MedianSeconds"/>: every op synchronizes).</summary>
    public double? ProfiledStepMilliseconds { get; init; }
}

/// <summary>
/// Times forward + backward + AdamW steps of a randomly initialised VLM on a synthetic packed batch (text with image
/// tiles), reporting tokens/s, model FLOP/s (6N plus attention, <see cref="StepCost"/>), MFU when the backend knows its
/// peak, and the pool's peak memory against <see cref="StepCost.TrainingMemory"/>.
/// </summary>
public static class StepBenchmark
{
    public static StepTiming Run(Backend backend, VlmConfig config, string configName, StepShape shape, TrainableParts trainable, int steps,
        double? peakFlops, int imageContextId = 261, bool profile = false)
    {
        using var store = new ParameterStore(backend, config, trainable, (n, s) => VlmWeights.RandomInit(config, n, s, 1));
        using var model = new VisionLanguageModel(backend, config, store, imageContextId);
        using var opt = new AdamWOptimizer(backend, store.Trainable, new AdamWSettings(1e-4f));
        var batch = SyntheticBatch(config, shape, imageContextId);
        void Step()
        {
            opt.ZeroGrad();
            using (var pass = model.Forward(batch)) model.Backward(pass);
            opt.Step(1e-4f);
        }
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
        var estimate = StepCost.TrainingMemory(config, shape, trainable, backend.ActivationType);
        long peak = backend.Memory.PeakBytesInUse;
        return new StepTiming(configName, backend.Name, trainable.ToString(), shape.SequenceLengths.Length, shape.SequenceLengths[0], shape.Tiles, steps,
            median, shape.TextTokens / median, flops / 1e12, flops / median / 1e12, peakFlops is null ? null : flops / median / peakFlops,
            peak, estimate.Total, (double)peak / estimate.Total) { Ops = ops, ProfiledStepMilliseconds = profiledStep };
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
