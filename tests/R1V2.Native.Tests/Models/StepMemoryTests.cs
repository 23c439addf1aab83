using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Tests.Models;

/// <summary>The documented memory estimate of a training step against the pool's measured peak.</summary>
public sealed class StepMemoryTests
{
    public static (long Peak, MemoryEstimate Estimate) Measure(string configName, StepShape shape, TrainableParts parts, bool checkpoint = false)
    {
        var config = VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", configName + ".json"));
        using var b = new CpuBackend();
        using var store = new ParameterStore(b, config, parts, (n, s) => VlmWeights.RandomInit(config, n, s, 1));
        const int imageContext = 261;
        using var model = new VisionLanguageModel(b, config, store, imageContext) { CheckpointLlm = checkpoint, CheckpointVit = checkpoint };
        using var opt = new AdamWOptimizer(b, store.Trainable, new AdamWSettings(1e-3f));
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
        var targets = ids.Select((_, i) => i + 1 < ids.Count ? ids[i + 1] : Backend.IgnoreIndex).ToArray();
        int s = config.ForceImageSize;
        var batch = new VlmBatch([.. ids], targets, [.. cu], TestData.Uniform(3, shape.Tiles * 3 * s * s), shape.Tiles);
        opt.ZeroGrad();
        using (var pass = model.Forward(batch)) model.Backward(pass);
        opt.Step(1e-3f);
        return (b.Memory.PeakBytesInUse, StepCost.TrainingMemory(config, shape, parts, DType.F32));
    }

    [Theory]
    [InlineData("small", 2, 96, 2, TrainableParts.All)]
    [InlineData("small", 1, 160, 3, TrainableParts.Adapter)]
    [InlineData("tiny", 4, 48, 2, TrainableParts.AdapterAndLlm)]
    public void PeakMemoryOfATrainingStep_IsWithin20PercentOfTheEstimate(string config, int sequences, int tokens, int tilesPerSequence, TrainableParts parts)
    {
        var shape = StepShape.Uniform(sequences, tokens, tilesPerSequence);
        var (peak, estimate) = Measure(config, shape, parts);
        double ratio = (double)peak / estimate.Total;
        Assert.True(ratio is > 0.8 and < 1.2, $"measured peak {peak:N0} B vs estimate {estimate.Total:N0} B (ratio {ratio:F3}): {estimate}");
    }
}
