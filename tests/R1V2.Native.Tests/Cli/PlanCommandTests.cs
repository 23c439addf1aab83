using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Tests.Cli;

/// <summary>`engine plan`: its arithmetic against hand counts on the 38B config, and its advice.</summary>
public sealed class PlanCommandTests
{
    private static string Config(string name) => Path.Combine(AppContext.BaseDirectory, "configs", name);

    private static PlanCommand.Request Request(int gpus, int tp, TrainableParts trainable, string stage = "grpo", bool shard = false, bool ckpt = false) =>
        new(Config("r1v2-38b.json"), gpus, tp, stage, trainable, PlanCommand.ParseBytes("80GB"), 4096, 7, 1, 64, 2048, 2048, ckpt, shard, false, DType.BF16);

    [Fact]
    public void Weights_AreTheDecoderCutTpWays_AndTheVitWhole()
    {
        var c = VlmConfig.Load(Config("r1v2-38b.json"));
        long vit = 0, cut = 0, whole = 0;
        foreach (var (name, shape) in VlmWeights.Expected(c))
        {
            long n = shape.Aggregate(1L, (a, b) => a * b);
            if (name.StartsWith(VlmWeights.Vit, StringComparison.Ordinal)) vit += n;
            else if (StepCost.TensorParallelCut(name)) cut += n;
            else whole += n;
        }
        Assert.InRange(vit / 1e9, 5.5, 6.0);           // InternViT-6B
        Assert.InRange(cut / 1e9, 32.0, 33.5);         // QwQ-32B's matmuls, embedding and head
        var p1 = PlanCommand.Compute(Request(8, 1, TrainableParts.Adapter));
        var p8 = PlanCommand.Compute(Request(8, 8, TrainableParts.Adapter));
        // bf16: 2 bytes a value, each tensor rounded up to the pool's size classes (about 5% over the raw bytes here).
        long Expected(int tp) => VlmWeights.Expected(c).Sum(x =>
        {
            long n = x.Shape.Aggregate(1L, (a, b) => a * b);
            return R1V2.Native.Engine.Backends.MemoryPool<R1V2.Native.Engine.Backends.DeviceBlock>.RoundUp((StepCost.TensorParallelCut(x.Name) ? (n + tp - 1) / tp : n) * 2);
        });
        Assert.Equal(Expected(1), p1.Step.Weights);
        Assert.Equal(Expected(8), p8.Step.Weights);
        Assert.InRange(p1.Step.Weights / 2.0 / (vit + cut + whole), 1.0, 1.07);
        Assert.InRange(p8.Step.Weights / 2.0 / (vit + whole + cut / 8.0), 1.0, 1.07);
        // The KV cache of 64 rollouts of 4096 tokens: 2 x 64 layers x 8 kv heads x 128 x 2 bytes a token, kv heads cut 8 ways.
        Assert.Equal(64L * 4096 * 2 * 64 * 8 / 8 * 128 * 2, p8.KvCache);
    }

    [Fact]
    public void ShardingTheOptimizer_DividesMastersAndMomentsByTheDataParallelRanks()
    {
        var replicated = PlanCommand.Compute(Request(16, 8, TrainableParts.AdapterAndLlm));
        var sharded = PlanCommand.Compute(Request(16, 8, TrainableParts.AdapterAndLlm, shard: true));
        // Half, less the per-tensor pool rounding the one flat shard does not pay.
        Assert.InRange(sharded.Step.Optimiser / (double)replicated.Step.Optimiser, 0.45, 0.51);
        Assert.InRange(sharded.Step.Masters / (double)replicated.Step.Masters, 0.45, 0.51);
        Assert.Equal(replicated.Step.Activations, sharded.Step.Activations);
    }

    [Fact]
    public void APlanThatDoesNotFit_ListsChangesThatLowerIt()
    {
        var p = PlanCommand.Compute(Request(16, 8, TrainableParts.All));
        Assert.False(p.Fits);
        var alternatives = PlanCommand.Alternatives(p);
        Assert.Contains(alternatives, a => a.Change.StartsWith("--checkpoint-layers") && a.Plan.Total < p.Total);
        Assert.Contains(alternatives, a => a.Change.StartsWith("--shard-optimizer") && a.Plan.Total < p.Total);
        Assert.Contains(alternatives, a => a.Change.StartsWith("--trainable adapter+llm") && a.Plan.Total < p.Total);
        Assert.All(alternatives, a => Assert.True(a.Plan.Total < p.Total, $"{a.Change} does not lower the plan"));
    }

    [Theory]
    [InlineData("80GB", 80_000_000_000L)]
    [InlineData("141 GB", 141_000_000_000L)]
    [InlineData("96GiB", 96L << 30)]
    public void GpuMemory_ParsesItsUnits(string text, long bytes) => Assert.Equal(bytes, PlanCommand.ParseBytes(text));

    [Fact]
    public void BadArguments_AreErrorsNamingThem()
    {
        Assert.Contains("--gpu-memory", Assert.Throws<ArgumentException>(() => PlanCommand.ParseBytes("lots")).Message);
        Assert.Contains("--gpus 6 must be a positive multiple of --tp 4", Assert.Throws<ArgumentException>(() => PlanCommand.Compute(Request(6, 4, TrainableParts.Adapter))).Message);
        Assert.Contains("tensor-parallel size 3", Assert.Throws<ArgumentException>(() => PlanCommand.Compute(Request(3, 3, TrainableParts.Adapter))).Message);
    }
}
