using System.Text.Json;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Reward-model (Bradley-Terry) and MPO stages on the tiny checkpoint with a learnable preference.</summary>
[Collection("cpu")]
public sealed class PreferenceTrainerTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-pref-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private TrainConfig Config(string stage, int steps, string lr, string? output = null, params string[] extra)
    {
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 8);
        var data = Path.Combine(_dir, "pairs.jsonl");
        // The preferred answer always says yes, the other no: a pattern both stages can learn and apply to held-out rows.
        File.WriteAllLines(data, Enumerable.Range(0, 25).Select(i =>
            JsonSerializer.Serialize(new { prompt = $"Is {i} a number?", chosen = $"yes, {i} is", rejected = $"no, {i} is not" })));
        return TrainConfig.Load(null, [$"stage={stage}", $"model={ckpt}", $"output={output ?? Path.Combine(_dir, stage)}", $"data.path={data}",
            $"steps={steps}", "trainable=all", $"optim.lr={lr}", "pairs.pairs_per_step=4", "pairs.held_out=0.2", "mpo.beta=0.5", .. extra]);
    }

    [Fact]
    public void RewardModel_LearnsThePreference_AndScoresHeldOutPairs()
    {
        using var t = new PreferenceTrainer(Config("rm", 25, "0.003"), fx.Backend);
        var summary = t.Run()!;
        Assert.Equal(5, summary.HeldOutPairs);
        Assert.True(t.History[0].Loss > 0.6, $"initial Bradley-Terry loss {t.History[0].Loss} should be near ln 2 (a zero head)");
        Assert.True(t.History[^1].Loss < 0.2, $"final loss {t.History[^1].Loss}");
        Assert.Equal(1.0, summary.HeldOutAccuracy);
        using var rm = RewardModel.Load(fx.Backend, Path.Combine(_dir, "rm", "final"), TrainableParts.None); // the head round-trips
        Assert.Contains(rm.Weight.Value.ToFloatArray(), w => w != 0);
    }

    [Fact]
    public void Mpo_RaisesTheChosenOverTheRejected_OnHeldOutPairs()
    {
        using var t = new PreferenceTrainer(Config("mpo", 20, "0.002"), fx.Backend);
        var summary = t.Run()!;
        Assert.True(t.History[^1].Loss < t.History[0].Loss, $"loss {t.History[0].Loss} -> {t.History[^1].Loss}");
        Assert.True(t.History[^1].Margin > 1, $"implicit reward margin {t.History[^1].Margin}");
        Assert.Equal(1.0, summary.HeldOutAccuracy);
        Assert.NotEqual(0, t.History[^1].Delta); // BCO's delta follows the implicit rewards
    }

    [Theory]
    [InlineData("rm")]
    [InlineData("mpo")]
    public void Resume_IsBitIdentical_AndCancellationCheckpoints(string stage)
    {
        string[] extra = ["checkpoint.every=2", "checkpoint.keep=2", "optim.schedule=cosine", "optim.warmup=1"];
        var straight = Path.Combine(_dir, stage + "-straight");
        using (var t = new PreferenceTrainer(Config(stage, 6, "0.003", straight, extra), fx.Backend)) Assert.NotNull(t.Run());
        var resumed = Path.Combine(_dir, stage + "-resumed");
        using var cts = new CancellationTokenSource();
        using (var t = new PreferenceTrainer(Config(stage, 6, "0.003", resumed, extra), fx.Backend))
            Assert.Null(t.Run(m => { if (m.Step == 3) cts.Cancel(); }, cts.Token)); // Ctrl-C after step 3: checkpoint, no final model
        Assert.EndsWith("step-000003", RunCheckpoints.Latest(resumed));
        Assert.Equal(2, Directory.GetDirectories(Path.Combine(resumed, "checkpoints")).Length); // keep = 2
        Assert.False(Directory.Exists(Path.Combine(resumed, "final")));
        using (var t = new PreferenceTrainer(Config(stage, 6, "0.003", resumed, extra), fx.Backend))
        {
            Assert.Equal(3, t.Step);
            Assert.NotNull(t.Run());
        }
        PreferenceStepMetrics[] Read(string dir) => File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")).Select(l => JsonSerializer.Deserialize<PreferenceStepMetrics>(l)!).ToArray();
        var a = Read(straight);
        var b = Read(resumed);
        Assert.Equal(6, b.Length);
        Assert.Equal(a.Select(m => m.Loss), b.Select(m => m.Loss));           // bit for bit
        Assert.Equal(a.Select(m => m.GradNorm), b.Select(m => m.GradNorm));
        Assert.Equal(a.Select(m => m.Delta), b.Select(m => m.Delta));
        Assert.Equal(File.ReadAllText(Path.Combine(straight, "summary.json")), File.ReadAllText(Path.Combine(resumed, "summary.json")));
        var files = Report.Write(resumed);
        Assert.Contains(files, f => f.EndsWith("margin.png"));
        Assert.Contains("held-out accuracy", File.ReadAllText(files.Single(f => f.EndsWith("summary.md"))));
    }

    [Fact]
    public void Resume_FromAnotherStagesCheckpoint_IsAClearError()
    {
        var output = Path.Combine(_dir, "mixed");
        using (var t = new PreferenceTrainer(Config("rm", 2, "0.003", output), fx.Backend)) t.Run();
        var e = Assert.Throws<InvalidDataException>(() => new PreferenceTrainer(Config("mpo", 4, "0.003", output), fx.Backend));
        Assert.Contains("stage 'rm'", e.Message);
    }

    [Fact]
    public void IterativeMpo_SamplesEachRoundsPairsFromThePreviousPolicy_AndLogsEveryRound()
    {
        // Two rounds: round 1 on the yes/no pairs, round 2 on pairs sampled from round 1's policy and ranked by rule +
        // format + a reward model's term (a random head: the tiny model's rule and format rewards tie, so the reward
        // model decides), with round 1's policy as the reference.
        var rmDir = Path.Combine(_dir, "rm-random");
        var first = Config("mpo", 6, "0.002", Path.Combine(_dir, "iter"));
        using (var rm = RewardModel.Load(fx.Backend, first.Model, TrainableParts.None, trainHead: false))
        {
            rm.Weight.Value.CopyFrom(TestData.Uniform(4, rm.Weight.Value.Dim(1), 2f));
            rm.Save(rmDir);
        }
        File.Copy(Path.Combine(first.Model, "tokenizer.json"), Path.Combine(rmDir, "tokenizer.json"));
        var prompts = Path.Combine(_dir, "mpo-prompts.jsonl");
        File.WriteAllLines(prompts, Enumerable.Range(0, 12).Select(i => JsonSerializer.Serialize(new { question = $"Is {i} odd?", answer = "yes" })));
        var config = Config("mpo", 6, "0.002", Path.Combine(_dir, "iter"), "mpo.rounds=2", $"mpo.prompts={prompts}", "mpo.samples=4", "mpo.max_new_tokens=6",
            "mpo.margin=0.01", $"mpo.reward_model={rmDir}", "mpo.rm_threshold=0");
        var rounds = new R1V2.Native.Trainer.Mpo.IterativeMpo(config, fx.Backend).Run()!;
        Assert.Equal([1, 2], rounds.Select(r => r.Round));
        Assert.Equal(25, rounds[0].PairCount);
        var sampled = File.ReadAllLines(rounds[1].Pairs);
        Assert.Equal(sampled.Length, rounds[1].PairCount);
        Assert.InRange(sampled.Length, 1, 12);
        Assert.All(sampled, line =>
        {
            var o = JsonSerializer.Deserialize<JsonElement>(line);
            Assert.True(o.GetProperty("chosen_reward").GetDouble() - o.GetProperty("rejected_reward").GetDouble() >= 0.01);
        });
        Assert.All(rounds, r => Assert.NotNull(r.HeldOutAccuracy));
        Assert.Contains($"model: {Path.Combine(_dir, "iter", "round-1", "final")}", File.ReadAllText(Path.Combine(_dir, "iter", "round-2", "config.resolved.yaml")));
        Assert.Equal(2, File.ReadAllLines(Path.Combine(_dir, "iter", "rounds.jsonl")).Length);
        using var last = VisionLanguageModel.Load(fx.Backend, Path.Combine(_dir, "iter", "final"));
        // A rerun finds every round done and changes nothing.
        Assert.Equal(rounds, new R1V2.Native.Trainer.Mpo.IterativeMpo(config, fx.Backend).Run()!);
        Assert.Contains("mpo.rounds > 1 needs stage mpo and mpo.prompts",
            Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["stage=mpo", "mpo.rounds=2"])).Message);
    }
}

