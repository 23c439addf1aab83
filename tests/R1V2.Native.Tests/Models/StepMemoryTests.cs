using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Optim;
using Xunit.Abstractions;

namespace R1V2.Native.Tests.Models;

/// <summary>The documented memory estimate of a training step against the pool's measured peak.</summary>
public sealed class StepMemoryTests(ITestOutputHelper output)
{
    /// <param name="optimizerStep">false: forward and backward only (no AdamW moments; the estimate leaves them out too).</param>
    public static (long Peak, MemoryEstimate Estimate) Measure(string configName, StepShape shape, TrainableParts parts, bool checkpoint = false, bool responseOnly = false,
        bool optimizerStep = true)
    {
        var config = VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", configName + ".json"));
        using var b = new CpuBackend();
        using var store = new ParameterStore(b, config, parts, (n, s) => VlmWeights.RandomInit(config, n, s, 1));
        const int imageContext = 261;
        using var model = new VisionLanguageModel(b, config, store, imageContext) { CheckpointLlm = checkpoint, CheckpointVit = checkpoint };
        GC.Collect(); // the initial values' host arrays (gigabytes at real widths)
        using var opt = optimizerStep ? new AdamWOptimizer(b, store.Trainable, new AdamWSettings(1e-3f)) : null; // moments live across steps
        var ids = new List<int>();
        var cu = new List<int> { 0 };
        int tilesPerSeq = shape.Tiles / shape.SequenceLengths.Length;
        var rng = new Random(2);
        foreach (var n in shape.SequenceLengths)
        {
            int image = tilesPerSeq * config.TokensPerTile;
            ids.Add(259);
            ids.AddRange(Enumerable.Repeat(imageContext, image));
            ids.Add(260);
            while (ids.Count < cu[^1] + n) ids.Add(rng.Next(256));
            cu.Add(ids.Count);
        }
        // Every row scored, or (as the trainers pack responses) only each sequence's last quarter.
        var targets = ids.Select((_, i) => i + 1 < ids.Count && (!responseOnly || cu.Any(e => i >= e - shape.SequenceLengths[0] / 4 - 1 && i < e - 1)) ? ids[i + 1] : Backend.IgnoreIndex).ToArray();
        shape = shape with { Scored = targets.Count(x => x != Backend.IgnoreIndex) };
        int s = config.ForceImageSize;
        var batch = new VlmBatch([.. ids], targets, [.. cu], TestData.Uniform(3, shape.Tiles * 3 * s * s), shape.Tiles);
        using (var pass = model.Forward(batch)) model.Backward(pass);
        opt?.Step(1e-3f);
        var estimate = StepCost.TrainingMemory(config, shape, parts, DType.F32, checkpoint);
        return (b.Memory.PeakBytesInUse, optimizerStep ? estimate : estimate with { Optimiser = 0 });
    }

    [Theory]
    [InlineData("small", 2, 96, 2, TrainableParts.All, false, false)]
    [InlineData("small", 1, 160, 3, TrainableParts.Adapter, false, false)]
    [InlineData("tiny", 4, 48, 2, TrainableParts.AdapterAndLlm, false, false)]
    [InlineData("small", 2, 96, 2, TrainableParts.All, true, false)]
    [InlineData("small", 2, 128, 2, TrainableParts.AdapterAndLlm, true, true)]
    [InlineData("small", 1, 160, 3, TrainableParts.Adapter, false, true)]
    public void PeakMemoryOfATrainingStep_IsWithin5PercentOfTheEstimate(string config, int sequences, int tokens, int tilesPerSequence, TrainableParts parts,
        bool checkpoint, bool responseOnly)
    {
        var shape = StepShape.Uniform(sequences, tokens, tilesPerSequence);
        var (peak, estimate) = Measure(config, shape, parts, checkpoint, responseOnly);
        double ratio = (double)peak / estimate.Total;
        output.WriteLine($"{config} {parts}: measured {peak:N0} B, estimate {estimate.Total:N0} B, ratio {ratio:F4}");
        Assert.True(ratio is > 0.95 and < 1.05, $"measured peak {peak:N0} B vs estimate {estimate.Total:N0} B (ratio {ratio:F3}): {estimate}");
    }

    /// <summary>
    /// R1V2-38B's widths (ViT 3200 / 25 heads / 12800, LLM 5120 / 40 / 8 / 27648, vocabulary 152064, 448-pixel tiles
    /// of 14-pixel patches) with 1 ViT and 2 decoder layers (configs/r1v2-38b-width.json, 11 GB of fp32 weights):
    /// forward and backward of a supervised step with per-layer activation checkpointing; the pool's peak against
    /// StepCost. Opt-in (R1V2_REAL_WIDTH=1): minutes of CPU per case and more memory than the default suite may take.
    /// </summary>
    [SkippableTheory]
    [InlineData(TrainableParts.Adapter)]
    [InlineData(TrainableParts.AdapterAndLlm)]
    public void RealWidths_PeakOfForwardAndBackward_IsWithin5PercentOfStepCost(TrainableParts parts)
    {
        Skip.IfNot(Environment.GetEnvironmentVariable("R1V2_REAL_WIDTH") == "1", "opt-in: set R1V2_REAL_WIDTH=1 (11 GB of fp32 weights, minutes of CPU per case)");
        var config = VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", "r1v2-38b-width.json"));
        var shape = StepShape.Uniform(1, 384, 1);
        var need = StepCost.TrainingMemory(config, shape, parts, DType.F32, checkpointLayers: true);
        long available = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        Skip.If((need.Total - need.Optimiser) * 1.15 > available,
            $"needs about {(need.Total - need.Optimiser) / 1e9:F1} GB for weights, gradients and activations; this machine offers {available / 1e9:F1} GB");
        var (peak, estimate) = Measure("r1v2-38b-width", shape, parts, checkpoint: true, responseOnly: true, optimizerStep: false);
        double ratio = (double)peak / estimate.Total;
        output.WriteLine($"r1v2-38b-width {parts}: measured {peak:N0} B, estimate {estimate.Total:N0} B, ratio {ratio:F4}: {estimate}");
        Assert.True(ratio is > 0.95 and < 1.05, $"measured peak {peak:N0} B vs estimate {estimate.Total:N0} B (ratio {ratio:F3}): {estimate}");
    }
}
