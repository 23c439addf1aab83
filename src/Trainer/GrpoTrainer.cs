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
using R1V2.Native.Trainer.Parallel;
using R1V2.Native.Trainer.Rewards;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer;

/// <summary>One logged GRPO step.</summary>
/// <remarks><see cref="FreshInformativeRatio"/>: the share of the step's sampled rollouts (every round of dynamic
/// sampling) whose task rewards give them a non-zero advantage, the paper's effective-sample curve;
/// <see cref="EffectiveRatio"/>: the share of the intended batch that the update's informative samples fill (after
/// dynamic sampling and the buffer's top-up).</remarks>
public sealed record GrpoStepMetrics(int Step, double Loss, double Reward, double Accuracy, double FormatRate, double ResponseLength, double EffectiveRatio,
    double FreshInformativeRatio, int Replayed, double MeanRatio, double ClippedFraction, double GradNorm, float LearningRate, int SkippedUpdates,
    double? HallucinationRate, double TokensPerSecond, double Seconds, string? Warning, double? RewardModelMean = null, double? RewardModelStd = null, double? Kl = null)
{
    /// <summary>Mean |weighted, transformed reward-model term| added to the rewards: 0 means the reward model changed nothing.</summary>
    public double? RewardModelTerm { get; init; }

    /// <summary>Mean weighted reasoning-check and grounding-check terms (null when their weight is 0).</summary>
    public double? ReasoningTerm { get; init; }
    public double? GroundingTerm { get; init; }

    /// <summary>Share of the update's response tokens held by the dual clip (also counted in <see cref="ClippedFraction"/>).</summary>
    public double DualClippedFraction { get; init; }

    /// <summary>How many rollouts the policy update trained on (fresh and replayed; with a KL loss term the zero-advantage ones too).</summary>
    public int UpdateRollouts { get; init; }

    /// <summary>Dynamic sampling: the sampling rounds this step took and the rollouts past the first round's.</summary>
    public int SamplingRounds { get; init; } = 1;
    public int ExtraRollouts { get; init; }

    /// <summary>With <c>grpo.kl=k1</c>: the mean k1 estimate (log pi_old - log pi_ref summed over a response) of the step's sampled rollouts, before its coefficient.</summary>
    public double? KlPenalty { get; init; }
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
    /// <param name="dataParallel">The ranks this run trains on together: each samples and scores whole prompt groups of
    /// every step's prompts (prompt i on rank i mod R) and keeps its own sample buffer; one process by default.</param>
    public GrpoTrainer(TrainConfig config, Backend backend, Func<string, PromptRow, RewardBreakdown>? reward = null, DataParallel? dataParallel = null)
    {
        _c = config;
        _b = backend;
        _dp = dataParallel ?? DataParallel.Single;
        if (config.Grpo.PromptsPerStep % _dp.Ranks != 0)
            throw new InvalidDataException($"grpo.prompts_per_step is {config.Grpo.PromptsPerStep}: it must be a multiple of the {_dp.Ranks} data-parallel ranks (each rank samples whole prompt groups, the same number)");
        Directory.CreateDirectory(config.Output);
        var resume = RunCheckpoints.Latest(config.Output, cleanup: _dp.Writes);
        if (resume is not null) RunCheckpoints.CheckStage(resume, "grpo");
        var source = resume ?? config.Model;
        var parts = config.TrainableParts();
        _model = VisionLanguageModel.Load(backend, source, parts, tensorParallel: _dp.TensorParallel);
        _dp.SyncWeights(_model.Parameters.All.Select(p => p.Parameter).ToList());
        _model.GradientReady = _dp.GradientReady;   // data parallel: buckets start their sums during the step's last backward
        _base = RunCheckpoints.BaseOf(resume, config.Model, _model.Parameters.All.Where(p => p.Parameter.Trainable).Select(p => p.Name));
        _tokenizer = TextTokenizer.Load(source);
        // Kept in memory: a resumed run's source is a checkpoint directory that pruning later removes.
        _tokenizerJson = File.ReadAllBytes(_tokenizer.Source);
        var g = config.Grpo;
        _chat = new ChatRunner(_model, _tokenizer, new GeneratorOptions(g.CacheBlocks, MaxBatch: Math.Max(g.GroupSize * g.PromptsPerStep / _dp.Ranks, 1)));
        _data = new PromptDataset(config.Data.Path, config.Seed, config.Data.Shuffle, config.Data.SkipBadRows);
        _grounding = new Grounding(config.Monitor.ObjectWords.Concat(_data.ObjectWords),
            config.Monitor.ClaimPattern.Length > 0 ? config.Monitor.ClaimPattern : null);
        var o = config.Optim;
        _opt = new AdamWOptimizer(backend, _model.Parameters.Trainable, new AdamWSettings(o.Lr, o.Beta1, o.Beta2, o.Eps, o.WeightDecay), o.MaxGradNorm, _dp, config.Parallel.ShardOptimizer, _dp.TensorParallel);
        _schedule = config.Schedule();
        _guard = new NonFiniteGuard(config.Optim.MaxSkippedSteps);
        _ssb = new SelectiveSampleBuffer(g.Ssb.Capacity, g.Ssb.MaxAge, (ulong)config.Seed * 0x9E3779B97F4A7C15ul + 1);
        var r = config.Reward;
        // A reward model weighted 0 adds nothing to any reward: it is neither loaded nor run (scoring every rollout costs
        // about as much as the policy update).
        if (r.RmPath.Length > 0 && r.RmWeight != 0) _rewardModel = RewardModel.Load(backend, r.RmPath, TrainableParts.None, trainHead: false, _dp.TensorParallel);
        _reward = RewardFrom(r, withRewardModel: _rewardModel is not null);
        _score = reward ?? ((text, p) => _reward.Score(text, ContextOf(p)));
        _customReward = reward is not null;
        // KL to the reference: k2 and k3 are loss terms; k1 is a reward penalty (as a loss its expected gradient is zero).
        var estimator = g.Kl switch { "k2" => KlEstimator.K2, "k3" => KlEstimator.K3, _ => KlEstimator.None };
        _klLoss = estimator != KlEstimator.None && g.KlCoef != 0;
        _klPenalty = g.Kl == "k1" && g.KlCoef != 0;
        var settings = new GrpoLossSettings(g.EpsLow, g.EpsHigh, g.DualClip, _klLoss ? g.KlCoef : 0, _klLoss ? estimator : KlEstimator.None, g.Temperature);
        if (_klLoss || _klPenalty) _reference = VisionLanguageModel.Load(backend, config.Model, TrainableParts.None, tensorParallel: _dp.TensorParallel); // frozen copy
        _aggregation = g.Aggregation == "token_mean" ? LossAggregation.TokenMean : LossAggregation.SequenceMeanTokenMean;
        _vocabLimit = Math.Min(_tokenizer.VocabularySize, _model.Config.Llm.VocabSize);
        _update = new GrpoUpdate(_model, settings, _aggregation, g.VocabChunk, _vocabLimit);
        _policyStep = new GrpoPolicyStep(_update, _aggregation, g.Minibatches, config.Optim.GradAccum, _dp);
        if (resume is not null) Restore(resume);
        else if (_dp.Writes) RunCheckpoints.RewindMetrics<GrpoStepMetrics>(MetricsPath, 0); // lines a run killed before its first checkpoint logged
        if (_dp.Writes) File.WriteAllText(Path.Combine(config.Output, "config.resolved.yaml"), config.ToYaml());
    }

    private readonly DataParallel _dp;
    private readonly GrpoPolicyStep _policyStep;
    private IReadOnlyList<Engine.Layers.Parameter> Trainable => [.. _model.Parameters.Trainable];

    private readonly bool _customReward, _klLoss, _klPenalty;
    private readonly Checkpoint.BaseReference _base;
    private readonly byte[] _tokenizerJson;
    private readonly LossAggregation _aggregation;
    private readonly int _vocabLimit;

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

    /// <summary>AdamW's state on this rank (masters and moments of its shard when <c>parallel.shard_optimizer</c> is on).</summary>
    public long OptimizerStateBytes => _opt.StateBytes;

    /// <summary>Runs until the configured step count or cancellation (a checkpoint is written on the way out).</summary>
    public void Run(Action<GrpoStepMetrics>? onStep = null, CancellationToken cancel = default)
    {
        bool trained = false;
        while (_step < _c.Steps)
        {
            trained = true;
            var m = RunStep();
            _history.Add(m);
            if (_dp.Writes) File.AppendAllText(MetricsPath, JsonSerializer.Serialize(m) + "\n");
            onStep?.Invoke(m);
            // A stop seen by one rank (its signal came first) stops every rank after the same step.
            bool stop = _dp.Any(cancel.IsCancellationRequested);
            if (_step % _c.Checkpoint.Every == 0 || _step == _c.Steps || stop) SaveCheckpoint();
            if (stop) return;
        }
        bool save = _dp.Any(trained || !Directory.Exists(Path.Combine(_c.Output, "final")));
        var whole = save ? _model.GatherWhole(trainableOnly: false) : null;   // tensor parallel: every rank of the group takes part
        if (save && _dp.Writes) RunCheckpoints.SaveFinal(_c.Output, dir => SaveFinalModel(dir, whole));
        _dp.WaitForWriter();   // rank 0 writes the final model: no time limit
    }

    /// <summary>The run's final model, exported whole in the HF layout (<c>checkpoint.export_dtype</c>, 5 GB shards) with the tokenizer's files.</summary>
    private void SaveFinalModel(string dir, IReadOnlyDictionary<string, float[]>? whole)
    {
        _model.Save(dir, _c.Checkpoint.ExportSafetensorsDType(), whole: whole);
        RunCheckpoints.CopySideFiles(_c.Model, dir);
        File.WriteAllBytes(Path.Combine(dir, "tokenizer.json"), _tokenizerJson);
    }

    /// <summary>One sampling round: G rollouts of each prompt with their rewards and advantages, and what the metrics need.</summary>
    /// <remarks><see cref="TaskInformative"/>: the rollouts whose task rewards give them a non-zero group advantage (the
    /// buffer keeps and dynamic sampling counts these; a k1 penalty alone does not make a group informative).</remarks>
    private sealed record Round(List<Rollout> Rollouts, List<RewardBreakdown> Rewards, int Grounded, int GroundingChecks, double[]? RmScores,
        double? KlPenalty, HashSet<Rollout> TaskInformative);

    private Round SampleRound(int step, int round)
    {
        var g = _c.Grpo;
        // Every rank draws the step's prompts and samples its share of them: prompt i on rank i mod R, whole groups.
        var prompts = _dp.Shard(_data.Next(g.PromptsPerStep), "grpo.prompts_per_step");
        var requests = new List<GenerationRequest>();
        var promptInputs = new List<(int[] Ids, float[]? Pixels, int Tiles)>();
        foreach (var p in prompts)
        {
            var (ids, pixels, tiles) = _chat.Prompt([new ChatTurn("user", p.Question, p.Images)]);
            promptInputs.Add((ids, pixels, tiles));
            ulong seed = (round == 0 ? Seeds.Combine(_c.Seed, step, p.Index) : Seeds.Combine(_c.Seed, step, p.Index, round)) & 0x7fffffffUL;
            requests.Add(new GenerationRequest(ids, pixels, tiles, new SamplingParams(g.Temperature, TopP: g.TopP), seed, g.MaxNewTokens, _chat.StopTokens,
                Samples: g.GroupSize));
        }
        var samples = new Generator(_model, _tokenizer, new GeneratorOptions(g.CacheBlocks, MaxBatch: g.GroupSize * prompts.Count)).Generate(requests);
        var texts = samples.Select(_chat.Text).ToList();
        double[]? rmScores = _rewardModel is null || _customReward ? null : ScoreWithRewardModel(samples, promptInputs);
        // The whole round is scored at once: the reward model's scaling moves between steps, never inside a group.
        var breakdowns = _customReward
            ? samples.Select((x, i) => _score(texts[i], prompts[x.Request])).ToList()
            : [.. _reward.ScoreStep(texts, samples.Select(x => ContextOf(prompts[x.Request])).ToList(), rmScores,
                rmScores is null || _dp.Ranks == 1 ? null : (_dp.Gather(rmScores, g.GroupSize * g.PromptsPerStep, g.GroupSize), i => _dp.GlobalIndex(i, g.GroupSize)))];
        var rollouts = samples.Select((x, i) =>
        {
            var (ids, pixels, tiles) = promptInputs[x.Request];
            return new Rollout(prompts[x.Request].Index, ids, pixels, tiles, x.Tokens, x.LogProbs, breakdowns[i].Total, 0, step);
        }).ToList();
        var rewards = breakdowns.Select(r => r.Total).ToList();
        var taskAdvantages = GrpoMath.Advantages(rewards, g.GroupSize,
            g.Advantage switch { "mean_only" => AdvantageMode.MeanOnly, "leave_one_out" => AdvantageMode.LeaveOneOut, _ => AdvantageMode.MeanStd });
        var advantages = taskAdvantages;
        double? klPenalty = null;
        if (_klPenalty)
        {
            // k1 = log pi_old(y) - log pi_ref(y) on the policy's own samples, a reward penalty (PPO-RLHF; as a loss term its
            // expected gradient is zero), entered into the group advantages (GrpoMath.PenalisedAdvantages).
            // The reference's pass runs in the update's micro-batch sizes (one pass over every rollout would hold all their activations).
            int per = (rollouts.Count + g.Minibatches - 1) / g.Minibatches;
            var reference = rollouts.Chunk(per).SelectMany(ReferenceLogProbs).ToList();
            var k1 = rollouts.Select((r, i) => r.OldLogProbs.Zip(reference[i], (o, f) => (double)o - f).Sum()).ToArray();
            advantages = GrpoMath.PenalisedAdvantages(taskAdvantages, k1, g.KlCoef, g.GroupSize);
            klPenalty = k1.Average();
        }
        rollouts = rollouts.Select((r, i) => r with { Advantage = advantages[i] }).ToList();
        var taskInformative = new HashSet<Rollout>(rollouts.Where((_, i) => Math.Abs(taskAdvantages[i]) > SelectiveSampleBuffer.ZeroAdvantage),
            ReferenceEqualityComparer.Instance);
        int grounded = 0, checks = 0;
        for (int i = 0; i < samples.Count; i++)
            if (_grounding.Check(texts[i], prompts[samples[i].Request]) is { } ok)
            {
                checks++;
                if (ok) grounded++;
            }
        return new Round(rollouts, breakdowns, grounded, checks, rmScores, klPenalty, taskInformative);
    }

    private GrpoStepMetrics RunStep()
    {
        var clock = Stopwatch.StartNew();
        var g = _c.Grpo;
        int step = _step;
        var rounds = new List<Round> { SampleRound(step, 0) };
        bool Informative(Rollout r) => rounds.Any(x => x.TaskInformative.Contains(r));
        List<Rollout> fresh;
        if (g.DynamicSampling.Enabled)
        {
            // DAPO's dynamic sampling: more rounds of prompts until the batch holds prompts_per_step groups whose rewards
            // differ, at most max_rounds rounds; the batch is the informative groups (fewer when the rounds run out).
            // Data parallel: the rounds and the groups kept are decided on every rank's groups in the global order.
            var (groups, _) = DynamicSampling.Fill(round =>
            {
                if (round > 0) rounds.Add(SampleRound(step, round));
                return rounds[round].Rollouts.Chunk(g.GroupSize).Select(c => (IReadOnlyList<Rollout>)c).ToList();
            }, g.PromptsPerStep, g.DynamicSampling.MaxRounds, Informative, _dp);
            fresh = groups.SelectMany(x => x).ToList();
        }
        else fresh = rounds[0].Rollouts;

        // This rank's share of the update batch: its groups' rollouts topped up from its own buffer.
        int target = g.GroupSize * g.PromptsPerStep / _dp.Ranks;
        var batch = g.Ssb.Enabled ? _ssb.Build(fresh, target, step, Informative) : new UpdateBatch(fresh, fresh.Count, 0, target);

        // What the update trains on: the samples with a task advantage and the replayed ones; with a KL term (a k2/k3
        // loss or the k1 penalty) every fresh sample too, a zero-advantage one for its KL term only. Those extra samples
        // get token weights on the scale of the others (GrpoMath.SequenceWeights' counted), so adding them leaves the
        // policy gradient as it was.
        var replayed = batch.Samples.Skip(batch.Fresh).ToList();
        var update = _klLoss || _klPenalty
            ? [.. fresh, .. replayed]
            : batch.Samples.Where(r => Math.Abs(r.Advantage) > SelectiveSampleBuffer.ZeroAdvantage).ToList();
        var freshSet = new HashSet<Rollout>(fresh, ReferenceEqualityComparer.Instance);
        bool Counted(Rollout r) => !freshSet.Contains(r) || Informative(r);

        var lr = _schedule.At(step + 1);
        var policy = _policyStep.Run(update.Where(Counted).ToList(), update.Where(r => !Counted(r)).ToList(), _klLoss ? ReferenceLogProbs : null,
            _opt, () => _guard.Step(_opt, lr, step));
        _step++;

        // The step's figures over every rank's rollouts: sums and counts reduced together, then the means.
        var all = rounds.SelectMany(r => r.Rewards).ToList();
        double[]? rm = rounds.All(r => r.RmScores is not null) ? [.. rounds.SelectMany(r => r.RmScores!)] : null;
        var k1 = _klPenalty ? rounds.Select(r => r.KlPenalty!.Value).ToList() : [];
        var sum = _dp.Sum(all.Count, all.Sum(r => r.Total), all.Sum(r => r.Rule), all.Count(r => r.Format > 0),
            rounds.Sum(r => r.Rollouts.Sum(x => x.Response.Length)), rounds.Sum(r => r.GroundingChecks), rounds.Sum(r => r.Grounded),
            batch.Samples.Count(s => Math.Abs(s.Advantage) > SelectiveSampleBuffer.ZeroAdvantage), batch.TargetSize, rounds.Sum(r => r.TaskInformative.Count),
            batch.Replayed, update.Count, rounds.Skip(1).Sum(r => r.Rollouts.Count), all.Sum(r => r.Reasoning), all.Sum(r => r.Grounding),
            rm?.Sum() ?? 0, rm?.Sum(x => x * x) ?? 0, k1.Sum(), k1.Count, all.Sum(r => Math.Abs(r.RewardModel)));
        double seconds = _dp.Max(clock.Elapsed.TotalSeconds)[0];
        double n = Math.Max(1, sum[0]), tokens = sum[4], checks = sum[5];
        double? halluc = checks == 0 ? null : 1 - sum[6] / checks;
        var metrics = new GrpoStepMetrics(_step, policy.Loss, sum[1] / n, sum[2] / n, sum[3] / n, tokens / n, sum[7] / Math.Max(1, sum[8]), sum[9] / n, (int)sum[10],
            policy.MeanRatio, policy.ClippedFraction, policy.GradNorm, lr, policy.Skipped, halluc, tokens / seconds, seconds, null)
        {
            DualClippedFraction = policy.DualClippedFraction,
            UpdateRollouts = (int)sum[11],
            SamplingRounds = rounds.Count,
            ExtraRollouts = (int)sum[12],
            KlPenalty = _klPenalty ? sum[17] / Math.Max(1, sum[18]) : null,
            Kl = _klLoss && policy.MicroBatches > 0 ? policy.Kl : null,
        };
        if (_c.Reward.ReasoningWeight != 0) metrics = metrics with { ReasoningTerm = sum[13] / n };
        if (_c.Reward.GroundingWeight != 0) metrics = metrics with { GroundingTerm = sum[14] / n };
        if (rm is not null)
        {
            double mean = sum[15] / n;
            metrics = metrics with { RewardModelMean = mean, RewardModelStd = Math.Sqrt(Math.Max(0, sum[16] / n - mean * mean)), RewardModelTerm = sum[19] / n };
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
        var logp = FusedGrpoLoss.TokenLogProbs(_b, pass.Hidden, _reference.LmHead, batch.Targets, _c.Grpo.Temperature, _c.Grpo.VocabChunk, _vocabLimit,
            _reference.TensorParallel);
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

    /// <summary>
    /// A lean checkpoint: the trainable parameters' fp32 masters (frozen tensors stay in the base it names), AdamW
    /// moments, the sample buffer as buffer.bin (prompt references, not pixels), data position, RNG and reward scaling.
    /// </summary>
    /// <remarks>Data parallel: rank 0 writes the weights and state; each rank writes its own buffer
    /// (buffer.rank-NNNNN.bin with its RNG), after checking that every rank's weights are still rank 0's.</remarks>
    public void SaveCheckpoint()
    {
        _dp.CheckSameWeights(Trainable, $"step {_step}");
        var whole = _model.GatherWhole(trainableOnly: true);
        var (rng, items) = _ssb.Snapshot();
        _dp.SaveCheckpoint(_c.Output, _step, _c.Checkpoint.Keep, _opt, tmp =>
        {
            _model.SaveTrainable(tmp, _base, whole: whole);
            File.WriteAllBytes(Path.Combine(tmp, "tokenizer.json"), _tokenizerJson);
            RunCheckpoints.WriteState(tmp, new TrainerState("grpo", _step, _guard.InARow, _data.Position, new JsonObject
            {
                ["ssb_rng"] = rng.ToString(),
                ["rm_scaling"] = new JsonArray(_reward.Scaling.State.Count, _reward.Scaling.State.Mean, _reward.Scaling.State.M2),
                ["data_parallel"] = _dp.Ranks,
            }), _opt);
        }, tmp =>
        {
            BufferFile.Write(Path.Combine(tmp, _dp.OwnFile(BufferFile.Name)), Path.GetFullPath(_c.Data.Path), items);
            if (_dp.Ranks > 1) File.WriteAllText(Path.Combine(tmp, _dp.OwnFile("ssb_rng.txt")), rng.ToString());
        });
    }

    private void Restore(string dir)
    {
        var state = RunCheckpoints.ReadState(dir, _opt);
        _step = state.Step;
        _guard.InARow = state.BadInARow;
        _data.Seek(state.DataPosition);
        int ranks = state.Extra["data_parallel"]?.GetValue<int>() ?? 1;
        if (ranks != _dp.Ranks)
            throw new InvalidDataException($"{dir} was written by {ranks} data-parallel rank(s), each with its own sample buffer; resume it with {ranks} (this launch has {_dp.Ranks})");
        var rngText = _dp.Ranks == 1 ? state.Extra["ssb_rng"]!.GetValue<string>() : File.ReadAllText(Path.Combine(dir, _dp.OwnFile("ssb_rng.txt"))).Trim();
        _ssb.Restore(ulong.Parse(rngText), BufferFile.Read(Path.Combine(dir, _dp.OwnFile(BufferFile.Name)), _c.Data.Path, row =>
        {
            if (row < 0 || row >= _data.Count)
                throw new InvalidDataException($"{Path.Combine(dir, BufferFile.Name)} refers to row {row} of {_c.Data.Path}, which has {_data.Count} rows (the data file changed since the checkpoint)");
            var p = _data.Read(row);
            return _chat.Prompt([new ChatTurn("user", p.Question, p.Images)]);
        }));
        if (state.Extra["rm_scaling"] is JsonArray sc)
            _reward.Scaling.Restore((sc[0]!.GetValue<long>(), sc[1]!.GetValue<double>(), sc[2]!.GetValue<double>()));
        // The writer's log; the other ranks keep no history (the reward-hacking warning is the writer's to print).
        if (_dp.Writes) _history.AddRange(RunCheckpoints.RewindMetrics<GrpoStepMetrics>(MetricsPath, _step));
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