/// <summary>GRPO with a KL penalty to a frozen reference and with a trained reward model in the hybrid reward.</summary>
[Collection("cpu")]
public sealed class GrpoWithReferenceTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-grpo-kl-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private TrainConfig Config(string name, params string[] extra)
    {
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 8);
        var data = Path.Combine(_dir, "prompts.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 4).Select(i => JsonSerializer.Serialize(new { question = $"say {i}", answer = $"{i}" })));
        return TrainConfig.Load(null, [$"model={ckpt}", $"output={Path.Combine(_dir, name)}", $"data.path={data}", "steps=2", "trainable=all", "optim.lr=0.003",
            "grpo.group_size=4", "grpo.prompts_per_step=1", "grpo.max_new_tokens=5", "grpo.cache_blocks=32", .. extra]);
    }

    private static R1V2.Native.Trainer.Rewards.RewardBreakdown Letters(string text, R1V2.Native.Trainer.Data.PromptRow _)
    {
        double r = text.Length == 0 ? 0 : text.Count(ch => ch is >= 'a' and <= 'z') / (double)text.Length;
        return new R1V2.Native.Trainer.Rewards.RewardBreakdown(r, 0, 0, 0, r);
    }

    [Fact]
    public void KlToTheReference_IsZeroAtTheStart_AndActsAfterwards()
    {
        List<GrpoStepMetrics> Run(string name, params string[] extra)
        {
            using var t = new GrpoTrainer(Config(name, extra), fx.Backend, Letters);
            t.Run();
            return t.History.ToList();
        }
        var plain = Run("plain");
        var kl = Run("kl", "grpo.kl=k3", "grpo.kl_coef=0.5");
        // Step 1 runs at the reference's own weights: k3 = 0 there, so the losses agree up to float rounding.
        Assert.True(Math.Abs(plain[0].Loss - kl[0].Loss) < 1e-5, $"step 1: {plain[0].Loss} vs {kl[0].Loss}");
        Assert.NotEqual(plain[1].Loss, kl[1].Loss);
        // The logged KL: absent without a reference, ~0 at the reference's weights, positive once the policy moved.
        Assert.All(plain, m => Assert.Null(m.Kl));
        Assert.True(kl[0].Kl is >= 0 and < 1e-5, $"step 1 KL {kl[0].Kl}");
        Assert.True(kl[1].Kl > 1e-6, $"step 2 KL {kl[1].Kl}");
        Assert.Contains(Report.Write(Path.Combine(_dir, "kl")), f => f.EndsWith("kl.png"));
    }

    [Fact]
    public void RewardModelScores_EnterTheHybridReward_AndTheMetrics()
    {
        var rmDir = Path.Combine(_dir, "rm");
        var pairs = Path.Combine(_dir, "pairs.jsonl");
        File.WriteAllLines(pairs, Enumerable.Range(0, 8).Select(i => JsonSerializer.Serialize(new { prompt = $"q{i}", chosen = "yes", rejected = "no" })));
        var rmConfig = TrainConfig.Load(null, ["stage=rm", $"model={Path.Combine(_dir, "tiny")}", $"output={rmDir}", $"data.path={pairs}", "steps=3",
            "trainable=adapter+llm", "pairs.held_out=0", "optim.lr=0.003"]);
        Config("init"); // makes the tiny checkpoint
        using (var rmTrainer = new PreferenceTrainer(rmConfig, fx.Backend)) rmTrainer.Run();
        using var t = new GrpoTrainer(Config("with-rm", $"reward.rm_path={Path.Combine(rmDir, "final")}", "reward.rm_transform=clip", "reward.rm_weight=2"), fx.Backend);
        t.Run();
        Assert.All(t.History, m => Assert.NotNull(m.RewardModelMean));
        Assert.All(t.History, m => Assert.True(m.RewardModelStd > 0, "samples should get different reward-model scores"));

        // Weighted 0 it is not run at all: no scores in the metrics, and the rewards are those of a run without it.
        using var zero = new GrpoTrainer(Config("rm-zero", $"reward.rm_path={Path.Combine(rmDir, "final")}", "reward.rm_weight=0"), fx.Backend);
        zero.Run();
        using var none = new GrpoTrainer(Config("no-rm"), fx.Backend);
        none.Run();
        Assert.All(zero.History, m => Assert.Null(m.RewardModelMean));
        Assert.Equal(none.History.Select(m => m.Reward), zero.History.Select(m => m.Reward));
    }
}

