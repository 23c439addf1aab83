using System.Text.Json;
using R1V2.Native.Trainer.Pipeline;

namespace R1V2.Native.Tests.Trainer;

/// <summary>The default pipeline end to end at a few steps per stage on the tiny config (wiring, outputs, resume).</summary>
[Collection("cpu")]
public sealed class DigitPipelineTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-pipeline-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private PipelineSettings Settings() => new()
    {
        Output = Path.Combine(_dir, "run"), Seed = 3, ModelConfig = Path.Combine(AppContext.BaseDirectory, "configs", "digits-tiny.json"),
        TrainScenes = 40, HeldOutScenes = 6, RlScenes = 12, WarmupSteps = 2, VisionSteps = 3, VisionBatch = 4, SftSteps = 3, SftBatch = 4, PairPrompts = 6, PairSamples = 2, RmSteps = 2, MpoSteps = 2, PairsPerStep = 2,
        GrpoSteps = 2, GrpoPrompts = 2, GroupSize = 3, MaxNewTokens = 6, RmSyntheticPairs = 8, RmMinAccuracy = 0,
    };

    [Fact]
    public void EveryStageRuns_IsEvaluatedOnHeldOutScenes_AndARerunContinuesInsteadOfRepeating()
    {
        var lines = new List<string>();
        var stages = new HashSet<string>();
        var summary = new DigitPipeline(Settings(), fx.Backend, lines.Add).Run((stage, _) => stages.Add(stage));
        Assert.Equal(["sft", "mpo", "grpo", "grpo-no-ssb"], summary.Stages.Select(s => s.Stage));
        Assert.Equal(["warmup", "vision", "sft", "rm", "mpo", "grpo", "grpo-no-ssb"],
            stages.OrderBy(s => s switch { "warmup" => 0, "vision" => 1, "sft" => 2, "rm" => 3, "mpo" => 4, "grpo" => 5, _ => 6 }));
        // The language warm-up trained on the text prompts; vision alignment wrote its measurement and a checkpoint SFT started from.
        Assert.True(File.Exists(Path.Combine(_dir, "run", "warmup", "final", "model.safetensors")));
        var vision = JsonSerializer.Deserialize<VisionPretrainResult>(File.ReadAllText(Path.Combine(_dir, "run", "vision", "summary.json")))!;
        Assert.Equal(3, vision.Losses.Count);
        Assert.InRange(vision.HeldOutDigitAccuracy, 0, 1);
        Assert.Contains("model=" + Path.Combine(_dir, "run", "vision", "final"), File.ReadAllText(Path.Combine(_dir, "run", "sft", "config.resolved.yaml")).Replace("model: ", "model="));
        Assert.True(summary.Pairs >= 4, $"{summary.Pairs} pairs: the reference trace beats untrained samples");
        Assert.NotNull(summary.RewardModelPairAccuracy);
        Assert.All(summary.Stages, s => Assert.Equal(6, s.Eval.Prompts));
        Assert.All(summary.Stages, s => Assert.NotNull(s.Eval.HallucinationRate)); // the held-out scenes know their digits
        Assert.All(summary.Stages, s => Assert.Equal(6 * Settings().EvalSamples, s.Eval.ReadingChecks)); // ... in order, so every sample's reading is checked
        Assert.Equal(2, summary.EffectiveRatioWithBuffer.Count);
        Assert.Equal(2, summary.EffectiveRatioWithoutBuffer.Count);
        var md = File.ReadAllText(Path.Combine(_dir, "run", "summary.md"));
        Assert.Contains("| grpo-no-ssb |", md);
        var sftRow = md.Split('\n').First(l => l.StartsWith("| sft |")); // the stage table comes before the per-type one
        Assert.EndsWith(string.Format(System.Globalization.CultureInfo.InvariantCulture, "| {0:F3} | {1:F3} |", summary.Stages[0].Eval.ReadsExactlyRate, summary.Stages[0].Eval.FollowsReadingRate), sftRow.TrimEnd());
        Assert.Contains($"| vs sft (paired) | pass@{Settings().EvalSamples} | majority of {Settings().EvalSamples} |", md);
        Assert.Contains(string.Format(System.Globalization.CultureInfo.InvariantCulture, "| - | {0:F3} | {1:F3} |", summary.Stages[0].Eval.PassAtK, summary.Stages[0].Eval.MajorityAtK), sftRow);
        // The reward model trains on the sampled pairs plus reference-vs-wrong traces, and (gate 0) joins GRPO's reward.
        Assert.Equal(summary.Pairs + 8, File.ReadAllLines(Path.Combine(_dir, "run", "data", "rm-pairs.jsonl")).Length);
        Assert.Contains("rm_path: " + Path.Combine(_dir, "run", "rm", "final"), File.ReadAllText(Path.Combine(_dir, "run", "grpo", "config.resolved.yaml")));
        Assert.StartsWith("GRPO reward: rule + format + 1 x [the answer follows the digits it claims] + 1 x [the share of the scene's digits it reads right] + 0.25", summary.GrpoReward);
        // MPO trains on the same candidates re-ranked by the hybrid signal once the reward model passes its gate.
        Assert.StartsWith("MPO pairs: rule + format + 0.25 x the reward model's term, f(s) [f(s) > 1]", summary.MpoPairs);
        Assert.Contains("data:\n  path: " + Path.Combine(_dir, "run", "data", "mpo-pairs.jsonl"), File.ReadAllText(Path.Combine(_dir, "run", "mpo", "round-1", "config.resolved.yaml")).Replace("\r", ""));
        var round = Assert.Single(summary.MpoRounds);
        Assert.Equal(File.ReadAllLines(Path.Combine(_dir, "run", "data", "mpo-pairs.jsonl")).Length, round.PairCount);
        Assert.Contains($"MPO round 1: {round.PairCount} pairs", md);
        // ... and its term really reaches the rewards (a raw-score threshold once silenced it while the summary said otherwise).
        var grpoSteps = File.ReadAllLines(Path.Combine(_dir, "run", "grpo", "metrics.jsonl")).Select(l => JsonSerializer.Deserialize<R1V2.Native.Trainer.GrpoStepMetrics>(l)!).ToList();
        Assert.Contains(grpoSteps, m => m.RewardModelTerm > 0);
        // The summary sets GRPO's accuracy on its own prompts beside the held-out change, read from each run's metrics.
        Assert.Equal(grpoSteps.Select(m => m.Accuracy), summary.TrainAccuracyWithBuffer);
        Assert.Equal(2, summary.TrainAccuracyWithoutBuffer.Count);
        Assert.Contains(string.Format(System.Globalization.CultureInfo.InvariantCulture, "{0:F3} -> {1:F3} with the buffer", grpoSteps[0].Accuracy, grpoSteps[1].Accuracy), md);
        Assert.True(File.Exists(Path.Combine(_dir, "run", "plots", "grpo_train_accuracy.png")));
        // GRPO's prompts are scenes of the reinforcement images, which no supervised stage saw.
        Assert.Contains("path: " + Path.Combine(_dir, "run", "data", "rl", "prompts.jsonl"), File.ReadAllText(Path.Combine(_dir, "run", "grpo", "config.resolved.yaml")));
        Assert.Equal(12, File.ReadAllLines(Path.Combine(_dir, "run", "data", "rl", "prompts.jsonl")).Length);
        Assert.Contains(summary.GrpoReward!, md);
        Assert.Null(summary.Stages[0].VersusSft);
        foreach (var st in summary.Stages.Skip(1))
        {
            // The paired column is each stage's per-prompt gain over SFT on the same held-out prompts.
            Assert.Equal(6, st.VersusSft!.Prompts);
            Assert.Equal(st.Eval.PassAt1 - summary.Stages[0].Eval.PassAt1, st.VersusSft.Difference, 12);
        }
        Assert.Contains("Vision alignment (3 steps)", md);
        Assert.Equal(vision.HeldOutDigitAccuracy, summary.VisionDigitAccuracy);
        Assert.True(File.Exists(Path.Combine(_dir, "run", "plots", "effective_ratio.png")));
        Assert.True(File.Exists(Path.Combine(_dir, "run", "eval", "mpo", "eval.md")));
        // Held-out scenes draw only held-out digit images: the datasets record their type; the images come from DigitScenes(HeldOut).
        Assert.Equal(6, File.ReadAllLines(Path.Combine(_dir, "run", "data", "held-out", "prompts.jsonl")).Length);

        // Everything is in place: a rerun loads the results instead of training again, and reports the same numbers.
        var sftWeights = File.GetLastWriteTimeUtc(Path.Combine(_dir, "run", "sft", "final", "model.safetensors"));
        var again = new DigitPipeline(Settings(), fx.Backend).Run();
        Assert.Equal(sftWeights, File.GetLastWriteTimeUtc(Path.Combine(_dir, "run", "sft", "final", "model.safetensors")));
        Assert.Equal(summary.Stages.Select(s => s.Eval.PassAt1), again.Stages.Select(s => s.Eval.PassAt1));
        Assert.Equal(JsonSerializer.Serialize(summary.EffectiveRatioWithBuffer), JsonSerializer.Serialize(again.EffectiveRatioWithBuffer));

        // The run directory remembers its settings: continuing it with others is an error naming them, before anything is touched.
        Assert.Contains("Settings changed from the defaults (--pipeline): ", md);
        Assert.Contains("grpo_steps=2", md);
        var other = Assert.Throws<InvalidOperationException>(() => new DigitPipeline(Settings() with { GrpoSteps = 5 }, fx.Backend).Run());
        Assert.Contains("grpo_steps 2 -> 5", other.Message);
        Assert.Contains(Path.Combine(_dir, "run", PipelineOverrides.FileName), other.Message);
        Assert.Equal(sftWeights, File.GetLastWriteTimeUtc(Path.Combine(_dir, "run", "sft", "final", "model.safetensors")));
    }

    [Fact]
    public void Trend_AveragesTheFirstAndLastQuarter_AtLeastOneStep()
    {
        Assert.Equal((1.5, 7.5), PipelineSummary.Trend([1, 2, 3, 4, 5, 6, 7, 8]));
        Assert.Equal((0.25, 0.75), PipelineSummary.Trend([0.25, 0.5, 0.75]));
        Assert.Equal((0.5, 0.5), PipelineSummary.Trend([0.5]));
        Assert.Throws<ArgumentException>(() => PipelineSummary.Trend([]));
    }

    [Fact]
    public void ARewardModelBelowTheGate_IsLeftOutOfGrpo_AndTheSummarySaysSo()
    {
        var summary = new DigitPipeline(Settings() with { RmMinAccuracy = 1.01, GrpoSteps = 1 }, fx.Backend).Run();
        Assert.NotNull(summary.RewardModelPairAccuracy);
        Assert.StartsWith("GRPO reward: rule + format + 1 x [the answer follows the digits it claims] + 1 x [the share of the scene's digits it reads right] only", summary.GrpoReward);
        Assert.Contains("rm_path: ''", File.ReadAllText(Path.Combine(_dir, "run", "grpo", "config.resolved.yaml")));
        Assert.Contains("below the 1.01 gate", File.ReadAllText(Path.Combine(_dir, "run", "summary.md")));
        Assert.StartsWith("MPO pairs: rule + format (the reward model's held-out pair accuracy", summary.MpoPairs);
        Assert.False(File.Exists(Path.Combine(_dir, "run", "data", "mpo-pairs.jsonl")));
    }

    [Fact]
    public void MpoRounds_SampleTheLaterRoundsPairsFromThePolicy_OnFurtherTrainingPrompts()
    {
        var summary = new DigitPipeline(Settings() with { MpoRounds = 2, GrpoSteps = 1, PairMargin = 0.01 }, fx.Backend).Run();
        Assert.Equal([1, 2], summary.MpoRounds.Select(r => r.Round));
        Assert.Equal(Path.Combine(_dir, "run", "mpo", "round-2", "pairs.jsonl"), summary.MpoRounds[1].Pairs);
        // Round 2's prompts are the 6 training prompts after the pairs' and the reward model's, and its reference is round 1's policy.
        var prompts = File.ReadAllLines(Path.Combine(_dir, "run", "data", "train", "mpo-prompts.jsonl"));
        Assert.Equal(6, prompts.Length);
        Assert.Contains($"model: {Path.Combine(_dir, "run", "mpo", "round-1", "final")}", File.ReadAllText(Path.Combine(_dir, "run", "mpo", "round-2", "config.resolved.yaml")));
        Assert.Contains("MPO round 2: ", File.ReadAllText(Path.Combine(_dir, "run", "summary.md")));
    }
}
