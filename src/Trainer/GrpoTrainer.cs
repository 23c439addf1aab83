using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using R1V2.Native.Engine;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Grpo;
using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Rewards;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer;

/// <summary>One logged GRPO step.</summary>
public sealed record GrpoStepMetrics(int Step, double Loss, double Reward, double Accuracy, double FormatRate, double ResponseLength, double EffectiveRatio,
    double FreshInformativeRatio, int Replayed, double MeanRatio, double ClippedFraction, double GradNorm, float LearningRate, int SkippedUpdates,
    double? HallucinationRate, double TokensPerSecond, double Seconds, string? Warning, double? RewardModelMean = null, double? RewardModelStd = null, double? Kl = null)
{
    /// <summary>Mean |weighted, transformed reward-model term| added to the rewards: 0 means the reward model changed nothing.</summary>
    public double? RewardModelTerm { get; init; }

    /// <summary>Mean weighted reasoning-check and grounding-check terms (null when their weight is 0).</summary>
    public double? ReasoningTerm { get; init; }
    public double? GroundingTerm { get; init; }
}

/// <summary>
/// The GRPO stage: each step draws prompts, samples G responses per prompt with the paged generator, scores them with
/// the hybrid reward, turns rewards into group advantages, builds the update batch (Selective Sample Buffer or all
/// rollouts), and runs minibatch updates with the fused loss. Checkpoints every N steps hold the weights, optimiser
/// moments, buffer, data position and counters, written to a temporary directory and renamed; a run resumes from
/// the newest one and, on the CPU backend, continues bit for bit.
/// </summary>
public sealed class GrpoTrainer : IDisposable
{
    private readonly TrainConfig _c;
    private readonly Backend _b;
    private readonly VisionLanguageModel _model;
    private readonly TextTokenizer _tokenizer;
    private readonly ChatRunner _chat;
    private readonly PromptDataset _data;
    private readonly Grounding _grounding;
    private readonly AdamWOptimizer _opt;
    private readonly SelectiveSampleBuffer _ssb;
    private readonly HybridReward _reward;
    private readonly LearningRateSchedule _schedule;
    private readonly GrpoUpdate _update;
    private readonly List<GrpoStepMetrics> _history = [];
    private readonly VisionLanguageModel? _reference;
    private readonly RewardModel? _rewardModel;
    private int _step;
    private readonly NonFiniteGuard _guard;

    private readonly Func<string, PromptRow, RewardBreakdown> _score;

    /// <param name="reward">Scores a response text against its prompt; by default the hybrid reward (rule + format).</param>
    public GrpoTrainer(TrainConfig config, Backend backend, Func<string, PromptRow, RewardBreakdown>? reward = null)
    {
        _c = config;
        _b = backend;
        Directory.CreateDirectory(config.Output);
        var resume = LatestCheckpoint(config.Output);
        if (resume is not null) RunCheckpoints.CheckStage(resume, "grpo");
        var source = resume ?? config.Model;
        var parts = config.TrainableParts();
        _model = VisionLanguageModel.Load(backend, source, parts);
        _tokenizer = TextTokenizer.Load(source);
        var g = config.Grpo;
        _chat = new ChatRunner(_model, _tokenizer, new GeneratorOptions(g.CacheBlocks, MaxBatch: Math.Max(g.GroupSize * g.PromptsPerStep, 1)));
        _data = new PromptDataset(config.Data.Path, config.Seed, config.Data.Shuffle, config.Data.SkipBadRows);
        _grounding = new Grounding(config.Monitor.ObjectWords.Concat(_data.ObjectWords),
            config.Monitor.ClaimPattern.Length > 0 ? config.Monitor.ClaimPattern : null);
        var o = config.Optim;
        _opt = new AdamWOptimizer(backend, _model.Parameters.Trainable, new AdamWSettings(o.Lr, o.Beta1, o.Beta2, o.Eps, o.WeightDecay), o.MaxGradNorm);
        _schedule = config.Schedule();
        _guard = new NonFiniteGuard(config.Optim.MaxBadSteps);
        _ssb = new SelectiveSampleBuffer(g.Ssb.Capacity, g.Ssb.MaxAge, (ulong)config.Seed * 0x9E3779B97F4A7C15ul + 1);
        var r = config.Reward;
        // A reward model weighted 0 adds nothing to any reward: it is neither loaded nor run (scoring every rollout costs
        // about as much as the policy update).
        if (r.RmPath.Length > 0 && r.RmWeight != 0) _rewardModel = RewardModel.Load(backend, r.RmPath, TrainableParts.None, trainHead: false);
        _reward = RewardFrom(r, withRewardModel: _rewardModel is not null);
        _score = reward ?? ((text, p) => _reward.Score(text, ContextOf(p)));
        _customReward = reward is not null;
        var settings = new GrpoLossSettings(g.EpsLow, g.EpsHigh, g.DualClip, g.KlCoef,
            g.Kl switch { "k1" => KlEstimator.K1, "k3" => KlEstimator.K3, _ => KlEstimator.None }, g.Temperature);
        if (settings.Kl != KlEstimator.None) _reference = VisionLanguageModel.Load(backend, config.Model, TrainableParts.None); // frozen copy
        _update = new GrpoUpdate(_model, settings, g.Aggregation == "token_mean" ? LossAggregation.TokenMean : LossAggregation.SequenceMeanTokenMean, g.VocabChunk);
        if (resume is not null) Restore(resume);
        File.WriteAllText(Path.Combine(config.Output, "config.resolved.yaml"), config.ToYaml());
    }

