using System.CommandLine;
using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Backends.Cuda;
using R1V2.Native.Engine.Kernels;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Pipeline;
using R1V2.Native.Trainer.Tasks;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>
/// `engine train`: with no arguments, the built-in task: the R1V2 pipeline (SFT, reward model, MPO, GRPO with and
/// without the Selective Sample Buffer) on handwritten-digit scenes, evaluated on held-out scenes after each stage.
/// `--task next-byte` is the op-library smoke task (next byte of the engine's CUDA sources). With --config or
/// --stage, one VLM stage. On the GPU when one is usable, else on the CPU.
/// </summary>
public static class TrainCommand
{
    public static Command Create()
    {
        var steps = new Option<int>("--steps") { Description = "next-byte task: optimiser steps", DefaultValueFactory = _ => 300 };
        var batch = new Option<int>("--batch-tokens") { Description = "next-byte task: positions per step", DefaultValueFactory = _ => 256 };
        var lr = new Option<float>("--lr") { Description = "next-byte task: peak learning rate", DefaultValueFactory = _ => 3e-3f };
        var seed = new Option<int>("--seed") { Description = "Seed for data, initialisation and sampling (the digit pipeline uses 1 unless given)", DefaultValueFactory = _ => 1234 };
        var backend = new Option<string>("--backend") { Description = "auto | cpu | cuda", DefaultValueFactory = _ => "auto" };
        var output = new Option<string?>("--out") { Description = "Run directory (default runs/digits-<time>, or runs/train-<time> for next-byte; with --config it replaces the config's output)" };
        var config = new Option<string?>("--config") { Description = "Run config (YAML): trains the VLM stage it names (sft, rm, mpo or grpo)" };
        var set = new Option<string[]>("--set") { Description = "Override a config key, e.g. --set grpo.group_size=8 (repeatable)" };
        var stage = new Option<string?>("--stage") { Description = "sft | rm | mpo | grpo (the same as --set stage=...)" };
        var tp = new Option<int?>("--tp") { Description = "Tensor-parallel size under mpirun / srun (the same as --set parallel.tp=N); data parallel is the world size divided by it" };
        var pipeline = new Option<string[]>("--pipeline")
            { Description = "Built-in digit task: change one of its settings, e.g. --pipeline grpo_steps=300 (repeatable; an unknown key lists the settings)" };
        var task = new Option<string>("--task")
            { Description = "Without --config: digits (the R1V2 pipeline on MNIST digit scenes: sft, rm, mpo, grpo) | next-byte (the op-library smoke task; --steps, --batch-tokens, --lr) | reward-control (GRPO on a reward the model can obviously earn, prompts that never repeat; --steps, --lr)", DefaultValueFactory = _ => "digits" };
        var cmd = new Command("train", "Train: with --config or --stage, that VLM stage; without, the built-in task (the full digit pipeline)")
            { steps, batch, lr, seed, backend, output, config, set, stage, tp, task, pipeline };
        static bool StageRun(string? config, string[]? set, string? stage) => config is not null || (set?.Length ?? 0) > 0 || stage is not null;
        cmd.Validators.Add(r =>
        {
            if (r.GetValue(tp) is not null && !StageRun(r.GetValue(config), r.GetValue(set), r.GetValue(stage)) && r.GetValue(tp) != 1)
                r.AddError("--tp applies to a --config/--set/--stage run: the built-in digit task runs its GRPO stages data-parallel (tensor-parallel size 1)");
        });
        cmd.Validators.Add(r =>
        {
            if ((r.GetValue(pipeline)?.Length ?? 0) > 0 && (StageRun(r.GetValue(config), r.GetValue(set), r.GetValue(stage)) || r.GetValue(task) is { } t && t != "digits"))
                r.AddError("--pipeline changes the built-in digit task; a --config/--set/--stage run or --task next-byte takes its settings elsewhere");
        });
        // With a config, an explicit --backend overrides the config's backend key (as --set backend=... would).
        cmd.SetAction(r => StageRun(r.GetValue(config), r.GetValue(set), r.GetValue(stage))
            ? RunStage(r.GetValue(config), [.. r.GetValue(set) ?? [], .. r.GetValue(stage) is { } st ? new[] { $"stage={st}" } : [],
                .. r.GetResult(backend) is { Implicit: false } ? new[] { $"backend={r.GetValue(backend)}" } : [],
                .. r.GetValue(tp) is { } n ? new[] { $"parallel.tp={n}" } : []], r.GetValue(output))
            : r.GetValue(task) switch
            {
                "next-byte" => Run(new NextTokenSettings(r.GetValue(steps), r.GetValue(batch), r.GetValue(lr), Seed: r.GetValue(seed)), r.GetValue(backend)!, r.GetValue(output)),
                "digits" => RunPipeline(PipelineOverrides.Apply(new PipelineSettings
                {
                    Output = r.GetValue(output) ?? Path.Combine("runs", $"digits-{DateTime.Now:yyyyMMdd-HHmmss}"),
                    Seed = r.GetResult(seed) is { Implicit: false } ? r.GetValue(seed) : 1,
                }, r.GetValue(pipeline) ?? []), r.GetValue(backend)!),
                "reward-control" => RunRewardControl(new RewardControlSettings
                {
                    Output = r.GetValue(output) ?? Path.Combine("runs", $"reward-control-{DateTime.Now:yyyyMMdd-HHmmss}"),
                    Seed = r.GetResult(seed) is { Implicit: false } ? r.GetValue(seed) : 1,
                    Steps = r.GetResult(steps) is { Implicit: false } ? r.GetValue(steps) : 40,
                    Lr = r.GetResult(lr) is { Implicit: false } ? r.GetValue(lr) : 1e-2f,
                }, r.GetValue(backend)!),
                var other => throw new ArgumentException($"--task must be digits, next-byte or reward-control, not '{other}'"),
            });
        return cmd;
    }

