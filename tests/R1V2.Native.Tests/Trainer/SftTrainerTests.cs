using System.Text.Json;
using R1V2.Native.Cli;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;

namespace R1V2.Native.Tests.Trainer;

/// <summary>The supervised stage on the tiny checkpoint: learning, the loss it reports, held-out rows, exact resume.</summary>
[Collection("cpu")]
public sealed class SftTrainerTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-sft-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private TrainConfig Config(string output, int steps, params string[] extra)
    {
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 6);
        var data = Path.Combine(_dir, "sft.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 20).Select(i => JsonSerializer.Serialize(new { prompt = $"Is {i} even?", response = $"<think>{i} mod 2</think> {(i % 2 == 0 ? "yes" : "no")}" })));
        return TrainConfig.Load(null, ["stage=sft", $"model={ckpt}", $"output={Path.Combine(_dir, output)}", $"data.path={data}", $"steps={steps}", "trainable=all",
            "optim.lr=0.003", "sft.batch=4", "sft.held_out=0.2", .. extra]);
    }

    [Fact]
    public void Sft_LowersTheHeldOutLoss_AndReportsTheTeacherForcedNllOfTheResponses()
    {
        var config = Config("learn", 30);
        using var t = new SftTrainer(config, fx.Backend);
        // The held-out loss is the mean NLL of response tokens (and the end token), scored here one example at a time.
        var tok = TextTokenizer.Load(config.Model);
        var template = new ChatTemplate(t.Model.Config.TokensPerTile);
        var rows = File.ReadAllLines(config.Data.Path).Skip(16).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        double nll = 0;
        int n = 0;
        foreach (var row in rows)
        {
            var prompt = tok.Encode(template.Render([new ChatMessage("user", row.GetProperty("prompt").GetString()!, [])]));
            int[] ids = [.. prompt, .. tok.Encode(row.GetProperty("response").GetString()!), tok.RequireToken("<|im_end|>")];
            using var pass = t.Model.Forward(VlmBatch.Single(ids, null, 0, lossFrom: prompt.Length));
            nll -= pass.LogProbs.Sum(x => (double)x);
            n += ids.Length - prompt.Length;
        }
        var before = t.HeldOutLoss()!.Value;
        Assert.Equal(nll / n, before, 4);
        var summary = t.Run()!;
        Assert.Equal(4, summary.HeldOutExamples);
        Assert.Equal(before, summary.HeldOutLossBefore!.Value, 9);
        Assert.True(summary.HeldOutLossAfter < 0.6 * before, $"held-out loss {before:F3} -> {summary.HeldOutLossAfter:F3}");
        Assert.True(File.Exists(Path.Combine(config.Output, "final", "model.safetensors")));
        Assert.Contains(Report.Write(config.Output), f => f.EndsWith("loss.png"));
    }

    [Fact]
    public void Resume_IsBitIdentical_AndCancellationCheckpoints()
    {
        string[] extra = ["checkpoint.every=2", "optim.schedule=cosine", "optim.warmup=1"];
        using (var t = new SftTrainer(Config("straight", 5, extra), fx.Backend)) Assert.NotNull(t.Run());
        using var cts = new CancellationTokenSource();
        using (var t = new SftTrainer(Config("resumed", 5, extra), fx.Backend)) Assert.Null(t.Run(m => { if (m.Step == 3) cts.Cancel(); }, cts.Token));
        Assert.EndsWith("step-000003", RunCheckpoints.Latest(Path.Combine(_dir, "resumed")));
        using (var t = new SftTrainer(Config("resumed", 5, extra), fx.Backend))
        {
            Assert.Equal(3, t.Step);
            Assert.NotNull(t.Run());
        }
        SftStepMetrics[] Read(string name) => File.ReadAllLines(Path.Combine(_dir, name, "metrics.jsonl")).Select(l => JsonSerializer.Deserialize<SftStepMetrics>(l)!).ToArray();
        Assert.Equal(Read("straight").Select(m => (m.Loss, m.GradNorm)), Read("resumed").Select(m => (m.Loss, m.GradNorm)));
        Assert.Equal(File.ReadAllText(Path.Combine(_dir, "straight", "summary.json")), File.ReadAllText(Path.Combine(_dir, "resumed", "summary.json")));
    }

    [Fact]
    public void TrainStageSft_FromTheCommandLine()
    {
        var config = Config("cli", 2);
        Assert.Equal(0, Program.Main(["train", "--stage", "sft", "--set", $"model={config.Model}", "--set", $"data.path={config.Data.Path}", "--set", "steps=2",
            "--set", "sft.batch=2", "--out", config.Output]));
        Assert.True(File.Exists(Path.Combine(config.Output, "final", "config.json")));
        Assert.True(File.Exists(Path.Combine(config.Output, "summary.md")));
    }
}