    private readonly bool _customReward;

    /// <summary>The hybrid reward a config asks for: format scores, the reward model's weight and scaling, the rule checks' weights.</summary>
    public static HybridReward RewardFrom(TrainConfig.RewardConfig r, bool withRewardModel)
    {
        var scaling = new RewardModelScaling(r.RmTransform switch { "clip" => RewardModelTransform.Clip, "standardise" => RewardModelTransform.Standardise, _ => RewardModelTransform.Identity },
            -r.RmClip, r.RmClip, r.RmThreshold);
        return new HybridReward(new FormatReward(r.FormatWellFormed, r.FormatEmptyAnswer, r.FormatUnfinished, r.FormatRepeated), withRewardModel ? r.RmWeight : 0, scaling,
            r.ReasoningWeight, r.GroundingWeight, r.GroundingCredit == "per_digit" ? GroundingCredit.Share : GroundingCredit.Exact);
    }

    /// <summary>
    /// A prompt's reward context: its answer and choices and, for rows of a digit question, the reasoning and grounding
    /// checks (they count only where <c>reward.reasoning_weight</c> / <c>reward.grounding_weight</c> are set).
    /// </summary>
    public static RewardContext ContextOf(PromptRow p) => Tasks.DigitScenes.RewardContext(p);

    public int Step => _step;
    public IReadOnlyList<GrpoStepMetrics> History => _history;
    public string MetricsPath => Path.Combine(_c.Output, "metrics.jsonl");

    /// <summary>Runs until the configured step count or cancellation (a checkpoint is written on the way out).</summary>
    public void Run(Action<GrpoStepMetrics>? onStep = null, CancellationToken cancel = default)
    {
        while (_step < _c.Steps)
        {
            var m = RunStep();
            _history.Add(m);
            File.AppendAllText(MetricsPath, JsonSerializer.Serialize(m) + "\n");
            onStep?.Invoke(m);
            if (_step % _c.Checkpoint.Every == 0 || _step == _c.Steps || cancel.IsCancellationRequested) SaveCheckpoint();
            if (cancel.IsCancellationRequested) return;
        }
    }

