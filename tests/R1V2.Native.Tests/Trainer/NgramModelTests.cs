using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Tasks;

namespace R1V2.Native.Tests.Trainer;

/// <summary>The ops composed into a model: whole-model gradients, training, determinism, optimiser guards.</summary>
[Collection("cpu")]
public sealed class NgramModelTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void NgramMlpModel_EveryParameterGradient_MatchesFiniteDifferencesOfTheLoss()
    {
        var config = new NgramMlpConfig(Vocab: 11, Context: 2, Hidden: 8, Intermediate: 12, Layers: 2);
        using var model = new NgramMlpModel(_b, config, seed: 5);
        var contexts = TestData.Ints(1, 10 * 2, 11);
        var targets = TestData.Ints(2, 10, 11);
        foreach (var p in model.Parameters) p.ZeroGrad();
        model.Step(contexts, targets, backward: true);

        foreach (var p in model.Parameters)
        {
            var grad = p.Grad!.ToFloatArray();
            var w = p.Value.ToFloatArray();
            // The three coordinates with the largest gradient: enough signal above fp32 noise (~1e-4 at h = 1e-2).
            foreach (int i in Enumerable.Range(0, grad.Length).OrderByDescending(i => Math.Abs(grad[i])).Take(3))
            {
                float x = w[i];
                w[i] = x + 1e-2f; p.Value.CopyFrom(w);
                double up = model.Step(contexts, targets, backward: false);
                w[i] = x - 1e-2f; p.Value.CopyFrom(w);
                double down = model.Step(contexts, targets, backward: false);
                w[i] = x; p.Value.CopyFrom(w);
                double fd = (up - down) / 2e-2;
                Assert.True(Math.Abs(fd - grad[i]) <= 5e-4 + 2e-2 * Math.Abs(grad[i]),
                    $"{p.Name}[{i}]: finite difference {fd:E4}, backward {grad[i]:E4}");
            }
        }
    }

    private static readonly string Corpus = string.Concat(Engine.Kernels.KernelSources.Families.Values);

    [Fact]
    public void NextTokenTask_LossFalls_AndTheRunReproducesBitForBitFromItsSeed()
    {
        var settings = new NextTokenSettings(Steps: 80, BatchTokens: 64, LearningRate: 1e-2f, WarmupSteps: 5, Seed: 9, EvalEvery: 40);
        var config = new NgramMlpConfig(NextTokenTask.Vocab, Context: 3, Hidden: 32, Intermediate: 64, Layers: 1);
        var a = new NextTokenTask(Corpus).Run(_b, config, settings);
        var b = new NextTokenTask(Corpus).Run(_b, config, settings);
        Assert.Equal(a.Select(m => m.Loss), b.Select(m => m.Loss));
        Assert.True(a[0].Loss > 5.0, $"initial loss {a[0].Loss} should be near ln 256 = 5.55");
        // Below the corpus' unigram entropy (about 3.5 nats): the model has learned to use its context, not just byte counts.
        var counts = System.Text.Encoding.UTF8.GetBytes(Corpus).GroupBy(x => x).Select(g => (double)g.Count()).ToArray();
        double unigram = -counts.Sum(c => c / counts.Sum() * Math.Log(c / counts.Sum()));
        Assert.True(a[^1].HeldOutLoss < unigram, $"held-out loss {a[^1].HeldOutLoss} after 80 steps is not below the unigram entropy {unigram}");
        Assert.DoesNotContain(a, m => m.Skipped);
    }

    [Fact]
    public void AdamWOptimizer_NonFiniteGradient_SkipsTheStepAndLeavesWeightsAlone()
    {
        using var p = Engine.Layers.Parameter.Create(_b, "w", [4], [1f, 2f, 3f, 4f]);
        using var opt = new AdamWOptimizer(_b, [p], new AdamWSettings(0.1f));
        p.Grad!.CopyFrom([1f, float.NaN, 0f, 0f]);
        var report = opt.Step(0.1f);
        Assert.True(report.Skipped);
        Assert.Equal(0, opt.StepCount);
        Assert.Equal([1f, 2f, 3f, 4f], p.Value.ToFloatArray());
        p.Grad.CopyFrom([1f, 1f, 1f, 1f]);
        Assert.False(opt.Step(0.1f).Skipped);
        Assert.Equal(1, opt.StepCount);
        Assert.All(p.Value.ToFloatArray().Zip([1f, 2f, 3f, 4f]), z => Assert.True(z.First < z.Second, "weights should move against the gradient"));
    }

    [Fact]
    public void LearningRateSchedule_WarmsUpThenDecaysToTheFloor()
    {
        var cos = new LearningRateSchedule(1f, WarmupSteps: 10, TotalSteps: 110, ScheduleKind.Cosine, MinRatio: 0.1f);
        Assert.Equal(0.1f, cos.At(1), 6);
        Assert.Equal(1f, cos.At(10), 6);
        Assert.Equal(0.55f, cos.At(60), 5);   // halfway through the decay: floor + half the range
        Assert.Equal(0.1f, cos.At(110), 6);
        var lin = new LearningRateSchedule(2f, 0, 100, ScheduleKind.Linear, MinRatio: 0f);
        Assert.Equal(1f, lin.At(50), 5);
        Assert.Equal(2f, new LearningRateSchedule(2f, 0, 100, ScheduleKind.Constant).At(99));
    }
}
