using R1V2.Native.Cli.Commands;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;

namespace R1V2.Native.Tests.Trainer;

/// <summary>The GRPO stage end to end on the tiny checkpoint: steps, buffer, metrics, checkpoints and exact resume.</summary>
[Collection("cpu")]
public sealed class GrpoTrainerTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-grpo-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    /// <summary>
    /// A reward the random tiny model's samples disagree on (the share of lowercase ASCII letters), except on even
    /// prompts, where every sample gets the same reward: those groups carry no advantage and leave room for replay.
    /// </summary>
    private static RewardBreakdown Letters(string text, PromptRow p)
    {
        double r = p.Index % 2 == 0 ? 0.5 : text.Length == 0 ? 0 : text.Count(ch => ch is >= 'a' and <= 'z') / (double)text.Length;
        return new RewardBreakdown(r, 0, 0, 0, r);
    }

    private TrainConfig Config(string output, int steps)
    {
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 4);
        var data = Path.Combine(_dir, "prompts.jsonl");
        File.WriteAllText(data, string.Join("\n", Enumerable.Range(0, 5).Select(i => $"{{\"question\": \"what is {i} + {i}?\", \"answer\": \"{2 * i}\"}}")) + "\n");
        return TrainConfig.Load(null, [$"model={ckpt}", $"output={output}", $"data.path={data}", $"steps={steps}", "trainable=all", "optim.lr=0.003",
            "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=6", "grpo.minibatches=2", "grpo.cache_blocks=64", "checkpoint.every=2",
            "checkpoint.keep=1", "grpo.ssb.capacity=16"]);
    }

    [Fact]
    public void Run_StepsWriteMetricsAndCheckpoints_AndResumeIsBitIdentical()
    {
        var straightDir = Path.Combine(_dir, "straight");
        using (var t = new GrpoTrainer(Config(straightDir, 4), fx.Backend, Letters)) t.Run();
        var straight = File.ReadAllLines(Path.Combine(straightDir, "metrics.jsonl"))
            .Select(l => System.Text.Json.JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToList();
        Assert.Equal(4, straight.Count);
        Assert.Contains(straight, m => m.Loss != 0);
        Assert.Contains(straight, m => m.Replayed > 0);                 // the buffer fed later batches
        Assert.All(straight, m => Assert.Null(m.ReasoningTerm ?? m.GroundingTerm)); // unweighted rule checks are not logged
        Assert.Single(Directory.GetDirectories(Path.Combine(straightDir, "checkpoints")));  // keep = 1

        var resumedDir = Path.Combine(_dir, "resumed");
        using (var t = new GrpoTrainer(Config(resumedDir, 2), fx.Backend, Letters)) t.Run();
        using (var t = new GrpoTrainer(Config(resumedDir, 4), fx.Backend, Letters))
        {
            Assert.Equal(2, t.Step);                                      // picked up the step-2 checkpoint
            t.Run();
        }
        var resumed = File.ReadAllLines(Path.Combine(resumedDir, "metrics.jsonl"))
            .Select(l => System.Text.Json.JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToList();
        Assert.Equal(straight.Select(m => m.Loss), resumed.Select(m => m.Loss));      // bit for bit
        Assert.Equal(straight.Select(m => m.Reward), resumed.Select(m => m.Reward));
        Assert.Equal(straight.Select(m => m.GradNorm), resumed.Select(m => m.GradNorm));

        var files = Report.Write(straightDir);
        Assert.Contains(files, f => f.EndsWith("effective_ratio.png"));
        Assert.Contains(files, f => f.EndsWith("summary.md"));
        using var png = SixLabors.ImageSharp.Image.Load(files.First(f => f.EndsWith("reward.png")));
        Assert.Equal(800, png.Width);
    }

    [Fact]
    public void Cancellation_WritesACheckpointBeforeStopping()
    {
        var output = Path.Combine(_dir, "cancelled");
        using var cts = new CancellationTokenSource();
        using var t = new GrpoTrainer(Config(output, 10), fx.Backend, Letters);
        t.Run(m => { if (m.Step == 1) cts.Cancel(); }, cts.Token);
        Assert.Equal(1, t.Step);
        Assert.EndsWith("step-000001", GrpoTrainer.LatestCheckpoint(output));
    }

    [Fact]
    public void RowsThatKnowTheirImage_GiveAHallucinationRate()
    {
        var output = Path.Combine(_dir, "grounded");
        var config = Config(output, 1);
        File.WriteAllLines(config.Data.Path, Enumerable.Range(0, 4).Select(i =>
            $"{{\"question\": \"what is shown?\", \"answer\": \"cat\", \"image_objects\": [\"cat\"], \"image_digits\": [{i}]}}"));
        using var t = new GrpoTrainer(config, fx.Backend, Letters);
        t.Run();
        Assert.True(t.History[0].HallucinationRate is >= 0 and <= 1, $"rate {t.History[0].HallucinationRate}");
        var plain = Path.Combine(_dir, "plain");
        using var u = new GrpoTrainer(Config(plain, 1), fx.Backend, Letters);
        u.Run();
        Assert.Null(u.History[0].HallucinationRate); // the rows say nothing about their images
    }

    [Fact]
    public void RewardConfig_WeightsTheReasoningAndGroundingChecks_OfDigitRows()
    {
        var config = TrainConfig.Load(null, ["reward.reasoning_weight=0.5", "reward.grounding_weight=0.25", "reward.rm_weight=2"]);
        var row = new PromptRow(0, "What is the sum of the digits in the image?", "12", [], null, [5, 7], Type: "sum") { Digits = [5, 7] };
        var reward = GrpoTrainer.RewardFrom(config.Reward, withRewardModel: false);
        var right = reward.ScoreStep(["I see the digits 5, 7. 5 + 7 = 12.</think>\\boxed{12}"], [GrpoTrainer.ContextOf(row)], [3])[0];
        Assert.Equal((1.0, 0.0, 0.5, 0.5, 0.25, 2.25), (right.Rule, right.RewardModel, right.Format, right.Reasoning, right.Grounding, right.Total));
        var misread = reward.Score("I see the digits 5, 8. 5 + 8 = 13.</think>\\boxed{13}", GrpoTrainer.ContextOf(row));
        Assert.Equal((0.0, 0.5, 0.0), (misread.Rule, misread.Reasoning, misread.Grounding)); // follows its reading, which is wrong
        var withModel = GrpoTrainer.RewardFrom(config.Reward, withRewardModel: true).ScoreStep(["I see the digits 5, 7.</think>\\boxed{11}"], [GrpoTrainer.ContextOf(row)], [3])[0];
        Assert.Equal((6.0, 0.0, 0.0, 0.25), (withModel.RewardModel, withModel.Rule, withModel.Reasoning, withModel.Grounding)); // identity transform: 2 x 3; 11 does not follow from 5, 7
    }
}