    private GrpoStepMetrics RunStep()
    {
        var clock = Stopwatch.StartNew();
        var g = _c.Grpo;
        int step = _step;
        var prompts = _data.Next(g.PromptsPerStep);
        var requests = new List<GenerationRequest>();
        var promptInputs = new List<(int[] Ids, float[]? Pixels, int Tiles)>();
        foreach (var p in prompts)
        {
            var (ids, pixels, tiles) = _chat.Prompt([new ChatTurn("user", p.Question, p.Images)]);
            promptInputs.Add((ids, pixels, tiles));
            ulong seed = Seeds.Combine(_c.Seed, step, p.Index) & 0x7fffffffUL;
            requests.Add(new GenerationRequest(ids, pixels, tiles, new SamplingParams(g.Temperature, TopP: g.TopP), seed, g.MaxNewTokens, _chat.StopTokens,
                Samples: g.GroupSize));
        }
        var samples = new Generator(_model, _tokenizer, new GeneratorOptions(g.CacheBlocks, MaxBatch: g.GroupSize * g.PromptsPerStep)).Generate(requests);

        var texts = samples.Select(_chat.Text).ToList();
        double[]? rmScores = _rewardModel is null || _customReward ? null : ScoreWithRewardModel(samples, promptInputs);
        var rollouts = new List<Rollout>();
        var rewards = new List<double>();
        double accuracy = 0, format = 0, length = 0, rmTerm = 0, reasoningTerm = 0, groundingTerm = 0;
        int grounded = 0, groundingChecks = 0, tokens = 0;
        for (int si = 0; si < samples.Count; si++)
        {
            var s = samples[si];
            var p = prompts[s.Request];
            var text = texts[si];
            var r = rmScores is null ? _score(text, p) : _reward.Score(text, ContextOf(p), rmScores[si]);
            rewards.Add(r.Total);
            accuracy += r.Rule;
            rmTerm += Math.Abs(r.RewardModel);
            reasoningTerm += r.Reasoning;
            groundingTerm += r.Grounding;
            format += r.Format > 0 ? 1 : 0;
            length += s.Tokens.Length;
            tokens += s.Tokens.Length;
            if (_grounding.Check(text, p) is { } ok)
            {
                groundingChecks++;
                if (ok) grounded++;
            }
        }
        var advantages = GrpoMath.Advantages(rewards, g.GroupSize,
            g.Advantage switch { "mean_only" => AdvantageMode.MeanOnly, "leave_one_out" => AdvantageMode.LeaveOneOut, _ => AdvantageMode.MeanStd });
        for (int i = 0; i < samples.Count; i++)
        {
            var s = samples[i];
            var (ids, pixels, tiles) = promptInputs[s.Request];
            rollouts.Add(new Rollout(prompts[s.Request].Index, ids, pixels, tiles, s.Tokens, s.LogProbs, rewards[i], advantages[i], step));
        }
        int target = rollouts.Count;
        var batch = g.Ssb.Enabled ? _ssb.Build(rollouts, target, step) : new UpdateBatch(rollouts, rollouts.Count, 0, target);
        double freshRatio = rollouts.Count(r => Math.Abs(r.Advantage) > SelectiveSampleBuffer.ZeroAdvantage) / (double)target;

        double loss = 0, meanRatio = 0, clipped = 0, gradNorm = 0, kl = 0;
        int skipped = 0, updates = 0, optimizerSteps = 0;
        var lr = _schedule.At(step + 1);
        var informative = batch.Samples.Where(r => Math.Abs(r.Advantage) > SelectiveSampleBuffer.ZeroAdvantage).ToList();
        if (informative.Count > 0)
        {
            int per = (informative.Count + g.Minibatches - 1) / g.Minibatches;
            int accumulated = 0;
            for (int mb = 0; mb < informative.Count; mb += per)
            {
                if (accumulated == 0) _opt.ZeroGrad();
                var chunk = informative.Skip(mb).Take(per).ToList();
                var stats = _update.Accumulate(chunk, _reference is null ? null : ReferenceLogProbs(chunk));
                loss += stats.Loss; meanRatio += stats.MeanRatio; clipped += stats.ClippedFraction; kl += stats.Kl ?? 0;
                updates++;
                if (++accumulated < _c.Optim.GradAccum && mb + per < informative.Count) continue;
                accumulated = 0;
                var report = _guard.Step(_opt, lr, step);
                if (report.Skipped) skipped++;
                gradNorm += report.GradNorm;
                optimizerSteps++;
            }
        }
        _step++;
        double n = Math.Max(1, samples.Count), u = Math.Max(1, updates);
        double seconds = clock.Elapsed.TotalSeconds;
        double? halluc = groundingChecks == 0 ? null : 1 - grounded / (double)groundingChecks;
        var metrics = new GrpoStepMetrics(_step, loss / u, rewards.Average(), accuracy / n, format / n, length / n, batch.EffectiveRatio, freshRatio, batch.Replayed,
            meanRatio / u, clipped / u, gradNorm / Math.Max(1, optimizerSteps), lr, skipped, halluc, tokens / seconds, seconds, null);
        if (_reference is not null && updates > 0) metrics = metrics with { Kl = kl / u };
        if (_c.Reward.ReasoningWeight != 0) metrics = metrics with { ReasoningTerm = reasoningTerm / n };
        if (_c.Reward.GroundingWeight != 0) metrics = metrics with { GroundingTerm = groundingTerm / n };
        if (rmScores is not null)
        {
            double mean = rmScores.Average();
            metrics = metrics with { RewardModelMean = mean, RewardModelStd = Math.Sqrt(rmScores.Sum(x => (x - mean) * (x - mean)) / rmScores.Length), RewardModelTerm = rmTerm / n };
        }
        return metrics with { Warning = RewardHackingMonitor.Check(_history.Append(metrics).ToList(), _c.Monitor) };
    }

