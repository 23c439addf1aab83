using System.CommandLine;
using R1V2.Native.Engine.Backends.Cuda;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Bench;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine bench kernels`: times every CUDA kernel with CUDA events and writes JSON under perf/results/.</summary>
public static class BenchCommand
{
    public static Command Create()
    {
        var output = new Option<string>("--out") { Description = "Directory for the JSON results", DefaultValueFactory = _ => Path.Combine("perf", "results") };
        var repeats = new Option<int>("--repeats") { Description = "Timed repeats per kernel (at least 20)", DefaultValueFactory = _ => 25 };
        var baseline = new Option<string?>("--baseline") { Description = "Baseline JSON to gate against (default: perf/baselines/<gpu>.json when it exists); a kernel more than 5% below it fails the run" };
        var writeBaseline = new Option<bool>("--write-baseline") { Description = "Also write this run as perf/baselines/<gpu>.json" };
        var kernels = new Command("kernels", "Time each CUDA kernel (warm-up, L2 flushed, median) and report GB/s or TFLOP/s and % of peak; gate against the GPU's baseline")
            { output, repeats, baseline, writeBaseline };
        kernels.SetAction(r => RunKernels(r.GetValue(output)!, r.GetValue(repeats), r.GetValue(baseline), r.GetValue(writeBaseline)));
        var config = new Option<string>("--config") { Description = "Model config", DefaultValueFactory = _ => Path.Combine("configs", "small.json") };
        var sequences = new Option<int>("--sequences") { Description = "Packed sequences per step", DefaultValueFactory = _ => 2 };
        var tokens = new Option<int>("--tokens") { Description = "Tokens per sequence", DefaultValueFactory = _ => 128 };
        var tiles = new Option<int>("--tiles") { Description = "Image tiles per sequence", DefaultValueFactory = _ => 1 };
        var steps = new Option<int>("--steps") { Description = "Timed steps (after one untimed)", DefaultValueFactory = _ => 5 };
        var trainable = new Option<string>("--trainable") { Description = "adapter | adapter+llm | adapter+vit | all", DefaultValueFactory = _ => "all" };
        var backend = Backends.Option();
        var profile = new Option<bool>("--profile") { Description = "Then run the steps again with every op synchronized and timed, and print the time per op" };
        var stage = new Option<string>("--stage")
        {
            Description = "Whose loss the steps run: model (every text row scored), sft, rm, mpo (reference + policy) or grpo; the last four score each sequence's last half of text tokens",
            DefaultValueFactory = _ => "model",
        };
        stage.AcceptOnlyFromAmong("model", "sft", "rm", "mpo", "grpo");
        var checkpointLayers = new Option<bool>("--checkpoint-layers") { Description = "Per-layer activation checkpointing (keep each layer's input, recompute in backward)" };
        var model = new Command("model", "Time forward + backward + AdamW steps of a config: tokens/s, MFU, peak memory against the estimate")
            { config, sequences, tokens, tiles, steps, trainable, backend, output, profile, stage, checkpointLayers };
        model.SetAction(r => RunModel(r.GetValue(config)!, r.GetValue(sequences), r.GetValue(tokens), r.GetValue(tiles), r.GetValue(steps),
            r.GetValue(trainable)!, r.GetValue(backend)!, r.GetValue(output)!, r.GetValue(profile), Enum.Parse<BenchStage>(r.GetValue(stage)!, ignoreCase: true),
            r.GetValue(checkpointLayers)));
        var genConfig = new Option<string>("--config") { Description = "Model config", DefaultValueFactory = _ => Path.Combine("configs", "small.json") };
        var batches = new Option<string>("--batch") { Description = "Comma-separated batch sizes", DefaultValueFactory = _ => "1,4,16" };
        var promptLen = new Option<int>("--prompt") { Description = "Prompt tokens per sequence", DefaultValueFactory = _ => 64 };
        var newTokens = new Option<int>("--new") { Description = "Generated tokens per sequence", DefaultValueFactory = _ => 32 };
        var genBackend = Backends.Option();
        var genProfile = new Option<bool>("--profile") { Description = "Then generate again with every op synchronized and timed, and print the time per op and decode step" };
        var generate = new Command("generate", "Prefill and decode tokens/s against batch size; decode's % of the memory-bandwidth roofline on CUDA")
            { genConfig, batches, promptLen, newTokens, genBackend, output, genProfile };
        generate.SetAction(r => RunGenerate(r.GetValue(genConfig)!, r.GetValue(batches)!, r.GetValue(promptLen), r.GetValue(newTokens), r.GetValue(genBackend)!, r.GetValue(output)!,
            r.GetValue(genProfile)));
        var memConfig = new Option<string>("--config") { Description = "Model config", DefaultValueFactory = _ => Path.Combine("configs", "r1v2-38b.json") };
        var memTokens = new Option<string>("--tokens") { Description = "Comma-separated packed tokens per step (one sequence each)", DefaultValueFactory = _ => "8192,16384" };
        var memTiles = new Option<int>("--tiles") { Description = "Image tiles in the step", DefaultValueFactory = _ => 7 };
        var memScored = new Option<double>("--scored") { Description = "Share of the tokens whose next token is scored (the responses)", DefaultValueFactory = _ => 0.5 };
        var memDtype = new Option<string>("--dtype") { Description = "Activation / weight storage: bf16 (CUDA) or f32 (CPU)", DefaultValueFactory = _ => "bf16" };
        memDtype.AcceptOnlyFromAmong("bf16", "f32");
        var memNoCheckpoint = new Option<bool>("--no-checkpoint-layers") { Description = "Keep every layer's activations instead of recomputing them in backward" };
        var memory = new Command("memory", "Plan a training step's device memory from the config alone (StepCost): weights, masters, gradients, moments, activations, workspace")
            { memConfig, memTokens, memTiles, memScored, memDtype, memNoCheckpoint };
        memory.SetAction(r => RunMemory(r.GetValue(memConfig)!, r.GetValue(memTokens)!, r.GetValue(memTiles), r.GetValue(memScored), r.GetValue(memDtype)!,
            !r.GetValue(memNoCheckpoint)));
        return new Command("bench", "Benchmarks") { kernels, model, generate, memory, BenchServe.Create() };
    }

    public static int RunGenerate(string configPath, string batches, int prompt, int newTokens, string backendName, string outDir, bool profile = false)
    {
        var config = VlmConfig.Load(configPath);
        var name = Path.GetFileNameWithoutExtension(configPath);
        using var backend = Backends.Create(backendName);
        double? peak = backend is CudaBackend cuda ? cuda.Device.PeakBandwidthBytesPerSecond : null;
        var table = new Table().AddColumns("batch", "prefill tok/s", "decode tok/s", "decode step (ms)", "decode GB/s", "% of DRAM roofline");
        var results = new List<GenerationTiming>();
        foreach (var b in batches.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse))
        {
            var t = GenerationBenchmark.Run(backend, config, name, b, prompt, newTokens, peak, profile);
            results.Add(t);
            table.AddRow(b.ToString(), t.PrefillTokensPerSecond.ToString("F0"), t.DecodeTokensPerSecond.ToString("F0"), t.DecodeStepMilliseconds.ToString("F1"),
                t.DecodeGigabytesPerSecond.ToString("F2"), t.PercentOfBandwidth is null ? "-" : t.PercentOfBandwidth.Value.ToString("F1"));
        }
        AnsiConsole.MarkupLineInterpolated($"{name} on {backend.Name}: prompts of {prompt} tokens, {newTokens} new tokens each");
        AnsiConsole.Write(table);
        foreach (var t in results.Where(t => t.Ops is not null))
        {
            double total = t.Ops!.Sum(o => o.Milliseconds);
            var ops = new Table().AddColumns("op", "calls per decode step", "ms per decode step", "% of op time");
            foreach (var o in t.Ops!) ops.AddRow(o.Op, o.Calls.ToString(), o.Milliseconds.ToString("F3"), (100 * o.Milliseconds / total).ToString("F1"));
            AnsiConsole.MarkupLineInterpolated($"batch {t.Batch}, profiled (prefill spread over the decode steps):");
            AnsiConsole.Write(ops);
            AnsiConsole.MarkupLineInterpolated($"profiled {t.ProfiledStepMilliseconds:F2} ms per decode step: {total:F2} ms in ops, {t.ProfiledStepMilliseconds - total:F2} ms in host code between them");
        }
        Directory.CreateDirectory(outDir);
        var path = Path.Combine(outDir, $"generate-{name}-{backend.Name.Replace(':', '-')}-{DateTime.UtcNow:yyyyMMdd-HHmmss}.json");
        File.WriteAllText(path, System.Text.Json.JsonSerializer.Serialize(results, new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
        AnsiConsole.MarkupLineInterpolated($"wrote {path}");
        return 0;
    }

    /// <summary>`engine bench memory`: StepCost's estimate for each token count, adapter-only and LLM-trainable, in GiB.</summary>
    public static int RunMemory(string configPath, string tokens, int tiles, double scored, string dtype, bool checkpointLayers)
    {
        var config = VlmConfig.Load(configPath);
        if (!(scored is > 0 and <= 1)) throw new ArgumentException($"--scored must be in (0, 1], got {scored}");
        var type = dtype == "f32" ? Engine.Tensors.DType.F32 : Engine.Tensors.DType.BF16;
        var table = new Table().AddColumns("tokens", "trainable", "weights", "masters", "grads", "moments", "activations", "workspace", "total (GiB)");
        foreach (var t in tokens.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse))
            foreach (var parts in new[] { TrainableParts.Adapter, TrainableParts.AdapterAndLlm })
            {
                var shape = StepShape.Uniform(1, t, tiles) with { Scored = (int)(t * scored) };
                var e = StepCost.TrainingMemory(config, shape, parts, type, checkpointLayers);
                static string G(long b) => (b / (double)(1L << 30)).ToString("F1");
                table.AddRow(t.ToString(), parts.ToString(), G(e.Weights), G(e.Masters), G(e.Gradients), G(e.Optimiser), G(e.Activations), G(e.BackwardWorkspace), G(e.Total));
            }
        AnsiConsole.MarkupLineInterpolated($"{Path.GetFileNameWithoutExtension(configPath)}: {tiles} tiles, {scored:P0} of the tokens scored, {dtype}, activation checkpointing {(checkpointLayers ? "on" : "off")}; one device, no sharding");
        AnsiConsole.Write(table);
        return 0;
    }

    public static TrainableParts ParseTrainable(string s) => s switch
    {
        "adapter" => TrainableParts.Adapter,
        "adapter+llm" => TrainableParts.AdapterAndLlm,
        "adapter+vit" => TrainableParts.AdapterAndVit,
        "all" => TrainableParts.All,
        _ => throw new ArgumentException($"--trainable must be adapter, adapter+llm, adapter+vit or all, got '{s}'"),
    };

    public static int RunModel(string configPath, int sequences, int tokens, int tiles, int steps, string trainable, string backendName, string outDir,
        bool profile = false, BenchStage stage = BenchStage.Model, bool checkpointLayers = false)
    {
        var config = VlmConfig.Load(configPath);
        using var backend = Backends.Create(backendName);
        double? peak = backend is CudaBackend cuda ? KernelBenchmark.PeakBf16Flops(cuda.Device) : null;
        var shape = StepShape.Uniform(sequences, tokens, tiles);
        StepTiming t = null!;
        AnsiConsole.Status().Start($"timing {steps} steps of {Path.GetFileNameWithoutExtension(configPath)} on {backend.Name}", _ =>
            t = StepBenchmark.Run(backend, config, Path.GetFileNameWithoutExtension(configPath), shape, ParseTrainable(trainable), Math.Max(1, steps), peak, profile: profile, stage: stage, checkpointLayers: checkpointLayers));
        AnsiConsole.MarkupLineInterpolated($"{t.Config} on {t.Backend} ({t.Trainable} trainable, {t.Stage} loss): {t.Sequences} x {t.TokensPerSequence} tokens, {t.Tiles} tiles, {t.ScoredTokens} scored rows per step");
        var mfu = t.Mfu is null ? "(MFU: no peak known for this backend)" : $"MFU {100 * t.Mfu:F1}%";
        AnsiConsole.MarkupLineInterpolated($"median step {t.MedianSeconds * 1e3:F1} ms, {t.TokensPerSecond:F0} tokens/s, {t.AchievedTflops * 1e3:F2} GFLOP/s model FLOPs, {mfu}");
        AnsiConsole.MarkupLineInterpolated($"peak memory {t.PeakBytes / 1048576.0:F1} MiB, estimate {t.EstimatedBytes / 1048576.0:F1} MiB (ratio {t.PeakOverEstimate:F3})");
        AnsiConsole.MarkupLineInterpolated($"loss path peak {t.LossPeakBytes / 1048576.0:F1} MiB over the hidden states ({t.ScoredTokens} scored rows; [[T, V]] fp32 logits of every row would be {t.FullLogitsBytes / 1048576.0:F1} MiB)");
        if (t.Ops is { } ops)
        {
            double total = ops.Sum(o => o.Milliseconds);
            var table = new Table().AddColumns("op", "calls per step", "ms per step", "% of op time");
            foreach (var o in ops) table.AddRow(o.Op, o.Calls.ToString(), o.Milliseconds.ToString("F2"), (100 * o.Milliseconds / total).ToString("F1"));
            AnsiConsole.Write(table);
            AnsiConsole.MarkupLineInterpolated($"profiled step {t.ProfiledStepMilliseconds:F1} ms: {total:F1} ms in ops, {t.ProfiledStepMilliseconds - total:F1} ms in host code between them");
        }
        Directory.CreateDirectory(outDir);
        var path = Path.Combine(outDir, $"model-{t.Stage}-{t.Config}-{t.Backend.Replace(':', '-')}-{DateTime.UtcNow:yyyyMMdd-HHmmss}.json");
        File.WriteAllText(path, System.Text.Json.JsonSerializer.Serialize(t, new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
        AnsiConsole.MarkupLineInterpolated($"wrote {path}");
        return 0;
    }

    /// <summary>The kernel timings as a table; shapes such as "[4096, 1024]" are text, not markup.</summary>
    public static Table KernelTable(IEnumerable<KernelTiming> timings)
    {
        var table = new Table().AddColumns("op", "shape", "dtype", "median (us)", "GB/s", "TFLOP/s", "% of peak", "bound", "kernels (block, registers, spills, occupancy)");
        foreach (var t in timings)
            table.AddRow(Markup.Escape(t.Op), Markup.Escape(t.Shape), Markup.Escape(t.DType), t.MedianMicroseconds.ToString("F1"),
                t.GigabytesPerSecond.ToString("F0"), t.Flops > 0 ? t.TeraflopsPerSecond.ToString("F1") : "-", t.PercentOfPeak.ToString("F1"),
                Markup.Escape(t.Bound), Markup.Escape(string.Join("; ", t.Kernels.Select(k => $"{k.Kernel} ({k.Block}, {k.Registers}, {k.SpillBytes} B, {k.Occupancy:P0})"))));
        return table;
    }

    public static int RunKernels(string outDir, int repeats, string? baselinePath = null, bool writeBaseline = false)
    {
        if (!CudaBackend.IsAvailable(out var reason))
        {
            AnsiConsole.MarkupLineInterpolated($"No CUDA GPU here, so there is nothing to time: {reason}");
            AnsiConsole.MarkupLine("The CPU ops are benchmarked with BenchmarkDotNet: dotnet run -c Release --project perf/R1V2.Native.Perf");
            return 0;
        }
        using var backend = new CudaBackend();
        var d = backend.Device;
        AnsiConsole.MarkupLineInterpolated($"{d.Name} ({d.Arch}, {d.MultiprocessorCount} SMs, {d.PeakBandwidthBytesPerSecond / 1e9:F0} GB/s, {KernelBenchmark.PeakBf16Flops(d) / 1e12:F0} bf16 TFLOP/s peak)");
        var bench = new KernelBenchmark(backend, repeats);
        IReadOnlyList<KernelTiming> timings = [];
        AnsiConsole.Status().Start("timing kernels", _ => timings = bench.RunAll());
        AnsiConsole.Write(KernelTable(timings));
        var path = KernelBenchmark.WriteJson(outDir, d, timings);
        AnsiConsole.MarkupLineInterpolated($"wrote {path}");
        foreach (var t in timings.Where(t => t.PeakBytes is not null))
            AnsiConsole.MarkupLineInterpolated($"{t.Op}: peak memory {t.PeakBytes!.Value / 1048576.0:F1} MiB");
        int status = Gate(timings, d.Name, baselinePath ?? (File.Exists(KernelBaseline.PathFor(d.Name)) ? KernelBaseline.PathFor(d.Name) : null));
        if (writeBaseline)
        {
            var target = KernelBaseline.PathFor(d.Name);
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            File.Copy(path, target, overwrite: true);
            AnsiConsole.MarkupLineInterpolated($"wrote the baseline {target}");
        }
        return status;
    }

    /// <summary>The regression gate: 0 when no kernel fell more than 5% below the baseline's share of peak, else 1 (each named).</summary>
    public static int Gate(IReadOnlyList<KernelTiming> timings, string gpu, string? baselinePath)
    {
        if (baselinePath is null)
        {
            AnsiConsole.MarkupLineInterpolated($"no baseline for {gpu} ({KernelBaseline.PathFor(gpu)}): nothing to gate against (--write-baseline records one)");
            return 0;
        }
        var (baseGpu, baseline) = KernelBaseline.Read(baselinePath);
        if (baseGpu != gpu) throw new InvalidDataException($"{baselinePath} was measured on {baseGpu}, this GPU is {gpu}: a baseline holds for its own GPU model");
        var (regressions, fresh) = KernelBaseline.Compare(timings, baseline);
        foreach (var n in fresh) AnsiConsole.MarkupLineInterpolated($"new (not in the baseline): {n}");
        if (regressions.Count == 0)
        {
            AnsiConsole.MarkupLineInterpolated($"no kernel fell more than {KernelBaseline.Tolerance:P0} below {baselinePath}");
            return 0;
        }
        foreach (var r in regressions)
            AnsiConsole.MarkupLineInterpolated($"[red]regression:[/] {r.Op} {r.Shape}: {r.NowPercent:F1}% of peak, the baseline {r.BaselinePercent:F1}% ({r.Drop:P1} lower)");
        return 1;
    }
}
