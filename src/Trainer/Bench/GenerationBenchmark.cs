using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Trainer.Bench;

/// <summary>Prefill and decode throughput at one batch size, with decode's share of the memory-bandwidth roofline.</summary>
public sealed record GenerationTiming(string Config, string Backend, int Batch, int PromptTokens, int NewTokens, double PrefillTokensPerSecond,
    double DecodeTokensPerSecond, double DecodeStepMilliseconds, double DecodeBytesPerStep, double DecodeGigabytesPerSecond, double? PercentOfBandwidth)
{
    /// <summary>With profiling: each op's calls and synchronized milliseconds per decode step (prefill included, spread over the steps).</summary>
    public IReadOnlyList<OpProfile.Entry>? Ops { get; init; }

    /// <summary>With profiling: wall milliseconds of the profiled run per decode step (ops plus the host code between them).</summary>
    public double? ProfiledStepMilliseconds { get; init; }
}

/// <summary>
/// Times generation of a randomly initialised config: <c>batch</c> text prompts of <c>prompt</c> tokens, each extended by
/// <c>new</c> greedy tokens (no early stop). A decode step must read every LLM weight once and each sequence's cached
/// keys and values; that byte count over the measured step time, against the device's DRAM bandwidth, is the roofline
/// share (CUDA only; the CPU has no known peak here).
/// </summary>
public static class GenerationBenchmark
{
    public static GenerationTiming Run(Backend backend, VlmConfig config, string name, int batch, int prompt, int newTokens, double? peakBandwidth, bool profile = false)
    {
        using var store = new ParameterStore(backend, config, TrainableParts.None, (n, s) => VlmWeights.RandomInit(config, n, s, 1));
        using var model = new VisionLanguageModel(backend, config, store, 261);
        var rng = new Random(3);
        var requests = Enumerable.Range(0, batch).Select(_ =>
            new GenerationRequest(Enumerable.Range(0, prompt).Select(_ => rng.Next(256)).ToArray(), MaxNewTokens: newTokens)).ToList();
        int blocks = batch * ((prompt + newTokens) / 16 + 2);
        var gen = new Generator(model, options: new GeneratorOptions(CacheBlocks: blocks, MaxBatch: batch));
        gen.Generate(requests.Take(1).Select(r => r with { MaxNewTokens = 2 }).ToList()); // compile kernels, fill the pool
        gen.Generate(requests);
        var s = gen.LastStats!;
        var l = config.Llm;
        // Every LLM weight is read once per step, except the input embedding table (only B rows), unless it is also the head.
        long llmWeights = VlmWeights.Expected(config).Where(t => t.Name.StartsWith(VlmWeights.Llm, StringComparison.Ordinal))
            .Sum(t => t.Shape.Aggregate(1L, (a, d) => a * d)) - (l.TieWordEmbeddings ? 0 : (long)l.VocabSize * l.HiddenSize);
        long weightBytes = llmWeights * backend.ActivationType.Size();
        double meanContext = prompt + newTokens / 2.0;
        double kvBytes = batch * meanContext * l.NumLayers * 2.0 * l.NumKvHeads * l.HeadDim * backend.ActivationType.Size();
        double stepSeconds = s.DecodeSeconds / Math.Max(1, s.DecodeSteps);
        double bytesPerStep = weightBytes + kvBytes;
        double gbps = bytesPerStep / stepSeconds / 1e9;
        var timing = new GenerationTiming(name, backend.Name, batch, prompt, newTokens, s.PrefillTokens / s.PrefillSeconds, s.DecodedTokens / s.DecodeSeconds,
            stepSeconds * 1e3, bytesPerStep, gbps, peakBandwidth is null ? null : 100 * gbps * 1e9 / peakBandwidth);
        if (!profile) return timing;
        // The same generation again with every op synchronized and timed.
        var p = backend.StartProfiling();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        gen.Generate(requests);
        backend.Synchronize();
        backend.StopProfiling();
        int steps = Math.Max(1, gen.LastStats!.DecodeSteps);
        return timing with
        {
            Ops = [.. p.Entries.Select(e => e with { Calls = (e.Calls + steps - 1) / steps, Milliseconds = e.Milliseconds / steps })],
            ProfiledStepMilliseconds = clock.Elapsed.TotalMilliseconds / steps,
        };
    }
}