    /// <summary>
    /// The frozen reference's log-probs of each rollout's response tokens (teacher forced, at the rollouts' sampling
    /// temperature like the policy's), from one packed forward pass.
    /// </summary>
    private List<float[]> ReferenceLogProbs(IReadOnlyList<Rollout> rollouts)
    {
        var (batch, starts) = Rollout.PackShared(rollouts, _reference!.ImageContextId);
        using var pass = _reference.Forward(batch, withLoss: false);
        var logp = FusedGrpoLoss.TokenLogProbs(_b, pass.Hidden, _reference.LmHead, batch.Targets, _c.Grpo.Temperature, _c.Grpo.VocabChunk);
        return rollouts.Select((r, i) => logp[starts[i]..(starts[i] + r.Response.Length)]).ToList();
    }

    /// <summary>
    /// Reward-model scores of every sample (prompt + response + &lt;|im_end|&gt;, the last token's score), in one packed
    /// pass (a group's identical samples share their prompt's arrays, so <see cref="RewardModel.ScoreSequences"/> scores them once).
    /// </summary>
    private double[] ScoreWithRewardModel(IReadOnlyList<GeneratedSample> samples, IReadOnlyList<(int[] Ids, float[]? Pixels, int Tiles)> prompts)
    {
        int imEnd = _tokenizer.RequireToken("<|im_end|>");
        var sequences = samples.Select(s =>
        {
            var (ids, pixels, tiles) = prompts[s.Request];
            var tokens = s.Tokens.Length > 0 && s.Tokens[^1] == imEnd ? s.Tokens : [.. s.Tokens, imEnd];
            return (ids, tokens, pixels, tiles);
        }).ToList();
        return _rewardModel!.ScoreSequences(sequences).Select(x => (double)x).ToArray();
    }

    // ---- checkpoints ---------------------------------------------------------------------------------------------

    public static string? LatestCheckpoint(string output) => RunCheckpoints.Latest(output);

    public void SaveCheckpoint() => RunCheckpoints.Save(_c.Output, _step, _c.Checkpoint.Keep, tmp =>
    {
        _model.Save(tmp);
        File.Copy(_tokenizer.Source, Path.Combine(tmp, "tokenizer.json"));
        var (rng, items) = _ssb.Snapshot();
        RunCheckpoints.WriteState(tmp, new TrainerState("grpo", _step, _guard.InARow, _data.Position, new JsonObject
        {
            ["ssb_rng"] = rng.ToString(),
            ["ssb"] = JsonSerializer.SerializeToNode(items),
            ["rm_scaling"] = new JsonArray(_reward.Scaling.State.Count, _reward.Scaling.State.Mean, _reward.Scaling.State.M2),
        }), _opt);
    });

    private void Restore(string dir)
    {
        var state = RunCheckpoints.ReadState(dir, _opt);
        _step = state.Step;
        _guard.InARow = state.BadInARow;
        _data.Seek(state.DataPosition);
        _ssb.Restore(ulong.Parse(state.Extra["ssb_rng"]!.GetValue<string>()), state.Extra["ssb"].Deserialize<List<Rollout>>()!);
        if (state.Extra["rm_scaling"] is JsonArray sc)
            _reward.Scaling.Restore((sc[0]!.GetValue<long>(), sc[1]!.GetValue<double>(), sc[2]!.GetValue<double>()));
        _history.AddRange(RunCheckpoints.RewindMetrics<GrpoStepMetrics>(MetricsPath, _step));
    }

    public void Dispose()
    {
        _opt.Dispose();
        _model.Dispose();
        _reference?.Dispose();
        _rewardModel?.Dispose();
    }
}

/// <summary>Warns when the reward keeps rising while visual grounding falls (the reward-hacking sign the paper watches).</summary>
public static class RewardHackingMonitor
{
    public static string? Check(IReadOnlyList<GrpoStepMetrics> history, TrainConfig.MonitorConfig c)
    {
        if (history.Count < 2 * c.Window) return null;
        var recent = history.TakeLast(c.Window).ToList();
        var before = history.SkipLast(c.Window).TakeLast(c.Window).ToList();
        if (recent.Any(h => h.HallucinationRate is null) || before.Any(h => h.HallucinationRate is null)) return null;
        double rewardRise = recent.Average(h => h.Reward) - before.Average(h => h.Reward);
        double groundingDrop = before.Average(h => 1 - h.HallucinationRate!.Value) - recent.Average(h => 1 - h.HallucinationRate!.Value);
        return rewardRise >= c.RewardRise && groundingDrop >= c.GroundingDrop
            ? $"reward rose by {rewardRise:F3} over the last {c.Window} steps while grounding fell by {groundingDrop:F3}: possible reward hacking"
            : null;
    }
}