/// <summary>The MPO pair builder and the prompt pre-filter over sampled groups.</summary>
[Collection("cpu")]
public sealed class PromptSamplingTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-sampling-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void PairsAndPrefilter_FromSampledGroups()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 3);
        var data = Path.Combine(_dir, "prompts.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 6).Select(i => JsonSerializer.Serialize(new { question = $"q {i}", answer = "x" })));
        var prompts = new R1V2.Native.Trainer.Data.PromptDataset(data, 0, shuffle: false);
        var rows = Enumerable.Range(0, prompts.Count).Select(prompts.Read).ToList();
        using var model = VisionLanguageModel.Load(fx.Backend, ckpt);
        var tok = R1V2.Native.Engine.Text.TextTokenizer.Load(ckpt);
        // Even prompts: every sample gets 0.5 (no signal); odd prompts: the share of lowercase letters.
        R1V2.Native.Trainer.Rewards.RewardBreakdown Reward(string text, R1V2.Native.Trainer.Data.PromptRow p)
        {
            double r = p.Index % 2 == 0 ? 0.5 : text.Count(ch => ch is >= 'a' and <= 'z') / Math.Max(1.0, text.Length);
            return new(r, 0, 0, 0, r);
        }
        var groups = PromptSampling.Sample(model, tok, rows, 4, new SamplingParams(1f), 6, 5, Reward, cacheBlocks: 64);
        Assert.Equal(6, groups.Count);
        Assert.All(groups, g => Assert.Equal(4, g.Responses.Count));

        var pairs = PromptSampling.Pairs(groups, margin: 0.01);
        Assert.NotEmpty(pairs);
        Assert.All(pairs, p => Assert.True(p.Group.Rewards[p.Chosen].Total - p.Group.Rewards[p.Rejected].Total >= 0.01));
        Assert.DoesNotContain(pairs, p => p.Group.Prompt.Index % 2 == 0);
        var pairsPath = Path.Combine(_dir, "pairs.jsonl");
        PromptSampling.WritePairs(pairsPath, pairs);
        Assert.Equal(pairs.Count, new R1V2.Native.Trainer.Data.PreferenceDataset(pairsPath, 0).Count); // MPO can train on it

        var kept = PromptSampling.WriteInformative(Path.Combine(_dir, "kept.jsonl"), groups);
        Assert.Equal(groups.Count(g => g.Rewards.Select(r => r.Total).Distinct().Count() > 1), kept);
        Assert.True(kept <= 3);
    }

    [Fact]
    public void HybridPairs_AddTheRewardModelsStandardisedTerm_AndItDecidesTiedRuleRewards()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 3);
        using var rm = RewardModel.Load(fx.Backend, ckpt, TrainableParts.None, trainHead: false);
        rm.Weight.Value.CopyFrom(TestData.Uniform(6, rm.Weight.Value.Dim(1), 2f));
        var tok = R1V2.Native.Engine.Text.TextTokenizer.Load(ckpt);
        var row = new R1V2.Native.Trainer.Data.PromptRow(0, "What is 2 + 2?", "4", [], null, null);
        string[] responses = ["so</think>\\boxed{5}", "hm</think>\\boxed{6}", "ok</think>\\boxed{7}", "no</think>\\boxed{8}"]; // all wrong, all well formed
        var group = new SampledGroup(row, responses, responses.Select(r => PromptSampling.RuleAndFormat(r, row)).ToList());
        Assert.Single(group.Rewards.Select(r => r.Total).Distinct());
        Assert.Empty(PromptSampling.Pairs([group], 0.01));                               // rule + format alone: a tie, no pair

        var hybrid = PromptSampling.WithRewardModel([group], rm, tok, 0.5, new R1V2.Native.Trainer.Rewards.RewardModelScaling(
            R1V2.Native.Trainer.Rewards.RewardModelTransform.Standardise, threshold: 0))[0];
        // Independently: each response's score alone, standardised by the four scores, the term above 0 only.
        var chat = new R1V2.Native.Engine.Generation.ChatRunner(rm.Vlm, tok, new R1V2.Native.Engine.Generation.GeneratorOptions(64, MaxBatch: 1));
        var (ids, _, _) = chat.Prompt([new R1V2.Native.Engine.Generation.ChatTurn("user", row.Question, [])]);
        int imEnd = tok.RequireToken("<|im_end|>");
        var alone = responses.Select(r => (double)rm.ScoreSequences([(ids, [.. tok.Encode(r), imEnd], null, 0)])[0]).ToArray();
        double mean = alone.Average(), sd = Math.Sqrt(alone.Sum(x => (x - mean) * (x - mean)) / 3);
        for (int i = 0; i < 4; i++)
        {
            double z = (alone[i] - mean) / (sd + 1e-8), term = z > 0 ? 0.5 * z : 0;
            Assert.Equal(alone[i], hybrid.Rewards[i].RewardModelRaw, 4);
            Assert.Equal(group.Rewards[i].Total + term, hybrid.Rewards[i].Total, 4);
        }
        var pair = Assert.Single(PromptSampling.Pairs([hybrid], 0.01));
        Assert.Equal(Array.IndexOf(alone, alone.Max()), pair.Chosen);                   // the reward model's favourite
    }
}
