using System.Text;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer.Tasks;

/// <summary>Settings of a next-token run.</summary>
public sealed record NextTokenSettings(int Steps = 300, int BatchTokens = 256, float LearningRate = 3e-3f, int WarmupSteps = 20, int Seed = 1234,
    int EvalEvery = 25, double MaxGradNorm = 1.0);

/// <summary>One logged step.</summary>
public sealed record NextTokenMetrics(int Step, double Loss, double? HeldOutLoss, double GradNorm, float LearningRate, bool Skipped);

/// <summary>
/// Trains the <see cref="NgramMlpModel"/> to predict the next byte of a text: a fixed split (the last 10% of the
/// bytes are held out and never trained on), seeded batches of random positions, AdamW with warm-up and cosine decay,
/// clipping, and held-out loss every few steps. It exercises every op of the library forward and backward.
/// </summary>
public sealed class NextTokenTask
{
    private readonly byte[] _train, _heldOut;

    public NextTokenTask(string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        if (bytes.Length < 200) throw new ArgumentException($"the corpus has {bytes.Length} bytes; at least 200 are needed");
        int split = bytes.Length * 9 / 10;
        _train = bytes[..split];
        _heldOut = bytes[split..];
    }

    public const int Vocab = 256;

    /// <summary>Runs the whole schedule; <paramref name="onStep"/> sees every step.</summary>
    public IReadOnlyList<NextTokenMetrics> Run(Backend backend, NgramMlpConfig config, NextTokenSettings s, Action<NextTokenMetrics>? onStep = null)
    {
        if (config.Vocab != Vocab) throw new ArgumentException($"the byte task needs a vocabulary of {Vocab}, got {config.Vocab}");
        using var model = new NgramMlpModel(backend, config, s.Seed);
        using var optimizer = new AdamWOptimizer(backend, model.Parameters, new AdamWSettings(s.LearningRate, 0.9f, 0.95f, 1e-8f, 0.01f), s.MaxGradNorm);
        var schedule = new LearningRateSchedule(s.LearningRate, s.WarmupSteps, s.Steps);
        var rng = new Random(s.Seed);
        var log = new List<NextTokenMetrics>();
        var (evalContexts, evalTargets) = Windows(_heldOut, config.Context, Enumerable.Range(config.Context, _heldOut.Length - config.Context).ToArray());
        for (int step = 1; step <= s.Steps; step++)
        {
            var positions = new int[s.BatchTokens];
            for (int i = 0; i < positions.Length; i++) positions[i] = rng.Next(config.Context, _train.Length);
            var (contexts, targets) = Windows(_train, config.Context, positions);
            optimizer.ZeroGrad();
            double loss = model.Step(contexts, targets, backward: true);
            var report = optimizer.Step(schedule.At(step));
            double? held = step % s.EvalEvery == 0 || step == s.Steps ? model.Step(evalContexts, evalTargets, backward: false) : null;
            var m = new NextTokenMetrics(step, loss, held, report.GradNorm, report.LearningRate, report.Skipped);
            log.Add(m);
            onStep?.Invoke(m);
        }
        return log;
    }

    /// <summary>For each position p: the <paramref name="context"/> bytes before it (nearest last) and the byte at p.</summary>
    private static (int[] Contexts, int[] Targets) Windows(byte[] data, int context, int[] positions)
    {
        var contexts = new int[positions.Length * context];
        var targets = new int[positions.Length];
        for (int i = 0; i < positions.Length; i++)
        {
            int p = positions[i];
            for (int k = 0; k < context; k++) contexts[i * context + k] = data[p - context + k];
            targets[i] = data[p];
        }
        return (contexts, targets);
    }
}
