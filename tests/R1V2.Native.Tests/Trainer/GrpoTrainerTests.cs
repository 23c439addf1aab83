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

    private static RewardBreakdown Letters(string text, PromptRow p) => GrpoTestRuns.Letters(text, p);

    private TrainConfig Config(string output, int steps) => GrpoTestRuns.Config(_dir, output, steps);

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

    private static List<GrpoStepMetrics> Metrics(string output) =>
        File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Select(l => System.Text.Json.JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToList();

    /// <summary>Every parameter of the newest checkpoint of a run, by name.</summary>
    private Dictionary<string, float[]> Weights(string output)
    {
        using var model = Engine.Models.VisionLanguageModel.Load(fx.Backend, GrpoTrainer.LatestCheckpoint(output)!);
        return model.Parameters.All.ToDictionary(p => p.Name, p => p.Parameter.Value.ToFloatArray());
    }

    [Theory]
    [InlineData("seq_mean_token_mean")]
    [InlineData("token_mean")]
    public void GradientAccumulation_OfTwoHalves_EqualsOneBatch(string aggregation)
    {
        // One step of 8 rollouts of unequal lengths: one micro-batch of 8 against two micro-batches of 4 accumulated into
        // one optimiser step. The token weights of the two halves come from the whole batch, so the loss, the gradient
        // norm and the weights after the step agree to float rounding (before the fix each half was its own mean: twice
        // the gradient, and a token mean that was not global).
        List<GrpoStepMetrics> Run(string name, int minibatches, int accumulate)
        {
            var output = Path.Combine(_dir, name);
            var config = Config(output, 1);
            config.Grpo.Minibatches = minibatches;
            config.Optim.GradAccum = accumulate;
            config.Grpo.Aggregation = aggregation;
            config.Grpo.Ssb.Enabled = false;
            config.Grpo.MaxNewTokens = 8;
            // Adam's eps of 1 and no clipping make the step about lr x gradient: the weights then show a scaled or
            // re-weighted gradient (Adam's usual first step, lr x sign, would hide it).
            config.Optim.Eps = 1f;
            config.Optim.MaxGradNorm = 1e6;
            using (var t = new GrpoTrainer(config, fx.Backend, Letters)) t.Run();
            return Metrics(output);
        }
        var one = Run("one", 1, 1)[0];
        var two = Run("two", 2, 2)[0];
        Assert.True(one.UpdateRollouts >= 4, $"{one.UpdateRollouts} rollouts in the update");
        Assert.Equal(one.UpdateRollouts, two.UpdateRollouts);
        Assert.True(Math.Abs(one.Loss - two.Loss) <= 1e-6 * Math.Max(1, Math.Abs(one.Loss)), $"loss {one.Loss} vs {two.Loss}");
        Assert.True(Math.Abs(one.GradNorm - two.GradNorm) <= 1e-5 * one.GradNorm, $"gradient norm {one.GradNorm} vs {two.GradNorm}");
        var (a, b) = (Weights(Path.Combine(_dir, "one")), Weights(Path.Combine(_dir, "two")));
        Assert.Equal(a.Count, b.Count);
        foreach (var (name, w) in a) Check.Close(TestData.ToDouble(w), b[name], 1e-7, 1e-6, name);
    }

    [Fact]
    public void IdenticalSamplesOfAGroup_KeepZeroAdvantage_UnderTheStandardisedRewardModel_OnEveryStep()
    {
        // A reward model with a random head, standardised (threshold -inf: every score counts), and near-greedy sampling
        // (top_p keeps only the likeliest token), so each group's 4 samples are one response with one raw score. The
        // reward model's scaling moves only between steps, so no group gets an advantage and the buffer stays empty;
        // per-sample standardisation gave the copies different rewards.
        var ckpt = Path.Combine(_dir, "tiny");
        var config = Config(Path.Combine(_dir, "rm-run"), 4);
        var rmDir = Path.Combine(_dir, "rm");
        using (var rm = Engine.Models.RewardModel.Load(fx.Backend, ckpt, Engine.Models.TrainableParts.None, trainHead: false))
        {
            rm.Weight.Value.CopyFrom(TestData.Uniform(3, rm.Weight.Value.Dim(1), 2f));
            rm.Save(rmDir);
        }
        File.Copy(Path.Combine(ckpt, "tokenizer.json"), Path.Combine(rmDir, "tokenizer.json"), true);
        config.Reward.RmPath = rmDir;
        config.Reward.RmWeight = 1;
        config.Reward.RmTransform = "standardise";
        config.Grpo.TopP = 1e-6f;
        config.Grpo.PromptsPerStep = 3;
        using (var t = new GrpoTrainer(config, fx.Backend)) t.Run();
        var steps = Metrics(config.Output);
        Assert.Equal(4, steps.Count);
        Assert.All(steps, m =>
        {
            Assert.True(m.RewardModelStd > 1e-4, $"step {m.Step}: the groups' scores should differ (std {m.RewardModelStd})");
            Assert.Equal(0, m.FreshInformativeRatio);
            Assert.Equal((0, 0, 0.0), (m.Replayed, m.UpdateRollouts, m.Loss));
        });
    }

    [Fact]
    public void KlLossTerm_CoversEverySample_ZeroAdvantageOnesIncluded_WithoutRescalingThePolicyGradient()
    {
        // Letters gives even prompts one reward for every sample (zero advantage). Without a KL term the update holds only
        // the informative samples; with one it holds all of them (their KL term, with policy-gradient weight 0), weighted
        // on the informative samples' scale: a vanishing KL coefficient leaves the loss and gradient of the run without it.
        GrpoStepMetrics Updated(string name, string kl, float coef)
        {
            var config = Config(Path.Combine(_dir, name), 1);
            config.Grpo.Ssb.Enabled = false;
            config.Grpo.Kl = kl;
            config.Grpo.KlCoef = coef;
            using (var t = new GrpoTrainer(config, fx.Backend, Letters)) t.Run();
            var m = Metrics(config.Output)[0];
            Assert.True(m.FreshInformativeRatio is > 0 and < 1, $"{name}: fresh informative ratio {m.FreshInformativeRatio}");
            Assert.Equal(kl is "k2" or "k3", m.Kl is not null);
            return m;
        }
        int all = 4 * 2;
        Assert.Equal(all, Updated("k3", "k3", 0.1f).UpdateRollouts);
        Assert.Equal(all, Updated("k2", "k2", 0.1f).UpdateRollouts);
        var none = Updated("none", "none", 0);
        var faint = Updated("faint", "k3", 1e-9f);
        Assert.True(none.UpdateRollouts < all);
        Assert.Equal(all, faint.UpdateRollouts);
        Assert.True(Math.Abs(none.Loss - faint.Loss) <= 1e-6 * Math.Abs(none.Loss) && Math.Abs(none.GradNorm - faint.GradNorm) <= 1e-5 * none.GradNorm,
            $"loss {none.Loss} vs {faint.Loss}, gradient norm {none.GradNorm} vs {faint.GradNorm}");
    }

    [Fact]
    public void K1_IsARewardPenalty_NotALossTerm()
    {
        // grpo.kl=k1: the reward drops by kl_coef x (log pi_old - log pi_ref) summed over the response before advantages.
        // On step 1 the policy is the reference (the penalty is 0 to float rounding); after an update it is not, and
        // the mean penalty estimates KL(pi_old || ref) > 0. No loss term and no loss-side KL statistic.
        var k1 = Config(Path.Combine(_dir, "k1-on"), 2);
        k1.Grpo.Kl = "k1";
        k1.Grpo.KlCoef = 0.5f;
        using (var t = new GrpoTrainer(k1, fx.Backend, Letters)) t.Run();
        var steps = Metrics(k1.Output);
        Assert.True(Math.Abs(steps[0].KlPenalty!.Value) < 1e-4, $"k1 of the start policy {steps[0].KlPenalty}");
        Assert.True(steps[1].KlPenalty > 1e-4, $"k1 after an update {steps[1].KlPenalty}");
        Assert.All(steps, m => Assert.Null(m.Kl));
        var plain = Config(Path.Combine(_dir, "k1-off"), 1);
        using (var t = new GrpoTrainer(plain, fx.Backend, Letters)) t.Run();
        var off = Metrics(plain.Output)[0];
        Assert.Null(off.KlPenalty);
        // The penalty does not make a group informative (the buffer and dynamic sampling go by the task reward), but
        // every fresh sample trains, a tied group's for its penalty alone.
        Assert.Equal(off.FreshInformativeRatio, steps[0].FreshInformativeRatio);
        Assert.Equal(8, steps[0].UpdateRollouts - steps[0].Replayed);
        var bad = Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["grpo.kl=k4"]));
        Assert.Contains("grpo.kl must be none, k1 (reward penalty), k2 or k3", bad.Message);
        Assert.Contains("grpo.kl is k1 but grpo.kl_coef is 0", Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["grpo.kl=k1"])).Message);
        Assert.Contains("grpo.kl_coef is 0.1 but grpo.kl is none", Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["grpo.kl_coef=0.1"])).Message);
    }

    [Fact]
    public void DynamicSampling_ResamplesUntilTheBatchHoldsInformativeGroups_AndCountsTheExtraRollouts()
    {
        // Letters: groups of even prompts all get one reward. With dynamic sampling (buffer off) a step samples further
        // rounds of 2 prompts until it holds 2 groups whose rewards differ, at most 4 rounds.
        var config = Config(Path.Combine(_dir, "dapo"), 4);
        config.Grpo.Ssb.Enabled = false;
        config.Grpo.DynamicSampling.Enabled = true;
        config.Grpo.DynamicSampling.MaxRounds = 4;
        using (var t = new GrpoTrainer(config, fx.Backend, Letters)) t.Run();
        var steps = Metrics(config.Output);
        Assert.Contains(steps, m => m.SamplingRounds > 1);          // some first round drew an uninformative even prompt
        Assert.All(steps, m =>
        {
            Assert.InRange(m.SamplingRounds, 1, 4);
            Assert.Equal((m.SamplingRounds - 1) * 8, m.ExtraRollouts);
            if (m.SamplingRounds < 4) Assert.Equal(8, m.UpdateRollouts);   // two informative groups of 4, all of them in the update
            Assert.True(m.UpdateRollouts % 4 == 0, $"step {m.Step}: {m.UpdateRollouts} rollouts, not whole groups");
        });
        var plain = Config(Path.Combine(_dir, "no-dapo"), 2);
        plain.Grpo.Ssb.Enabled = false;
        using (var t = new GrpoTrainer(plain, fx.Backend, Letters)) t.Run();
        Assert.All(Metrics(plain.Output), m => Assert.Equal((1, 0), (m.SamplingRounds, m.ExtraRollouts)));
        Assert.Contains("grpo.dynamic_sampling.max_rounds must be at least 1",
            Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["grpo.dynamic_sampling.max_rounds=0"])).Message);
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