    /// <summary>A VLM training stage from a YAML config, with a live display; Ctrl-C checkpoints and exits.</summary>
    public static int RunStage(string? configPath, string[] overrides, string? outDir)
    {
        var config = TrainConfig.Load(configPath, outDir is null ? overrides : [.. overrides, $"output={outDir}"]);
        using var cancel = new StopSignals();
        return config.Stage switch
        {
            "sft" => RunSft(config, cancel),
            "mpo" when config.Mpo.Rounds > 1 => RunIterativeMpo(config, cancel),
            "rm" or "mpo" => RunPreference(config, cancel),
            _ => RunGrpo(config, cancel),
        };
    }

    private static ProgressTask Bar(ProgressContext ctx, string stage, int steps, int done)
    {
        var bar = ctx.AddTask(stage, maxValue: steps);
        bar.Value = done;
        return bar;
    }

    private static Progress Progress() => AnsiConsole.Progress()
        .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn());

    /// <summary>The default pipeline with a bar per stage; Ctrl-C stops after the running stage's checkpoint (run again with --out to continue).</summary>
    public static int RunPipeline(PipelineSettings settings, string backendName)
    {
        // Under mpirun the GRPO stages run data-parallel; rank 0 runs the rest and alone prints and writes.
        var (group, dp, launchedBackend) = Launched(backendName, new TrainConfig.ParallelConfig());
        using var backend = launchedBackend;
        using var cancel = new StopSignals();
        if (group.Rank != 0)
        {
            try { new DigitPipeline(settings, backend, dataParallel: dp).Follow(cancel.Token); }
            catch (OperationCanceledException) { }   // stopped with rank 0: both end through Done
            return Done(group);
        }
        AnsiConsole.MarkupLineInterpolated($"[bold]engine train[/]: the R1V2 pipeline on handwritten-digit scenes on {backend.Name}{(group.WorldSize > 1 ? $", GRPO data-parallel on {group.WorldSize} ranks" : "")}; run directory {settings.Output}");
        PipelineSummary? summary = null;
        try
        {
            Progress().Start(ctx =>
            {
                var bars = new Dictionary<string, ProgressTask>();
                var pipeline = new DigitPipeline(settings, backend, line => AnsiConsole.MarkupLineInterpolated($"{line}"), dp);
                summary = pipeline.Run((stage, fraction) =>
                {
                    if (!bars.TryGetValue(stage, out var bar)) bars[stage] = bar = ctx.AddTask(stage, maxValue: 1);
                    bar.Value = fraction;
                }, cancel.Token);
            });
        }
        catch (OperationCanceledException e)
        {
            AnsiConsole.MarkupLineInterpolated($"{cancel.StoppedLine($"{e.Message}, checkpoints written in {settings.Output}")} (with --out {settings.Output})");
            return Done(group);
        }
        AnsiConsole.MarkupLineInterpolated($"done in {summary!.Seconds:F0} s; {Path.Combine(settings.Output, "summary.md")}:");
        AnsiConsole.WriteLine(File.ReadAllText(Path.Combine(settings.Output, "summary.md")));
        return Done(group);
    }

    /// <summary>
    /// The process group of this launch (under mpirun / srun every rank trains on its share of each batch; one process
    /// is a group of one) with the collective timeout, the backend on this rank's device (its local rank), and the
    /// tensor- and data-parallel groups of <paramref name="parallel"/>.
    /// </summary>
    private static (ICollectives Group, Trainer.Parallel.DataParallel Dp, Backend Backend) Launched(string backendName, TrainConfig.ParallelConfig parallel)
    {
        var world = Launch.Collectives();
        if (world is MpiCollectives mpi) mpi.Timeout = TimeSpan.FromSeconds(parallel.TimeoutS);
        int tp = parallel.Tp;
        if (world.WorldSize % tp != 0)
            throw new InvalidDataException($"parallel.tp is {tp} but the launch has {world.WorldSize} rank(s): the world size must be a multiple of the tensor-parallel size (data parallel = world / tp)");
        var backend = Backends.Create(backendName, world.LocalRank);
        world = Launch.ForBackend(world, backend);   // CUDA tensors: NCCL
        if (tp == 1) return (world, new Trainer.Parallel.DataParallel(world), backend);
        // Tensor-parallel groups of consecutive ranks (one node's GPUs), data-parallel groups across them.
        var tensor = new TensorParallel(world.Split(world.Rank / tp, world.Rank));
        var data = world.Split(world.Rank % tp, world.Rank);
        return (world, new Trainer.Parallel.DataParallel(data, tensor, world), backend);
    }

    /// <summary>The end of a launch: every rank waits for the others (rank 0 finishing its report), then MPI closes.</summary>
    private static int Done(ICollectives group)
    {
        if (group.WorldSize == 1) return 0;
        group.Barrier(Timeout.InfiniteTimeSpan);   // rank 0 may still be writing its report
        Interop.Mpi.FinalizeIfInitialized();
        return 0;
    }

    private static string Ranks(ICollectives group, string what) => group.WorldSize > 1 ? $" {what} by {group.WorldSize} data-parallel ranks" : "";

    private static string Ranks(Trainer.Parallel.DataParallel dp, string what) =>
        dp.TensorParallel.Size == 1 ? Ranks(dp.Group, what) : $" {what} by {dp.Ranks} data-parallel rank(s) x {dp.TensorParallel.Size} tensor-parallel ranks";

    /// <summary>The optimiser's memory on each rank, said when several ranks share a run.</summary>
    private static void SayOptimizerMemory(ICollectives group, TrainConfig config, long bytes)
    {
        if (group.WorldSize > 1)
            AnsiConsole.MarkupLineInterpolated($"optimizer state per rank: {bytes / 1048576.0:F2} MiB{(config.Parallel.ShardOptimizer ? $" (masters and moments sharded over {group.WorldSize} ranks)" : " (replicated; parallel.shard_optimizer=true shards it)")}");
    }

    private static int RunSft(TrainConfig config, StopSignals cancel)
    {
        var (group, dp, launchedBackend) = Launched(config.Backend, config.Parallel);
        using var backend = launchedBackend;
        using var trainer = new SftTrainer(config, backend, dp);
        if (group.Rank != 0)
        {
            trainer.Run(cancel: cancel.Token); // rank 0 alone prints progress and writes the run's files
            return Done(group);
        }
        var resumed = trainer.Step > 0 ? $" (resumed at step {trainer.Step})" : "";
        AnsiConsole.MarkupLineInterpolated($"stage sft on {backend.Name}: {config.Steps} steps of {config.Sft.Batch} examples{Ranks(dp, "shared")}; run directory {config.Output}{resumed}");
        SayOptimizerMemory(group, config, trainer.OptimizerStateBytes);
        SftSummary? summary = null;
        Progress().Start(ctx =>
        {
            var bar = Bar(ctx, "sft", config.Steps, trainer.Step);
            summary = trainer.Run(m =>
            {
                bar.Description = $"step {m.Step} loss {m.Loss:F4}" + (m.HeldOutLoss is { } h ? $" held-out {h:F4}" : "");
                bar.Value = m.Step;
            }, cancel.Token);
        });
        if (summary is null)
        {
            AnsiConsole.MarkupLineInterpolated($"{cancel.StoppedLine($"checkpoint written at step {trainer.Step} in {Path.Combine(config.Output, "checkpoints")}")}");
            return Done(group);
        }
        AnsiConsole.MarkupLineInterpolated($"final loss {summary.FinalLoss:F4}; held-out loss {summary.HeldOutLossBefore:F4} -> {summary.HeldOutLossAfter:F4} on {summary.HeldOutExamples} examples; model in {Path.Combine(config.Output, "final")}");
        foreach (var f in Report.Write(config.Output)) AnsiConsole.MarkupLineInterpolated($"wrote {f}");
        return Done(group);
    }

    private static int RunPreference(TrainConfig config, StopSignals cancel)
    {
        var (group, dp, launchedBackend) = Launched(config.Backend, config.Parallel);
        using var backend = launchedBackend;
        using var trainer = new PreferenceTrainer(config, backend, dp);
        if (group.Rank != 0)
        {
            trainer.Run(cancel: cancel.Token);
            return Done(group);
        }
        var resumed = trainer.Step > 0 ? $" (resumed at step {trainer.Step})" : "";
        AnsiConsole.MarkupLineInterpolated($"stage {config.Stage} on {backend.Name}: {config.Steps} steps of {config.Pairs.PairsPerStep} pairs{Ranks(dp, "shared")}; run directory {config.Output}{resumed}");
        SayOptimizerMemory(group, config, trainer.OptimizerStateBytes);
        PreferenceSummary? summary = null;
        Progress().Start(ctx =>
        {
            var bar = Bar(ctx, config.Stage, config.Steps, trainer.Step);
            summary = trainer.Run(m =>
            {
                bar.Description = $"step {m.Step} loss {m.Loss:F4} acc {m.Accuracy:F2} margin {m.Margin:F3}" + (config.Stage == "mpo" ? $" delta {m.Delta:F3}" : "");
                bar.Value = m.Step;
            }, cancel.Token);
        });
        if (summary is null)
        {
            AnsiConsole.MarkupLineInterpolated($"{cancel.StoppedLine($"checkpoint written at step {trainer.Step} in {Path.Combine(config.Output, "checkpoints")}")}");
            return Done(group);
        }
        var last = trainer.History[^1];
        AnsiConsole.MarkupLineInterpolated($"final loss {last.Loss:F4}, train accuracy {last.Accuracy:F2}; held-out accuracy {(summary.HeldOutAccuracy is { } a ? a.ToString("F3") : "-")} on {summary.HeldOutPairs} pairs; model in {Path.Combine(config.Output, "final")}");
        foreach (var f in Report.Write(config.Output)) AnsiConsole.MarkupLineInterpolated($"wrote {f}");
        return Done(group);
    }

    private static int RunIterativeMpo(TrainConfig config, StopSignals cancel)
    {
        if (Launch.WorldSize() is > 1)
            throw new InvalidOperationException($"mpo.rounds = {config.Mpo.Rounds}: iterative MPO (it samples its own pairs between rounds) runs in one process; start it without mpirun, or train one round (mpo.rounds=1) data-parallel");
        using var backend = Backends.Create(config.Backend);
        AnsiConsole.MarkupLineInterpolated($"stage mpo on {backend.Name}: {config.Mpo.Rounds} rounds of {config.Steps} steps of {config.Pairs.PairsPerStep} pairs; run directory {config.Output}");
        List<R1V2.Native.Trainer.Mpo.MpoRound>? rounds = null;
        Progress().Start(ctx =>
        {
            var bars = new Dictionary<int, ProgressTask>();
            rounds = new R1V2.Native.Trainer.Mpo.IterativeMpo(config, backend).Run((round, m) =>
            {
                if (!bars.TryGetValue(round, out var bar)) bars[round] = bar = Bar(ctx, $"mpo round {round}", config.Steps, 0);
                bar.Description = $"round {round} step {m.Step} loss {m.Loss:F4} acc {m.Accuracy:F2}";
                bar.Value = m.Step;
            }, line => AnsiConsole.MarkupLineInterpolated($"{line}"), cancel.Token);
        });
        if (rounds is null)
        {
            AnsiConsole.MarkupLineInterpolated($"{cancel.StoppedLine($"the running round wrote a checkpoint in {config.Output}")}");
            return 0;
        }
        AnsiConsole.MarkupLineInterpolated($"wrote {Path.Combine(config.Output, "rounds.jsonl")} and {Path.Combine(config.Output, "final")}");
        return 0;
    }

    private static int RunGrpo(TrainConfig config, StopSignals cancel)
    {
        var (group, dp, launchedBackend) = Launched(config.Backend, config.Parallel);
        using var backend = launchedBackend;
        using var trainer = new GrpoTrainer(config, backend, dataParallel: dp);
        if (group.Rank != 0)
        {
            trainer.Run(cancel: cancel.Token);
            return Done(group);
        }
        var resumed = trainer.Step > 0 ? $" (resumed at step {trainer.Step})" : "";
        AnsiConsole.MarkupLineInterpolated($"stage grpo on {backend.Name}: {config.Steps} steps of {config.Grpo.PromptsPerStep} prompts x {config.Grpo.GroupSize} samples{Ranks(dp, "sampled and trained")}; run directory {config.Output}{resumed}");
        SayOptimizerMemory(group, config, trainer.OptimizerStateBytes);
        Progress().Start(ctx =>
        {
            var bar = Bar(ctx, "grpo", config.Steps, trainer.Step);
            trainer.Run(m =>
            {
                bar.Description = $"step {m.Step} reward {m.Reward:F3} acc {m.Accuracy:F2} eff {m.EffectiveRatio:F2} {m.TokensPerSecond:F0} tok/s";
                bar.Value = m.Step;
                if (m.Warning is not null) AnsiConsole.MarkupLineInterpolated($"[yellow]warning:[/] {m.Warning}");
            }, cancel.Token);
        });
        if (cancel.Requested) AnsiConsole.MarkupLineInterpolated($"{cancel.StoppedLine($"checkpoint written at step {trainer.Step} in {Path.Combine(config.Output, "checkpoints")}")}");
        foreach (var f in Report.Write(config.Output)) AnsiConsole.MarkupLineInterpolated($"wrote {f}");
        return Done(group);
    }

    /// <summary>The reward-control task with a progress bar; prints the reward's first- and last-quarter means.</summary>
    public static int RunRewardControl(RewardControlSettings settings, string backendName)
    {
        using var backend = Backends.Create(backendName);
        using var cancel = new StopSignals();
        AnsiConsole.MarkupLineInterpolated($"reward control on {backend.Name}: {settings.Steps} GRPO steps of {settings.PromptsPerStep} new prompts x {settings.GroupSize} samples; run directory {settings.Output}");
        RewardControlResult? result = null;
        Progress().Start(ctx =>
        {
            var bar = Bar(ctx, "grpo", settings.Steps, 0);
            result = RewardControl.Run(settings, backend, m =>
            {
                bar.Description = $"step {m.Step} reward {m.Reward:F3}";
                bar.Value = m.Step;
            }, cancel.Token);
        });
        if (cancel.Requested)
        {
            AnsiConsole.MarkupLineInterpolated($"{cancel.StoppedLine($"checkpoint written in {Path.Combine(settings.Output, "grpo", "checkpoints")}")}");
            return 0;
        }
        AnsiConsole.MarkupLineInterpolated($"mean training reward: first quarter {result!.FirstQuarter:F4}, last quarter {result.LastQuarter:F4} (rise {result.Rise:+0.0000;-0.0000}); {Path.Combine(settings.Output, "summary.md")}");
        return 0;
    }

    public static int Run(NextTokenSettings settings, string backendName, string? outDir)
    {
        if (settings.Steps < 1 || settings.BatchTokens < 1) throw new ArgumentException("--steps and --batch-tokens must be positive");
        outDir ??= Path.Combine("runs", $"train-{DateTime.Now:yyyyMMdd-HHmmss}");
        Directory.CreateDirectory(outDir);
        using var backend = Backends.Create(backendName);
        var corpus = string.Concat(KernelSources.Families.Values);
        var task = new NextTokenTask(corpus);
        var config = new NgramMlpConfig(NextTokenTask.Vocab);
        AnsiConsole.MarkupLineInterpolated($"backend [bold]{backend.Name}[/] ({backend.ActivationType}), task: next byte of the engine's CUDA sources ({corpus.Length} bytes, last 10% held out)");
        AnsiConsole.MarkupLineInterpolated($"model: {config.Context}-byte context, {config.Layers} SwiGLU blocks, hidden {config.Hidden}; {settings.Steps} steps of {settings.BatchTokens} positions; run directory {outDir}");

        var metricsPath = Path.Combine(outDir, "metrics.jsonl");
        using var metrics = new StreamWriter(metricsPath);
        IReadOnlyList<NextTokenMetrics> log = [];
        var started = DateTime.UtcNow;
        AnsiConsole.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var bar = ctx.AddTask("training", maxValue: settings.Steps);
                double? lastHeld = null;
                log = task.Run(backend, config, settings, m =>
                {
                    metrics.WriteLine(JsonSerializer.Serialize(m));
                    lastHeld = m.HeldOutLoss ?? lastHeld;
                    bar.Description = $"step {m.Step} loss {m.Loss:F3}" + (lastHeld is null ? "" : $" held-out {lastHeld:F3}");
                    bar.Increment(1);
                });
            });
        var first = log[0];
        var last = log[^1];
        var firstHeld = log.First(m => m.HeldOutLoss is not null).HeldOutLoss!.Value;
        var summary = new
        {
            backend = backend.Name,
            steps = settings.Steps,
            seconds = (DateTime.UtcNow - started).TotalSeconds,
            uniformLoss = Math.Log(NextTokenTask.Vocab),
            firstTrainLoss = first.Loss,
            finalTrainLoss = last.Loss,
            firstHeldOutLoss = firstHeld,
            finalHeldOutLoss = last.HeldOutLoss,
            skippedSteps = log.Count(m => m.Skipped),
            peakDeviceBytes = backend.Memory.PeakBytesInUse,
        };
        File.WriteAllText(Path.Combine(outDir, "summary.json"), JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true }));
        AnsiConsole.MarkupLineInterpolated($"train loss {first.Loss:F3} -> {last.Loss:F3}; held-out loss {firstHeld:F3} (step {settings.EvalEvery}) -> {last.HeldOutLoss:F3}; uniform guess {Math.Log(256):F3}");
        AnsiConsole.MarkupLineInterpolated($"{summary.seconds:F1} s; metrics in {metricsPath}");
        return 0;
    }
}
