using System.Text.Json;
using R1V2.Native.Cli;
using R1V2.Native.Cli.Commands;

namespace R1V2.Native.Tests.Cli;

/// <summary>`engine train` with a config and stages, through the real command line.</summary>
[Collection("cpu")]
public sealed class TrainCommandTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-train-cli-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private string Tiny()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 2);
        return ckpt;
    }

    [Fact]
    public void TrainWithTheShippedGrpoConfig_RunsAndResumesFromItsCheckpoint()
    {
        var ckpt = Tiny();
        var config = Path.Combine(AppContext.BaseDirectory, "configs", "grpo-tiny.yaml");
        var data = Path.Combine(AppContext.BaseDirectory, "configs", "data", "arithmetic.jsonl");
        var output = Path.Combine(_dir, "grpo");
        string[] Args(int steps) => ["train", "--config", config, "--set", $"model={ckpt}", "--set", $"data.path={data}", "--set", $"steps={steps}",
            "--set", "grpo.max_new_tokens=4", "--set", "checkpoint.every=1", "--backend", "cpu", "--out", output];
        Assert.Equal(0, Program.Main(Args(1)));
        Assert.Equal(0, Program.Main(Args(2))); // resumes at step 1
        Assert.Equal(2, File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Length);
        Assert.True(File.Exists(Path.Combine(output, "plots", "reward.png")));
        var resolved = File.ReadAllText(Path.Combine(output, "config.resolved.yaml"));
        Assert.Contains("steps: 2", resolved);
        Assert.Contains("backend: cpu", resolved); // --backend overrides the config
    }

    /// <summary>
    /// A GRPO run on CUDA (bf16, flash attention, cuBLASLt, the fused loss, multi-tensor AdamW) run twice from one seed
    /// writes the same checkpoint bytes: every kernel adds in a fixed order. Skipped without a GPU.
    /// </summary>
    [SkippableFact]
    public void GrpoRun_OnCuda_WritesTheSameCheckpointBytesTwice()
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        var ckpt = Tiny();
        var config = Path.Combine(AppContext.BaseDirectory, "configs", "grpo-tiny.yaml");
        var data = Path.Combine(AppContext.BaseDirectory, "configs", "data", "arithmetic.jsonl");
        Dictionary<string, byte[]> Run(string name)
        {
            var output = Path.Combine(_dir, name);
            Assert.Equal(0, Program.Main(["train", "--config", config, "--set", $"model={ckpt}", "--set", $"data.path={data}", "--set", "steps=3",
                "--set", "grpo.max_new_tokens=8", "--set", "checkpoint.every=3", "--backend", "cuda", "--seed", "5", "--out", output]));
            return Directory.GetFiles(output, "*.safetensors", SearchOption.AllDirectories).ToDictionary(f => Path.GetRelativePath(output, f), File.ReadAllBytes);
        }
        var first = Run("cuda-a");
        var second = Run("cuda-b");
        Assert.NotEmpty(first);
        Assert.Equal(first.Keys.Order(), second.Keys.Order());
        foreach (var (file, bytes) in first) Assert.True(bytes.AsSpan().SequenceEqual(second[file]), $"{file} differs between two CUDA runs of one seed");
    }

    [Fact]
    public void TrainStageRm_WritesTheModelAndHeldOutAccuracy()
    {
        var ckpt = Tiny();
        var pairs = Path.Combine(_dir, "pairs.jsonl");
        File.WriteAllLines(pairs, Enumerable.Range(0, 10).Select(i => JsonSerializer.Serialize(new { prompt = $"p{i}", chosen = "yes", rejected = "no" })));
        var output = Path.Combine(_dir, "rm");
        Assert.Equal(0, Program.Main(["train", "--stage", "rm", "--set", $"model={ckpt}", "--set", $"data.path={pairs}", "--set", "steps=2", "--out", output]));
        Assert.True(File.Exists(Path.Combine(output, "final", "config.json")));
        var summary = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "summary.json"))).RootElement;
        Assert.Equal(2, summary.GetProperty("HeldOutPairs").GetInt32());
        Assert.True(File.Exists(Path.Combine(output, "plots", "loss.png")));
    }

    [Fact]
    public void BuildPairsWithARewardModel_AndIterativeMpo_RunThroughTheCommandLine()
    {
        // build-pairs ranks by rule + format + the reward model's standardised term (a trained rm on yes/no pairs); mpo
        // with mpo.rounds=2 samples round 2's pairs from round 1's policy and logs both rounds.
        var ckpt = Tiny();
        var pairs = Path.Combine(_dir, "pairs.jsonl");
        File.WriteAllLines(pairs, Enumerable.Range(0, 10).Select(i => JsonSerializer.Serialize(new { prompt = $"p{i}", chosen = "yes", rejected = "no" })));
        var rm = Path.Combine(_dir, "rm");
        Assert.Equal(0, Program.Main(["train", "--stage", "rm", "--set", $"model={ckpt}", "--set", $"data.path={pairs}", "--set", "steps=3", "--set", "trainable=all",
            "--set", "optim.lr=0.003", "--out", rm]));
        var prompts = Path.Combine(_dir, "prompts.jsonl");
        File.WriteAllLines(prompts, Enumerable.Range(0, 6).Select(i => JsonSerializer.Serialize(new { question = $"q{i}", answer = "yes" })));
        var built = Path.Combine(_dir, "built.jsonl");
        Assert.Equal(0, Program.Main(["build-pairs", "--model", ckpt, "--data", prompts, "--out", built, "--samples", "4", "--max-new-tokens", "6",
            "--margin", "0.01", "--reward-model", Path.Combine(rm, "final"), "--rm-threshold", "0", "--backend", "cpu"]));
        var lines = File.ReadAllLines(built);
        Assert.NotEmpty(lines);   // the tiny model's rule and format rewards tie: only the reward model's term separates its samples
        Assert.All(lines, l => Assert.True(JsonDocument.Parse(l).RootElement.GetProperty("chosen_reward").GetDouble()
            > JsonDocument.Parse(l).RootElement.GetProperty("rejected_reward").GetDouble()));
        var (code, error) = Run(["build-pairs", "--model", ckpt, "--data", prompts, "--out", built, "--rm-threshold", "-1"]);
        Assert.Equal((1, "error: --rm-threshold must be >= 0, got -1"), (code, error.Trim()));

        var mpo = Path.Combine(_dir, "mpo");
        Assert.Equal(0, Program.Main(["train", "--stage", "mpo", "--set", $"model={ckpt}", "--set", $"data.path={pairs}", "--set", "steps=2",
            "--set", "mpo.rounds=2", "--set", $"mpo.prompts={prompts}", "--set", "mpo.max_new_tokens=6", "--set", "mpo.margin=0.01",
            "--set", $"mpo.reward_model={Path.Combine(rm, "final")}", "--set", "mpo.rm_threshold=0", "--backend", "cpu", "--out", mpo]));
        Assert.Equal(2, File.ReadAllLines(Path.Combine(mpo, "rounds.jsonl")).Length);
        Assert.True(File.Exists(Path.Combine(mpo, "final", "model.safetensors")));
    }

    [Fact]
    public void RewardControlTask_RunsFromTheCommandLine()
    {
        var output = Path.Combine(_dir, "control");
        Assert.Equal(0, Program.Main(["train", "--task", "reward-control", "--steps", "4", "--backend", "cpu", "--out", output]));
        Assert.Equal(4, File.ReadAllLines(Path.Combine(output, "grpo", "metrics.jsonl")).Length);
        Assert.Contains("Mean training reward: first quarter", File.ReadAllText(Path.Combine(output, "summary.md")));
        var (code, error) = Train(["--task", "reward-control", "--steps", "2", "--out", Path.Combine(_dir, "short")]);
        Assert.Equal((1, "error: the reward-control task needs at least 4 steps to compare its first and last quarter, got 2"), (code, error.Trim()));
    }

    [Fact]
    public void UnknownConfigKey_FailsWithItsName()
    {
        var output = Path.Combine(_dir, "bad");
        var (code, error) = Train(["--set", "grpo.group_sise=4", "--out", output]);
        Assert.Equal(1, code);
        Assert.Equal("error: --set 'grpo.group_sise=4': unknown key 'group_sise' in 'grpo'", error.Trim()); // the message alone, no stack trace
        Assert.False(Directory.Exists(output)); // nothing started
        // The --set blamed is the one whose section lacks the key, not a valid key of that name elsewhere.
        var (_, nested) = Train(["--set", "grpo.steps=3", "--set", "steps=2", "--out", output]);
        Assert.Equal("error: --set 'grpo.steps=3': unknown key 'steps' in 'grpo'", nested.Trim());
        var (badValue, valueError) = Train(["--set", "reward.grounding_credit=partial", "--out", output]);
        Assert.Equal(1, badValue);
        Assert.Equal("error: (defaults): reward.grounding_credit must be exact or per_digit, not 'partial'", valueError.Trim());
    }

    [Theory]
    [InlineData(new[] { "--pipeline", "grpo_stepz=3" }, "grpo_stepz: no such setting")]
    [InlineData(new[] { "--pipeline", "grpo_steps=2", "--task", "next-byte" }, "--pipeline changes the built-in digit task")]
    [InlineData(new[] { "--pipeline", "grpo_steps=2", "--stage", "sft" }, "--pipeline changes the built-in digit task")]
    public void PipelineSettings_ThatCannotApply_FailBeforeAnythingStarts(string[] args, string message)
    {
        var output = Path.Combine(_dir, "pipe");
        var (code, error) = Train([.. args, "--out", output]);
        Assert.NotEqual(0, code);
        Assert.Contains(message, error);
        Assert.False(Directory.Exists(output));
    }

    /// <summary>`engine train` with these arguments: its exit code and what it wrote to stderr.</summary>
    private static (int Code, string Error) Train(string[] args) => Run(["train", .. args]);

    /// <summary>`engine` with these arguments: its exit code and what it wrote to stderr.</summary>
    private static (int Code, string Error) Run(string[] args)
    {
        var error = new StringWriter();
        var saved = Console.Error;
        Console.SetError(error);
        try { return (Program.Main(args), error.ToString()); }
        finally { Console.SetError(saved); }
    }
}
