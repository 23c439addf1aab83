using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Non-finite numbers: in loaded weights an error naming the tensor; in gradients a skipped, counted step, and too many in a row stop the run.</summary>
[Collection("cpu")]
public sealed class NumericsGuardTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-numerics-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Theory]
    [InlineData(float.NaN)]
    [InlineData(float.PositiveInfinity)]
    [InlineData(float.NegativeInfinity)]
    public void ANonFiniteWeight_IsAnErrorNamingItsTensor_UnlessInspectionAllowsIt(float bad)
    {
        var ckpt = Path.Combine(_dir, "m");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 1);
        const string name = "language_model.model.layers.1.mlp.up_proj.weight";
        using (var model = VisionLanguageModel.Load(fx.Backend, ckpt))
        {
            var w = model.Parameters[name].Value.ToFloatArray();
            w[37] = bad;                                              // past the first SIMD vector: the scan must reach it
            model.Parameters[name].Value.CopyFrom(w);
            model.Save(ckpt);
        }
        var e = Assert.Throws<CheckpointException>(() => VisionLanguageModel.Load(fx.Backend, ckpt));
        Assert.Contains($"tensor '{name}' holds {bad} at element 37", e.Message);
        Checkpoint.AllowNonFiniteWeights = true;
        try
        {
            using var inspected = VisionLanguageModel.Load(fx.Backend, ckpt);
            Assert.Equal(bad, inspected.Parameters[name].Value.ToFloatArray()[37]);
        }
        finally { Checkpoint.AllowNonFiniteWeights = false; }
    }

    [Fact]
    public void NonFiniteGradients_SkipTheStep_AndTooManyInARowStopTheRun()
    {
        using var p = Parameter.Create(fx.Backend, "w", [4], [1f, 2f, 3f, 4f]);
        using var opt = new AdamWOptimizer(fx.Backend, [p], new AdamWSettings(0.1f));
        var guard = new NonFiniteGuard(3);
        void Gradient(float g) => p.Grad!.CopyFrom([g, 0.5f, 0.5f, 0.5f]);

        Gradient(float.NaN);
        Assert.True(guard.Step(opt, 0.1f, 0).Skipped);
        Assert.Equal([1f, 2f, 3f, 4f], p.Value.ToFloatArray());       // a skipped step leaves the weights as they were
        Gradient(0.5f);
        Assert.False(guard.Step(opt, 0.1f, 1).Skipped);
        Assert.Equal(0, guard.InARow);                                 // a good step resets the count
        Gradient(float.PositiveInfinity);
        guard.Step(opt, 0.1f, 2);
        guard.Step(opt, 0.1f, 3);
        Assert.Equal(2, guard.InARow);
        var e = Assert.Throws<InvalidOperationException>(() => guard.Step(opt, 0.1f, 4));
        Assert.Equal("step 5: 3 updates in a row had a non-finite gradient norm; stopping (optim.max_skipped_steps; lower optim.lr or check the data)", e.Message);
        Assert.Equal(10, new R1V2.Native.Trainer.Config.TrainConfig().Optim.MaxSkippedSteps);
    }
}
