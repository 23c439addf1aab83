using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Pipeline;
using R1V2.Native.Trainer.Tasks;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Vision alignment of the digit pipeline: which image token sees which cell, and what training changes.</summary>
[Collection("cpu")]
public sealed class VisionPretrainingTests(CpuFixture fx)
{
    private static VlmConfig Config(string name) => VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", name + ".json"));

    [Theory]
    [InlineData("digits")]
    [InlineData("digits-tiny")]
    public void EveryCellIsSeenByExactlyOneImageToken(string config)
    {
        var c = Config(config);
        var cells = VisionPretraining.TokenCells(c, DigitScenes.GridCells);
        Assert.Equal(c.TokensPerTile, cells.Length);
        // Each token holds the 2 x 2 patches of one cell, and the tokens run over the cells row by row.
        Assert.Equal(Enumerable.Range(0, 16), cells);
    }

    [Fact]
    public void AModelWhosePatchGridDoesNotRefineTheCells_IsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() => VisionPretraining.TokenCells(Config("tiny"), DigitScenes.GridCells));
        Assert.Contains("must lie in one of the 4 x 4 cells", e.Message);
    }

    [Fact]
    public void Training_LowersTheProbeLoss_MovesTheVisionSide_AndLeavesTheLlmAlone()
    {
        var c = Config("digits-tiny");
        using var store = new ParameterStore(fx.Backend, c, TrainableParts.AdapterAndVit, (n, s) => VlmWeights.RandomInit(c, n, s, 5));
        using var model = new VisionLanguageModel(fx.Backend, c, store, 261);
        var before = store.All.ToDictionary(p => p.Name, p => p.Parameter.Value.ToFloatArray());
        var digits = MnistDigits.Embedded();
        var rng = new Random(3);
        var rows = Enumerable.Range(0, VisionPretraining.Classes * c.Llm.HiddenSize).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
        var result = VisionPretraining.Run(model, new DigitScenes(digits, DigitSplit.Train, 32), new DigitScenes(digits, DigitSplit.HeldOut, 32),
            new VisionPretrainSettings(Steps: 40, Batch: 8, LearningRate: 3e-3f, Seed: 2, HeldOutScenes: 20), rows);
        Assert.Equal(40, result.Losses.Count);
        double first = result.Losses.Take(5).Average(), last = result.Losses.TakeLast(5).Average();
        Assert.True(last < 0.7 * first, $"probe loss {first:F3} -> {last:F3}");
        foreach (var (name, p) in store.All)
        {
            bool moved = !before[name].AsSpan().SequenceEqual(p.Value.ToFloatArray());
            if (name.StartsWith(VlmWeights.Llm, StringComparison.Ordinal)) Assert.False(moved, $"{name} changed");
        }
        Assert.Contains(store.All, p => p.Name.StartsWith(VlmWeights.Vit, StringComparison.Ordinal) && !before[p.Name].AsSpan().SequenceEqual(p.Parameter.Value.ToFloatArray()));
        Assert.Contains(store.All, p => p.Name.StartsWith(VlmWeights.Adapter, StringComparison.Ordinal) && !before[p.Name].AsSpan().SequenceEqual(p.Parameter.Value.ToFloatArray()));
    }
}
