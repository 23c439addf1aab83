using System.Diagnostics;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Tests.Parallel;

[CollectionDefinition("mpi", DisableParallelization = true)]
public sealed class MpiCollection;

/// <summary>
/// The engine under mpirun: every collective of `engine selftest collectives` on 4 ranks against the host computation.
/// Skips, saying so, where mpirun is missing, except in CI (CI=true), where that is a failure: .ci/run installs Open MPI.
/// </summary>
[Collection("mpi")]
public sealed class MpiTests
{
    private static string Engine => Path.Combine(AppContext.BaseDirectory, OperatingSystem.IsWindows() ? "engine.exe" : "engine");
    private static string RanksProgram => Path.Combine(AppContext.BaseDirectory, OperatingSystem.IsWindows() ? "r1v2-ranks.exe" : "r1v2-ranks");

    private static string? MpiRun()
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator))
            if (dir.Length > 0 && File.Exists(Path.Combine(dir, "mpirun"))) return Path.Combine(dir, "mpirun");
        return null;
    }

    private static string RequireMpiRun()
    {
        var mpirun = MpiRun();
        if (mpirun is null && Environment.GetEnvironmentVariable("CI") == "true") Assert.Fail("CI=true but mpirun is missing: .ci/run installs openmpi-bin");
        Skip.If(mpirun is null, "mpirun is not installed here (apt-get install openmpi-bin)");
        return mpirun!;
    }

    /// <summary>Runs <c>mpirun -np N engine ARGS</c> (as root too, oversubscribed, unbound) with a timeout; returns exit code and output.</summary>
    private static (int Code, string Output) Run(int ranks, params string[] args) => RunProgram(Engine, ranks, args);

    private static (int Code, string Output) RunProgram(string program, int ranks, params string[] args)
    {
        var info = new ProcessStartInfo(RequireMpiRun(), ["--oversubscribe", "--bind-to", "none", "-np", ranks.ToString(), program, .. args])
            { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        using var p = Process.Start(info)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(180)))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"mpirun -np {ranks} {Path.GetFileName(program)} {string.Join(' ', args)} did not end within 180 s");
        }
        // Lines the console wrapped at its width are joined again, so a test can look for a sentence.
        return (p.ExitCode, System.Text.RegularExpressions.Regex.Replace(stdout.Result + stderr.Result, @"\s*\n\s*", " "));
    }

    [SkippableFact]
    public void SelftestCollectives_OnFourRanks_MatchesTheHostComputation()
    {
        var (code, output) = Run(4, "selftest", "collectives", "--sizes", "1024,65536");
        Assert.True(code == 0, output);
        Assert.Contains("4 rank(s) (MpiCollectives)", output);
        Assert.Contains("all 10 collectives match the host computation on 4 rank(s)", output);   // local rank among them
    }

    [SkippableFact]
    public void AFailingRank_EndsTheWholeJobWithItsMessage_NotAHang()
    {
        var (code, output) = Run(3, "selftest", "abort", "--rank", "1");
        Assert.NotEqual(0, code);
        Assert.Contains("a deliberate failure on rank 1", output);
        Assert.Matches("rank 1: [a-z ]*error: ", output);
        Assert.Contains("rank 1: ending the job after the error above", output);
    }

    /// <summary>A tiny checkpoint and 20 supervised examples under <paramref name="dir"/>; the `engine train` arguments of a 3-step run into <paramref name="output"/>.</summary>
    private static string[] SftArgs(string dir, string output)
    {
        var ckpt = TinyModel(dir);
        var data = Path.Combine(dir, "sft.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 20).Select(i => System.Text.Json.JsonSerializer.Serialize(new { prompt = $"Is {i} even?", response = $"<think>{i} mod 2</think> {(i % 2 == 0 ? "yes" : "no")}" })));
        return ["train", "--stage", "sft", "--set", $"model={ckpt}", "--set", $"data.path={data}", "--set", "steps=3", "--set", "sft.batch=4", "--set", "trainable=all",
            "--set", "optim.lr=0.003", "--set", "sft.held_out=0.2", "--set", "checkpoint.export_dtype=f32", "--backend", "cpu", "--out", output];
    }

    private static double[][] Metrics(string output) =>
        [.. File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Where(l => l.Trim().Length > 0).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!)
            .Select(j => new[] { j["Loss"]!.GetValue<double>(), j["GradNorm"]!.GetValue<double>(), j["Tokens"]!.GetValue<double>() })];

    [SkippableFact]
    public void DataParallelSft_OnTwoRanks_EqualsOneProcessWithTheWholeBatch()
    {
        var dir = Directory.CreateTempSubdirectory("r1v2-dp-").FullName;
        try
        {
            var one = Path.Combine(dir, "one");
            Assert.Equal(0, R1V2.Native.Cli.Program.Main(SftArgs(dir, one)));
            var two = Path.Combine(dir, "two");
            var (code, output) = Run(2, SftArgs(dir, two));
            Assert.True(code == 0, output);
            Assert.Contains("shared by 2 data-parallel ranks", output);
            AssertSameMetrics(Metrics(one), Metrics(two), 1e-5);           // one writer: rank 0's lines only
            AssertSameFinalWeights(one, two, "2 ranks");
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void DataParallelSft_WithoutTheReduction_DiffersFromOneProcess()
    {
        // The negative control: rank 0 of 2 whose collectives do nothing trains on half of each batch with local counts.
        var dir = Directory.CreateTempSubdirectory("r1v2-dp-neg-").FullName;
        try
        {
            var args = SftArgs(dir, Path.Combine(dir, "one"));
            Assert.Equal(0, R1V2.Native.Cli.Program.Main(args));
            var config = R1V2.Native.Trainer.Config.TrainConfig.Load(null, [.. Enumerable.Range(0, args.Length).Where(i => args[i] == "--set").Select(i => args[i + 1]),
                "stage=sft", $"output={Path.Combine(dir, "half")}"]);
            using (var b = new CpuBackend())
            using (var t = new R1V2.Native.Trainer.SftTrainer(config, b, new R1V2.Native.Trainer.Parallel.DataParallel(new Inert(0, 2))))
                t.Run();
            var (whole, half) = (Metrics(Path.Combine(dir, "one")), Metrics(Path.Combine(dir, "half")));
            Assert.NotEqual(whole[0][2], half[0][2]);                     // tokens: half the batch's
            Assert.NotEqual(whole[^1][0], half[^1][0]);
        }
        finally { Directory.Delete(dir, true); }
    }

    private static string TinyModel(string dir)
    {
        var ckpt = Path.Combine(dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 6);
        return ckpt;
    }

    /// <summary>Relative difference of two results: loss, gradient norm, clipped share each, and the weights as one vector.</summary>
    private static void AssertSameStep(R1V2.Native.Ranks.StepResult a, R1V2.Native.Ranks.StepResult b, string what)
    {
        Assert.True(Math.Abs(a.Loss - b.Loss) <= 1e-5 * Math.Abs(a.Loss), $"{what}: loss {a.Loss} vs {b.Loss}");
        Assert.True(Math.Abs(a.GradNorm - b.GradNorm) <= 1e-5 * a.GradNorm, $"{what}: gradient norm {a.GradNorm} vs {b.GradNorm}");
        Assert.True(Math.Abs(a.ClippedFraction - b.ClippedFraction) <= 1e-9, $"{what}: clipped share {a.ClippedFraction} vs {b.ClippedFraction}");
        Assert.Equal(a.Tokens, b.Tokens);
        double diff = 0, norm = 0;
        for (int i = 0; i < a.Weights.Length; i++)
        {
            diff += (double)(a.Weights[i] - b.Weights[i]) * (a.Weights[i] - b.Weights[i]);
            norm += (double)a.Weights[i] * a.Weights[i];
        }
        Assert.True(Math.Sqrt(diff) <= 1e-5 * Math.Sqrt(norm), $"{what}: weights differ by {Math.Sqrt(diff):E2} (norm {Math.Sqrt(norm):E2})");
    }

    private static R1V2.Native.Ranks.StepResult RanksResult(string dir, int ranks, params string[] options)
    {
        var output = Path.Combine(dir, $"result-{ranks}-{Guid.NewGuid():N}.json");
        var (code, text) = RunProgram(RanksProgram, ranks, ["grpo-step", TinyModel(dir), output, .. options]);
        Assert.True(code == 0, text);
        return System.Text.Json.JsonSerializer.Deserialize<R1V2.Native.Ranks.StepResult>(File.ReadAllText(output))!;
    }

    [SkippableTheory]
    [InlineData("token_mean")]
    [InlineData("seq_mean_token_mean")]
    public void DataParallelGrpoStep_OneTwoAndFourRanks_TakeTheSameStep(string aggregation)
    {
        // 8 fixed rollouts: one rank with all of them, 2 ranks with 4 and 4 ranks with 2 each, two micro-batches per
        // rank accumulated into one optimiser step; the PPO clip and the gradient-norm clip are both active, and the
        // ranks hold different token counts, so the global normalisers matter.
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-dp-grpo-").FullName;
        try
        {
            string[] options = ["--aggregation", aggregation, "--rollouts", "8", "--minibatches", "2", "--grad-accum", "2"];
            var one = R1V2.Native.Ranks.Scenarios.GrpoStep(TinyModel(dir), R1V2.Native.Trainer.Parallel.DataParallel.Single, R1V2.Native.Ranks.Scenarios.Options.Parse(options));
            Assert.True(one.ClippedFraction > 0.05, $"the PPO clip is active on {one.ClippedFraction:P0} of tokens");
            Assert.True(one.GradNorm > 0.5, $"gradient norm {one.GradNorm} is above max_grad_norm 0.5: the clip scales it");
            var lengths = R1V2.Native.Ranks.Scenarios.FixedRollouts(64, 8).Select(r => r.Response.Length).ToList();
            Assert.NotEqual(lengths.Where((_, i) => i % 2 == 0).Sum(), lengths.Where((_, i) => i % 2 == 1).Sum());
            foreach (int ranks in new[] { 2, 4 })
            {
                var many = RanksResult(dir, ranks, options);
                AssertSameStep(one, many, $"{ranks} ranks");
                Assert.True(many.EarlyBuckets > 0, $"{ranks} ranks: no gradient bucket began its sum during backward");
            }
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void DataParallelGrpoStep_WithoutTheReductions_DiffersFromOneProcess()
    {
        // The negative control: rank 0 of 2 whose collectives do nothing steps on its half with local normalisers.
        var dir = Directory.CreateTempSubdirectory("r1v2-dp-grpo-neg-").FullName;
        try
        {
            var options = R1V2.Native.Ranks.Scenarios.Options.Parse([]);
            var one = R1V2.Native.Ranks.Scenarios.GrpoStep(TinyModel(dir), R1V2.Native.Trainer.Parallel.DataParallel.Single, options);
            var half = R1V2.Native.Ranks.Scenarios.GrpoStep(TinyModel(dir), new R1V2.Native.Trainer.Parallel.DataParallel(new Inert(0, 2)), options);
            Assert.NotEqual(one.Tokens, half.Tokens);
            Assert.True(Math.Abs(one.Loss - half.Loss) > 1e-3 * Math.Abs(one.Loss), $"loss {one.Loss} vs {half.Loss}");
            Assert.NotEqual(one.Hash, half.Hash);
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>`engine train` arguments of a 2-step preference stage (rm or mpo) on 16 pairs, 4 per step, into <paramref name="output"/>.</summary>
    private static string[] PreferenceArgs(string dir, string stage, string output)
    {
        var data = Path.Combine(dir, "pairs.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 16).Select(i => System.Text.Json.JsonSerializer.Serialize(new
            { prompt = $"Is {i} even?", chosen = $"<think>{i} mod 2</think> {(i % 2 == 0 ? "yes" : "no")}", rejected = $"<think>guess</think> {(i % 3 == 0 ? "maybe" : "no idea")}" })));
        return ["train", "--stage", stage, "--set", $"model={TinyModel(dir)}", "--set", $"data.path={data}", "--set", "steps=2", "--set", "pairs.pairs_per_step=4",
            "--set", "pairs.held_out=0.25", "--set", "trainable=all", "--set", "optim.lr=0.003", "--set", "checkpoint.export_dtype=f32", "--backend", "cpu", "--out", output];
    }

    private static double[][] PreferenceMetrics(string output) =>
        [.. File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Where(l => l.Trim().Length > 0).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!)
            .Select(j => new[] { j["Loss"]!.GetValue<double>(), j["GradNorm"]!.GetValue<double>(), j["Accuracy"]!.GetValue<double>(), j["Margin"]!.GetValue<double>(), j["Delta"]!.GetValue<double>() })];

    /// <summary>Two runs' final models, tensor by tensor, bit for bit (a resumed run against an uninterrupted one).</summary>
    private static void AssertBitIdenticalFinalWeights(string one, string other)
    {
        using var w1 = R1V2.Native.Engine.Checkpoints.Checkpoint.Open(Path.Combine(one, "final"));
        using var w2 = R1V2.Native.Engine.Checkpoints.Checkpoint.Open(Path.Combine(other, "final"));
        foreach (var name in w1.Names)
        {
            var shape = w1.Info(name).Shape.Select(d => (int)d).ToArray();
            Assert.Equal(w1.Read(name, shape), w2.Read(name, shape));
        }
    }

    /// <summary>The same number of logged steps, each field within <paramref name="relative"/> of one process's.</summary>
    private static void AssertSameMetrics(double[][] a, double[][] b, double relative)
    {
        Assert.Equal(a.Length, b.Length);
        for (int s = 0; s < a.Length; s++)
            for (int k = 0; k < a[s].Length; k++)
                Assert.True(Math.Abs(a[s][k] - b[s][k]) <= relative * Math.Max(1e-3, Math.Abs(a[s][k])), $"step {s + 1}, field {k}: {a[s][k]} vs {b[s][k]}");
    }

    /// <summary>
    /// Two runs' final models, over all weights together: a key bias has no gradient in exact arithmetic (softmax ignores
    /// a shift shared by every key), so each run's rounding noise there becomes a full AdamW step; per tensor it differs at 2e-5.
    /// </summary>
    private static void AssertSameFinalWeights(string one, string other, string what)
    {
        using var w1 = R1V2.Native.Engine.Checkpoints.Checkpoint.Open(Path.Combine(one, "final"));
        using var w2 = R1V2.Native.Engine.Checkpoints.Checkpoint.Open(Path.Combine(other, "final"));
        double diff = 0, norm = 0;
        foreach (var name in w1.Names)
        {
            var shape = w1.Info(name).Shape.Select(d => (int)d).ToArray();
            var (x, y) = (w1.Read(name, shape), w2.Read(name, shape));
            diff += x.Zip(y).Sum(z => (double)(z.First - z.Second) * (z.First - z.Second));
            norm += x.Sum(v => (double)v * v);
        }
        Assert.True(Math.Sqrt(diff) <= 1e-5 * Math.Sqrt(norm), $"{what}: weights differ by {Math.Sqrt(diff):E2} (norm {Math.Sqrt(norm):E2})");
    }

    [SkippableTheory]
    [InlineData("mpo")]
    [InlineData("rm")]
    public void DataParallelPreferenceStage_OneTwoAndFourRanks_TakeTheSameSteps(string stage)
    {
        // 4 pairs a step: one process with all of them, 2 ranks with 2 and 4 ranks with 1 each; MPO's BCO delta moves by
        // every rank's implicit rewards, the held-out accuracy is counted over every rank's share.
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory($"r1v2-dp-{stage}-").FullName;
        try
        {
            var one = Path.Combine(dir, "one");
            Assert.Equal(0, R1V2.Native.Cli.Program.Main(PreferenceArgs(dir, stage, one)));
            var a = PreferenceMetrics(one);
            foreach (int ranks in new[] { 2, 4 })
            {
                var many = Path.Combine(dir, $"ranks-{ranks}");
                var (code, output) = Run(ranks, PreferenceArgs(dir, stage, many));
                Assert.True(code == 0, output);
                Assert.Contains($"shared by {ranks} data-parallel ranks", output);
                AssertSameMetrics(a, PreferenceMetrics(many), 1e-5);
                var summary = (string p) => System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(p, "summary.json")))!["HeldOutAccuracy"]!.GetValue<double>();
                Assert.Equal(summary(one), summary(many));
                AssertSameFinalWeights(one, many, $"{ranks} ranks");
            }
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>`engine train` arguments of a tiny GRPO stage (prompts of sums, 2 samples each, 8 new tokens at most).</summary>
    private static string[] GrpoArgs(string dir, string output, int steps, int prompts = 2)
    {
        var data = Path.Combine(dir, "prompts.jsonl");
        if (!File.Exists(data))
            File.WriteAllLines(data, Enumerable.Range(0, 12).Select(i => $"{{\"question\": \"what is {i} + {i}?\", \"answer\": \"{2 * i}\"}}"));
        return ["train", "--stage", "grpo", "--set", $"model={TinyModel(dir)}", "--set", $"data.path={data}", "--set", $"steps={steps}", "--set", $"grpo.prompts_per_step={prompts}",
            "--set", "grpo.group_size=2", "--set", "grpo.max_new_tokens=8", "--set", "grpo.cache_blocks=256", "--set", "trainable=all", "--set", "checkpoint.every=1",
            "--set", "checkpoint.keep=1", "--set", "grpo.temperature=1.5", "--set", "checkpoint.export_dtype=f32", "--backend", "cpu", "--out", output];
    }

    [SkippableFact]
    public void DataParallelGrpoStage_UnderMpirun_TrainsCheckpointsPerRankBuffersAndResumes()
    {
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-dp-grpo-run-").FullName;
        try
        {
            var output = Path.Combine(dir, "run");
            var (code, text) = Run(2, GrpoArgs(dir, output, steps: 2));
            Assert.True(code == 0, text);
            Assert.Contains("sampled and trained by 2 data-parallel ranks", text);
            Assert.Equal(2, File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Count(l => l.Trim().Length > 0));   // rank 0 alone writes
            var checkpoint = Directory.GetDirectories(Path.Combine(output, "checkpoints")).Single();
            Assert.True(File.Exists(Path.Combine(checkpoint, "buffer.rank-00000.bin")) && File.Exists(Path.Combine(checkpoint, "buffer.rank-00001.bin")),
                string.Join(", ", Directory.GetFiles(checkpoint).Select(Path.GetFileName)));
            Assert.Null(R1V2.Native.Trainer.RunCheckpoints.VerifyManifest(checkpoint));                       // every rank's files are in its manifest
            Assert.True(Directory.Exists(Path.Combine(output, "final")));

            (code, text) = Run(2, GrpoArgs(dir, output, steps: 3));                                        // resumes at step 2 on the same world size
            Assert.True(code == 0, text);
            Assert.Contains("resumed at step 2", text);
            Assert.Equal(3, File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Count(l => l.Trim().Length > 0));

            // One process cannot take over two ranks' buffers: a clear error, not a silent half.
            var one = new StringWriter();
            var err = Console.Error;
            Console.SetError(one);
            try { Assert.Equal(1, R1V2.Native.Cli.Program.Main(GrpoArgs(dir, output, steps: 4))); }
            finally { Console.SetError(err); }
            Assert.Contains("written by 2 data-parallel rank(s)", one.ToString());

            (code, text) = Run(2, GrpoArgs(dir, Path.Combine(dir, "odd"), steps: 1, prompts: 3));
            Assert.NotEqual(0, code);
            Assert.Contains("grpo.prompts_per_step is 3: it must be a multiple of the 2 data-parallel ranks", text);
        }
        finally { Directory.Delete(dir, true); }
    }

    [SkippableTheory]
    [InlineData(2, false)]
    [InlineData(4, false)]
    [InlineData(4, true)]
    public void SftStage_TensorParallel_EqualsOneProcess(int ranks, bool shardOptimizer)
    {
        // engine train --stage sft --tp 2 on 2 ranks (and tp 2 x dp 2 on 4, also with ZeRO-1 sharding each replica's
        // slices): the losses, gradient norms and the final model (gathered whole from the slices) of one process.
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-tp-sft-").FullName;
        try
        {
            var one = Path.Combine(dir, "one");
            Assert.Equal(0, R1V2.Native.Cli.Program.Main(SftArgs(dir, one)));
            var tp = Path.Combine(dir, "tp");
            var (code, output) = Run(ranks, [.. SftArgs(dir, tp), "--tp", "2", "--set", $"parallel.shard_optimizer={(shardOptimizer ? "true" : "false")}"]);
            Assert.True(code == 0, output);
            AssertSameMetrics(Metrics(one), Metrics(tp), 1e-5);
            AssertSameFinalWeights(one, tp, $"tp 2 on {ranks} ranks");

            // Stopped after step 2 and resumed: each rank's optimiser file brings back its slices' state, bit for bit.
            var resumed = Path.Combine(dir, "resumed");
            string[] Steps(int n) => [.. SftArgs(dir, resumed), "--tp", "2", "--set", $"parallel.shard_optimizer={(shardOptimizer ? "true" : "false")}", "--set", $"steps={n}", "--set", "checkpoint.every=1"];
            (code, output) = Run(ranks, Steps(2));
            Assert.True(code == 0, output);
            var checkpoint = Directory.GetDirectories(Path.Combine(resumed, "checkpoints")).OrderBy(d => d).Last();
            Assert.Equal(Enumerable.Range(0, ranks).Select(r => $"optimizer.rank-{r:D5}.safetensors"),
                Directory.GetFiles(checkpoint, "optimizer*").Select(Path.GetFileName).Order());
            Directory.Delete(Path.Combine(resumed, "final"), true);
            (code, output) = Run(ranks, Steps(3));
            Assert.True(code == 0, output);
            Assert.Contains("resumed at step 2", output);
            AssertBitIdenticalFinalWeights(tp, resumed);
        }
        finally { Directory.Delete(dir, true); }
    }

    [SkippableFact]
    public void GrpoStage_TensorAndDataParallel_OnFourRanks_TrainsAndWritesWholeTensors()
    {
        // mpirun -np 4 engine train --stage grpo --tp 2: two data-parallel replicas of the tiny VLM, each cut over two
        // ranks. The checkpoints and the final model hold whole tensors (one process loads them), a buffer per replica.
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-tp-grpo-").FullName;
        try
        {
            var output = Path.Combine(dir, "run");
            var (code, text) = Run(4, [.. GrpoArgs(dir, output, steps: 2), "--tp", "2"]);
            Assert.True(code == 0, text);
            Assert.Contains("sampled and trained by 2 data-parallel rank(s) x 2 tensor-parallel ranks", text);
            Assert.Equal(2, File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Count(l => l.Trim().Length > 0));
            var checkpoint = Directory.GetDirectories(Path.Combine(output, "checkpoints")).Single();
            Assert.Equal(["buffer.rank-00000.bin", "buffer.rank-00001.bin"], Directory.GetFiles(checkpoint, "buffer*").Select(Path.GetFileName).Order());
            Assert.Null(R1V2.Native.Trainer.RunCheckpoints.VerifyManifest(checkpoint));
            using (var b = new CpuBackend())
            using (var model = R1V2.Native.Engine.Models.VisionLanguageModel.Load(b, Path.Combine(output, "final")))
                Assert.Equal(272, model.LmHead.Value.Dim(0));                                          // whole again
            (code, text) = Run(4, [.. GrpoArgs(dir, output, steps: 3), "--tp", "2"]);
            Assert.True(code == 0, text);
            Assert.Contains("resumed at step 2", text);
            (code, text) = Run(3, [.. GrpoArgs(dir, Path.Combine(dir, "odd"), steps: 1), "--tp", "2"]);
            Assert.NotEqual(0, code);
            Assert.Contains("parallel.tp is 2 but the launch has 3 rank(s)", text);
        }
        finally { Directory.Delete(dir, true); }
    }

    [SkippableFact]
    public void ARankThatFailsInStepTwo_EndsTheJobWithItsMessage()
    {
        // Supervised rows 4-7 make step 2; with 2 ranks row 5 is rank 1's, and its image is not an image: rank 1 fails
        // in step 2 while rank 0 waits in the gradient all-reduce. The job must end with rank 1's message, not hang.
        var mpirun = RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-dp-fault-").FullName;
        try
        {
            var args = SftArgs(dir, Path.Combine(dir, "run")).ToList();
            var data = Path.Combine(dir, "sft.jsonl");
            File.WriteAllBytes(Path.Combine(dir, "broken.png"), [0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
            var rows = File.ReadAllLines(data);
            rows[5] = System.Text.Json.JsonSerializer.Serialize(new { prompt = "<image> what is it?", image = "broken.png", response = "a broken file" });
            File.WriteAllLines(data, rows);
            args.AddRange(["--set", "parallel.timeout_s=60"]);
            var clock = Stopwatch.StartNew();
            var (code, output) = Run(2, [.. args]);
            Assert.NotEqual(0, code);
            Assert.Contains("rank 1", output);
            Assert.Contains("broken.png", output);
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"the job took {clock.Elapsed.TotalSeconds:F0} s to end");
            Assert.Single(File.ReadAllLines(Path.Combine(dir, "run", "metrics.jsonl")), l => l.Trim().Length > 0);   // step 1 was logged, step 2 never was
        }
        finally { Directory.Delete(dir, true); }
    }

    [SkippableFact]
    public void ShardedOptimizer_ThreeSteps_GiveTheWeightsOfTheReplicatedOne_AndResumeBitForBit()
    {
        // ZeRO-1 on 2 ranks: 3 supervised steps with the optimiser state sharded equal the same 3 steps with it
        // replicated; a sharded run stopped after step 2 and resumed writes the same final weights as one run straight
        // through, bit for bit (every rank's shard comes back from its own file).
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-zero1-").FullName;
        try
        {
            string[] Args(string output, int steps, bool shard) =>
                [.. SftArgs(dir, output), "--set", $"steps={steps}", "--set", "checkpoint.every=1", "--set", $"parallel.shard_optimizer={(shard ? "true" : "false")}"];
            var replicated = Path.Combine(dir, "replicated");
            var (code, text) = Run(2, Args(replicated, 3, shard: false));
            Assert.True(code == 0, text);
            Assert.Contains("(replicated;", text);
            var sharded = Path.Combine(dir, "sharded");
            (code, text) = Run(2, Args(sharded, 3, shard: true));
            Assert.True(code == 0, text);
            Assert.Contains("(masters and moments sharded over 2 ranks)", text);
            AssertSameMetrics(Metrics(replicated), Metrics(sharded), 1e-5);
            AssertSameFinalWeights(replicated, sharded, "sharded against replicated");
            var checkpoint = Directory.GetDirectories(Path.Combine(sharded, "checkpoints")).OrderBy(d => d).Last();
            Assert.True(File.Exists(Path.Combine(checkpoint, "optimizer.rank-00000.safetensors")) && File.Exists(Path.Combine(checkpoint, "optimizer.rank-00001.safetensors")));
            Assert.False(File.Exists(Path.Combine(checkpoint, "optimizer.safetensors")));

            var resumed = Path.Combine(dir, "resumed");
            (code, text) = Run(2, Args(resumed, 2, shard: true));
            Assert.True(code == 0, text);
            Directory.Delete(Path.Combine(resumed, "final"), true);
            (code, text) = Run(2, Args(resumed, 3, shard: true));
            Assert.True(code == 0, text);
            Assert.Contains("resumed at step 2", text);
            AssertBitIdenticalFinalWeights(sharded, resumed);
        }
        finally { Directory.Delete(dir, true); }
    }

    [SkippableTheory]
    [InlineData(false)]
    [InlineData(true)]
    public void ThePlan_MatchesTheMeasuredPoolPeak_OfEachRank(bool shard)
    {
        // engine plan's per-rank figures (StepCost with the layout) against the pool peak of a supervised step of the
        // small config on 2 data-parallel ranks, with the optimiser replicated and sharded (ZeRO-1).
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-plan-").FullName;
        try
        {
            var output = Path.Combine(dir, "timing.json");
            var (code, text) = RunProgram(RanksProgram, 2, ["step-memory", Path.Combine(AppContext.BaseDirectory, "configs", "small.json"), output, .. shard ? new[] { "--shard-optimizer" } : []]);
            Assert.True(code == 0, text);
            var t = System.Text.Json.JsonSerializer.Deserialize<R1V2.Native.Trainer.Bench.StepTiming>(File.ReadAllText(output))!;
            Assert.InRange(t.PeakOverEstimate, 0.9, 1.1);
            var config = R1V2.Native.Engine.Models.VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", "small.json"));
            var shape = R1V2.Native.Engine.Models.StepShape.Uniform(2, 96, 1) with { Scored = t.ScoredTokens };
            var plan = R1V2.Native.Engine.Models.StepCost.TrainingMemory(config, shape, R1V2.Native.Engine.Models.TrainableParts.AdapterAndLlm, DType.F32,
                layout: new R1V2.Native.Engine.Models.ParallelLayout(2, 1, shard));
            Assert.Equal(plan.Total, t.EstimatedBytes);
        }
        finally { Directory.Delete(dir, true); }
    }

    private static void AssertClose(float[] a, float[] b, double relative, string what)
    {
        Assert.Equal(a.Length, b.Length);
        double diff = 0, norm = 0;
        for (int i = 0; i < a.Length; i++)
        {
            diff += (double)(a[i] - b[i]) * (a[i] - b[i]);
            norm += (double)a[i] * a[i];
        }
        Assert.True(Math.Sqrt(diff) <= relative * Math.Sqrt(norm), $"{what}: differs by {Math.Sqrt(diff):E2} (norm {Math.Sqrt(norm):E2})");
    }

    private static void AssertSameGradients(Dictionary<string, float[]> a, Dictionary<string, float[]> b, string what)
    {
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        double total = Math.Sqrt(a.Values.Sum(g => g.Sum(x => (double)x * x)));
        foreach (var (name, g) in a)
        {
            // Each tensor to 1e-4 of its own norm, or to 1e-6 of all gradients where its own is rounding noise (a key
            // bias has no gradient in exact arithmetic: softmax ignores a shift shared by every key).
            double diff = Math.Sqrt(g.Zip(b[name]).Sum(z => (double)(z.First - z.Second) * (z.First - z.Second)));
            double own = Math.Sqrt(g.Sum(x => (double)x * x));
            Assert.True(diff <= 1e-4 * own + 1e-6 * total, $"{what}: gradient of {name} differs by {diff:E2} (its norm {own:E2}, all {total:E2})");
        }
    }

    [SkippableTheory]
    [InlineData(2)]
    [InlineData(4)]
    public void TensorParallel_TwoWays_AndTwoByTwo_EqualOneProcess(int ranks)
    {
        // tp = 2 (and tp = 2 x dp = 2 on 4 ranks) against one process on the tiny VLM (4 heads, 2 kv heads, 96 MLP
        // columns, 272 vocabulary rows, all cut in two): logits, the loss and every gradient of a pass with an image, the
        // fused GRPO loss and its gradients, a greedy generation, and one GRPO optimiser step.
        RequireMpiRun();
        var dir = Directory.CreateTempSubdirectory("r1v2-tp-").FullName;
        try
        {
            var options = R1V2.Native.Ranks.Scenarios.Options.Parse([]);
            var one = R1V2.Native.Ranks.Scenarios.TensorParallelStep(TinyModel(dir), SingleProcessCollectives.Instance, 1, options);
            var output = Path.Combine(dir, "tp.json");
            var (code, text) = RunProgram(RanksProgram, ranks, ["tensor-parallel", TinyModel(dir), output, "2"]);
            Assert.True(code == 0, text);
            var tp = System.Text.Json.JsonSerializer.Deserialize<R1V2.Native.Ranks.Scenarios.TensorParallelResult>(File.ReadAllText(output))!;
            Assert.Equal((272, 96), (one.LocalHeadRows, one.LocalMlpColumns));
            Assert.Equal((136, 48), (tp.LocalHeadRows, tp.LocalMlpColumns));   // each rank held half of the cut tensors
            AssertClose(one.Logits, tp.Logits, 1e-5, "logits");
            Assert.True(Math.Abs(one.Loss - tp.Loss) <= 1e-5 * one.Loss, $"loss {one.Loss} vs {tp.Loss}");
            AssertSameGradients(one.Gradients, tp.Gradients, "NLL");
            Assert.True(Math.Abs(one.GrpoLoss - tp.GrpoLoss) <= 1e-5 * Math.Abs(one.GrpoLoss), $"GRPO loss {one.GrpoLoss} vs {tp.GrpoLoss}");
            AssertSameGradients(one.GrpoGradients, tp.GrpoGradients, "GRPO");
            Assert.Equal(one.Generated, tp.Generated);
            Assert.True(Math.Abs(one.StepLoss - tp.StepLoss) <= 1e-5 * Math.Abs(one.StepLoss), $"step loss {one.StepLoss} vs {tp.StepLoss}");
            Assert.True(Math.Abs(one.StepGradNorm - tp.StepGradNorm) <= 1e-5 * one.StepGradNorm, $"gradient norm {one.StepGradNorm} vs {tp.StepGradNorm}");
            AssertClose(one.Weights, tp.Weights, 1e-5, "weights after the step");
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void ATensorParallelSize_ThatDoesNotSplitTheHeads_IsAnErrorNamingIt()
    {
        var c = R1V2.Native.Engine.Models.VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json")).Llm;   // 4 heads, 2 kv heads
        var e = Assert.Throws<InvalidDataException>(() => new R1V2.Native.Engine.Layers.TensorParallel(new Inert(0, 4)).Check(c));
        Assert.Contains("parallel.tp is 4", e.Message);
        Assert.Contains("2 key/value heads", e.Message);
        new R1V2.Native.Engine.Layers.TensorParallel(new Inert(0, 2)).Check(c);
    }

    [Fact]
    public void SelftestChecks_CatchACollectiveThatDoesNothing()
    {
        using var b = new CpuBackend();
        var checks = SelftestCommand.Checks(new Inert(1, 3), b);
        Assert.Contains(checks, k => k.Collective.StartsWith("all_reduce sum") && k.Problem is not null);
        Assert.Contains(checks, k => k.Collective == "all_gather" && k.Problem is not null);
        Assert.Contains(checks, k => k.Collective.StartsWith("broadcast") && k.Problem is not null);
    }

    [Fact]
    public void OneProcess_NeedsNoMpiLibrary()
    {
        Assert.Same(SingleProcessCollectives.Instance, Launch.Collectives());
        Assert.All(SelftestCommand.Checks(SingleProcessCollectives.Instance, new CpuBackend()), k => Assert.Null(k.Problem));
    }

    [SkippableFact]
    public void MpiLibrary_ExportsTheOpenMpiHandlesTheBindingReads()
    {
        Skip.IfNot(NativeLibraries.Mpi.TryLoad(out var error), $"no MPI library here ({error})");
        // Not initialised in this process (the test host forks children): the handles are exported objects of Open MPI.
        foreach (var name in new[] { "ompi_mpi_comm_world", "ompi_mpi_float", "ompi_mpi_double", "ompi_mpi_byte", "ompi_mpi_op_sum", "ompi_mpi_op_max", "ompi_mpi_info_null" })
            Assert.True(NativeLibraries.Mpi.HasExport(name), $"{name} is not exported");
    }

    [Fact]
    public void GlobalNorm_CountsReplicatedGradientsOnce_AndSumsShards()
    {
        using var b = new CpuBackend();
        using var g = b.FromArray([3f, 4f], DType.F32, [2]);
        var four = new Replicas(4);
        Assert.Equal(5.0, b.GlobalNorm([g]), 12);                    // replicated on 4 data-parallel ranks: once
        Assert.Equal(10.0, b.GlobalNorm([g], shardedOver: four), 12); // 4 distinct shards of 25 each
    }

    /// <summary>A group of <paramref name="n"/> ranks holding the same values: a sum is n times the local value.</summary>
    private sealed class Replicas(int n) : ICollectives
    {
        public int Rank => 0;
        public int WorldSize => n;
        public int LocalRank => 0;
        public void AllReduceSum(Span<double> values) { foreach (ref var v in values) v *= n; }
        public void AllReduceMax(Span<double> values) { }
        public void AllReduceSum(Span<float> values) { foreach (ref var v in values) v *= n; }
        public void AllReduceSum(Tensor tensor) => throw new NotSupportedException();
        public void Broadcast(Span<byte> data, int root) { }
        public void AllGather(ReadOnlySpan<float> mine, Span<float> all) => throw new NotSupportedException();
        public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine) => throw new NotSupportedException();
        public void Barrier() { }
        public void Barrier(TimeSpan timeout) { }
        public void Abort(string message) => throw new InvalidOperationException(message);
        public ICollectives Split(int color, int key) => this;
    }

    /// <summary>Rank <paramref name="rank"/> of a group of <paramref name="size"/> whose collectives do nothing.</summary>
    private sealed class Inert(int rank, int size) : ICollectives
    {
        public int Rank => rank;
        public int WorldSize => size;
        public int LocalRank => rank;
        public void AllReduceSum(Span<double> values) { }
        public void AllReduceMax(Span<double> values) { }
        public void AllReduceSum(Span<float> values) { }
        public void AllReduceSum(Tensor tensor) { }
        public void Broadcast(Span<byte> data, int root) { }
        public void AllGather(ReadOnlySpan<float> mine, Span<float> all) { }
        public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine) { }
        public void Barrier() { }
        public void Barrier(TimeSpan timeout) { }
        public void Abort(string message) => throw new InvalidOperationException(message);
        public ICollectives Split(int color, int key) => this;
    }
}

/// <summary>The NCCL binding where no NCCL is installed (CI, laptops): the ABI it assumes and the error it gives.</summary>
public sealed class NcclBindingTests
{
    [Fact]
    public void TheBinding_UsesNcclsAbi()
    {
        // nccl.h: typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId, NCCL_UNIQUE_ID_BYTES 128;
        // ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9; ncclSum = 0, ncclMax = 2; ncclInProgress = 7.
        Assert.Equal(128, System.Runtime.InteropServices.Marshal.SizeOf<NcclUniqueId>());
        Assert.Equal(128, System.Runtime.CompilerServices.Unsafe.SizeOf<NcclUniqueId>());
        Assert.Equal((7, 8, 9), ((int)NcclDataType.Float32, (int)NcclDataType.Float64, (int)NcclDataType.Bfloat16));
        Assert.Equal((0, 2), ((int)NcclRedOp.Sum, (int)NcclRedOp.Max));
        Assert.Equal(7, Nccl.InProgress);
    }

    [SkippableFact]
    public void WithoutNccl_TheErrorNamesTheLibraryAndTheOverride()
    {
        Skip.If(NativeLibraries.Nccl.TryLoad(out _), "NCCL is installed here");
        Assert.False(NativeLibraries.Nccl.TryLoad(out var error));
        Assert.Contains("libnccl.so.2", error);
        Assert.Contains("R1V2_LIBNCCL", error);
        var e = Assert.ThrowsAny<Exception>(() => Nccl.Version());
        var text = e.ToString();
        Assert.Contains("libnccl.so.2", text);
        Assert.Contains("R1V2_LIBNCCL", text);
    }
}