/// <summary>The tiny GRPO run the trainer tests share: its config and a reward its random samples disagree on.</summary>
internal static class GrpoTestRuns
{
    /// <summary>
    /// A reward the random tiny model's samples disagree on (the share of lowercase ASCII letters), except on even
    /// prompts, where every sample gets the same reward: those groups carry no advantage and leave room for replay.
    /// </summary>
    public static RewardBreakdown Letters(string text, PromptRow p)
    {
        double r = p.Index % 2 == 0 ? 0.5 : text.Length == 0 ? 0 : text.Count(ch => ch is >= 'a' and <= 'z') / (double)text.Length;
        return new RewardBreakdown(r, 0, 0, 0, r);
    }

    /// <summary>Steps of 2 prompts x 4 samples from the tiny checkpoint (made once under <paramref name="dir"/>), checkpoints every 2 steps.</summary>
    public static TrainConfig Config(string dir, string output, int steps)
    {
        var ckpt = Path.Combine(dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 4);
        var data = Path.Combine(dir, "prompts.jsonl");
        File.WriteAllText(data, string.Join("\n", Enumerable.Range(0, 5).Select(i => $"{{\"question\": \"what is {i} + {i}?\", \"answer\": \"{2 * i}\"}}")) + "\n");
        return TrainConfig.Load(null, [$"model={ckpt}", $"output={output}", $"data.path={data}", $"steps={steps}", "trainable=all", "optim.lr=0.003",
            "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=6", "grpo.minibatches=2", "grpo.cache_blocks=64", "checkpoint.every=2",
            "checkpoint.keep=1", "grpo.ssb.capacity=16"]);
    }
}
