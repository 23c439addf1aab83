using System.Globalization;
using System.Text;
using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Mpo;
using R1V2.Native.Trainer.Parallel;
using R1V2.Native.Trainer.Rewards;
using R1V2.Native.Trainer.Tasks;

namespace R1V2.Native.Trainer.Pipeline;

/// <summary>
/// The budget of the default pipeline. The defaults are sized for 2 CPU cores; every stage's steps and batch can be
/// changed (tests run it at a few steps per stage).
/// </summary>
public sealed record PipelineSettings
{
    public string Output { get; init; } = "runs/digits";
    public int Seed { get; init; } = 1;
    /// <summary>Model config (InternVL layout); null: the built-in configs/digits.json.</summary>
    public string? ModelConfig { get; init; }
    public int TrainScenes { get; init; } = 3000;
    /// <summary>
    /// Held-out scenes (of the 3000 held-out MNIST images, each used by about 1.7 scenes): 2000 x 4 samples put the
    /// paired standard error of a stage's difference from SFT near 0.007 (0.013 with 500 scenes, 0.02-0.03 with 200).
    /// </summary>
    public int HeldOutScenes { get; init; } = 2000;
    /// <summary>GRPO's prompts: scenes of the reinforcement digit images, which no supervised stage sees (each GRPO run draws 64 a step).</summary>
    public int RlScenes { get; init; } = 8000;
    /// <summary>
    /// Language warm-up steps (the stand-in for a pretrained LLM): at 150 steps the decoder could not yet copy a digit
    /// list or test membership (given the digits as text: 0.43 pass@1, "is d present" at chance); 1000 steps at
    /// <see cref="SftLr"/> reach 0.76 but still count at chance and add two digits right 0.22 of the time; 3000 steps
    /// reach 0.90 (counts 0.68-1.00, two-digit sums 0.88; the loss falls after step 1000) and lift SFT on validation
    /// scenes from 0.535 to 0.594 with seed 1 and from 0.446 to 0.600 with seed 2, for about 150 s more on 2 cores.
    /// </summary>
    public int WarmupSteps { get; init; } = 3000;
    public int VisionSteps { get; init; } = 200;
    public int VisionBatch { get; init; } = 32;
    public float VisionLr { get; init; } = 3e-3f;
    public int SftSteps { get; init; } = 600;
    public int SftBatch { get; init; } = 16;
    /// <summary>Peak learning rate of the warm-up and SFT (cosine): at 3e-3 the warm-up's membership test stayed at chance for 2000 steps.</summary>
    public float SftLr { get; init; } = 1e-3f;
    public int PairPrompts { get; init; } = 96;
    public int PairSamples { get; init; } = 4;
    public double PairMargin { get; init; } = 0.5;
    public int RmSteps { get; init; } = 160;
    /// <summary>Reference-vs-wrong-trace pairs added to the sampled ones for the reward model (not for MPO).</summary>
    public int RmSyntheticPairs { get; init; } = 640;
    /// <summary>
    /// The reward model's learning rate: from the SFT model of the 1000-step warm-up, 3e-4 reached held-out pair
    /// accuracy 0.570 in 160 steps (0.528 in 480), 1e-4 reached 0.697 (1e-3 learned nothing from a weaker model).
    /// </summary>
    public float RmLr { get; init; } = 1e-4f;
    public int MpoSteps { get; init; } = 40;
    public int PairsPerStep { get; init; } = 8;
    /// <summary>MPO's learning rate: 2e-4 (tuned for a weaker SFT model) cost the SFT model of 1000 warm-up steps 0.145 on validation; 2e-5 keeps it.</summary>
    public float PreferenceLr { get; init; } = 2e-5f;
    /// <summary>
    /// Steps of each GRPO run (with and without the buffer), sized so that a fresh clone finishes in about 8.5 minutes
    /// on 2 CPU cores, within the 10 with margin (80 steps took 8 min 53 s). What GRPO gains grows with its rollouts, not its steps: with 16 rollouts a
    /// step it drifted (held-out -0.015 after 100 steps), with 512 a step validation rose through 120 steps (+0.049 at
    /// 61k rollouts), and 256 a step for 120 steps gained what 512 for 60 did
    /// (perf/results/grpo-controls-digits-cpu-2core-20261130.md, grpo-budget-digits-cpu-2core-20261130.md).
    /// </summary>
    public int GrpoSteps { get; init; } = 72;
    /// <summary>Prompts per GRPO step, each sampled <see cref="GroupSize"/> times: 512 rollouts a step keep the update's noise
    /// from moving the digit-reading prior (with 64 a step misreads drifted to "3").</summary>
    public int GrpoPrompts { get; init; } = 64;
    public int GroupSize { get; init; } = 8;
    /// <summary>GRPO's learning rate with 512 rollouts a step (2e-4 and 3e-4 gained less or lost on validation).</summary>
    public float GrpoLr { get; init; } = 1e-4f;
    /// <summary>Rollout sampling temperature of GRPO (the held-out evaluation samples at 0.6, top-p 0.95).</summary>
    public float GrpoTemperature { get; init; } = 0.6f;
    public float GrpoTopP { get; init; } = 0.95f;
    /// <summary>mean_std (the paper), mean_only (Dr.GRPO) or leave_one_out.</summary>
    public string GrpoAdvantage { get; init; } = "mean_std";
    /// <summary>What GRPO trains: adapter+llm, adapter (the paper's best), adapter+vit or all.</summary>
    public string GrpoTrainable { get; init; } = "adapter+llm";
    /// <summary>
    /// Weight in GRPO's reward of the rule check that the answer follows from the digits the response claims: it keeps
    /// answers tied to the reading (sum answers following it 0.58 with it, 0.44 without).
    /// </summary>
    public double ReasoningWeight { get; init; } = 1;
    /// <summary>Weight in GRPO's reward of the rule check that the digits the response claims are the scene's.</summary>
    public double GroundingWeight { get; init; } = 1;
    /// <summary>
    /// exact (all digits read right or nothing) or per_digit (the share read right; see reward.grounding_credit). On
    /// validation after 20 / 40 / 60 steps: exact +0.017 / +0.023 / +0.028 over SFT, per_digit +0.027 / +0.024 / +0.036.
    /// </summary>
    public string GroundingCredit { get; init; } = "per_digit";
    /// <summary>Weight of the standardised reward-model score in the hybrid reward (0: rule + format only).</summary>
    public double RmWeight { get; init; } = 0.25;
    /// <summary>The reward model joins GRPO's reward only when its held-out pair accuracy reaches this.</summary>
    public double RmMinAccuracy { get; init; } = 0.6;
    /// <summary>
    /// The reward-model term counts only for responses it scores this many standard deviations above its running mean
    /// (about one sample in six), so groups whose rule rewards tie mostly keep zero advantage and the buffer compares
    /// with GRPO without it; with no threshold every group had a spread and both runs were identical.
    /// </summary>
    public double RmThreshold { get; init; } = 1.0;
    /// <summary>
    /// Rounds of iterative MPO: round 1 trains on the SFT model's pairs, each later round on pairs sampled from the
    /// previous round's policy (PairPrompts further training prompts x PairSamples, ranked like round 1's).
    /// </summary>
    public int MpoRounds { get; init; } = 1;
    public int MaxNewTokens { get; init; } = 40;
    /// <summary>
    /// Share of the training traces (warm-up and SFT) that work through the digits one at a time
    /// (<see cref="DigitTaskItem.Worked"/>). At 0.5 the SFT model fell from 0.535 to 0.43 on validation scenes (the
    /// decoder learns neither form's checks as well as one form's), and GRPO then moved the share of worked answers
    /// from about 0.53 to 0.8-0.9, gaining 0.03-0.04 over that weaker model; so the default is 0.
    /// </summary>
    public double WorkedTraces { get; init; }
    /// <summary>Samples per held-out prompt: pass@1 is their mean (temperature 0.6, top-p 0.95; 1 sample: greedy).</summary>
    public int EvalSamples { get; init; } = 4;
}

/// <summary>One evaluated stage of the pipeline.</summary>
public sealed record StageResult(string Stage, string Model, EvalResult Eval)
{
    /// <summary>pass@1 minus the SFT model's on the same held-out prompts, with its paired standard error (null for SFT itself).</summary>
    public PairedDifference? VersusSft { get; init; }
}


/// <summary>What the pipeline measured: every stage's held-out evaluation, the reward model's pair accuracy, both GRPO runs.</summary>
public sealed record PipelineSummary(IReadOnlyList<StageResult> Stages, double? RewardModelPairAccuracy, int Pairs, double Seconds,
    IReadOnlyList<double> EffectiveRatioWithBuffer, IReadOnlyList<double> EffectiveRatioWithoutBuffer)
{
    /// <summary>Vision alignment on held-out scenes: the share of image tokens over a digit whose digit the probe names.</summary>
    public double? VisionDigitAccuracy { get; init; }

    /// <summary>How many held-out pairs the reward model's accuracy is measured on.</summary>
    public int RewardModelHeldOutPairs { get; init; }

    /// <summary>What GRPO's reward was made of in this run, and why.</summary>
    public string? GrpoReward { get; init; }

    /// <summary>How MPO's pairs were ranked (rule + format, or with the reward model's term), and each round's pairs and held-out accuracy.</summary>
    public string? MpoPairs { get; init; }
    public IReadOnlyList<Mpo.MpoRound> MpoRounds { get; init; } = [];

    /// <summary>GRPO's accuracy on its own training prompts, step by step, with the buffer and without.</summary>
    public IReadOnlyList<double> TrainAccuracyWithBuffer { get; init; } = [];
    public IReadOnlyList<double> TrainAccuracyWithoutBuffer { get; init; } = [];

    /// <summary>
    /// The share of each step's fresh rollouts with non-zero advantage (the paper's effective-sample curve), beside
    /// <see cref="EffectiveRatioWithBuffer"/>, the share after the buffer's top-up.
    /// </summary>
    public IReadOnlyList<double> FreshInformativeWithBuffer { get; init; } = [];
    public IReadOnlyList<double> FreshInformativeWithoutBuffer { get; init; } = [];

    /// <summary>GRPO's mean training reward step by step.</summary>
    public IReadOnlyList<double> TrainRewardWithBuffer { get; init; } = [];
    public IReadOnlyList<double> TrainRewardWithoutBuffer { get; init; } = [];

    /// <summary>
    /// Mean of the first and of the last quarter (at least one step) of a per-step series: how far GRPO moved on its
    /// own training prompts, to set beside its held-out change.
    /// </summary>
    public static (double First, double Last) Trend(IReadOnlyList<double> perStep)
    {
        if (perStep.Count == 0) throw new ArgumentException("a trend needs at least one step");
        int n = Math.Max(1, perStep.Count / 4);
        return (perStep.Take(n).Average(), perStep.TakeLast(n).Average());
    }
}

/// <summary>
/// The default `engine train`: the R1V2 recipe end to end on the digit task. Data: scenes composed from the training
/// split of the MNIST subset for training, from the held-out split for evaluation. Model: configs/digits.json with a
/// tokenizer learned from the training traces. Stages: SFT warm start on templated traces; pairs sampled from the SFT
/// model and scored by the rule + format reward; a reward model on them; MPO; then GRPO from the MPO model with the
/// hybrid reward (rule + format + reward model) with the Selective Sample Buffer, and the same GRPO without it. Each
/// stage is evaluated on the held-out scenes; the run directory holds every stage's run, the evaluations, plots and
/// summary.md. A stage whose output exists is not run again, so an interrupted pipeline continues where it stopped.
/// </summary>
/// <para>Under mpirun the GRPO stages run data-parallel on every rank; rank 0 alone prepares the data, trains the
/// earlier stages, evaluates and writes the report while the other ranks wait.</para>
public sealed class DigitPipeline(PipelineSettings s, Backend backend, Action<string>? log = null, DataParallel? dataParallel = null)
{
    private readonly Action<string> _log = log ?? (_ => { });
    private readonly DataParallel _dp = dataParallel ?? DataParallel.Single;

    private string Dir(params string[] parts) => Path.Combine([s.Output, .. parts]);

    /// <summary>
    /// A rank other than 0: waits while rank 0 prepares everything GRPO starts from, trains both GRPO runs with it,
    /// then waits for its report.
    /// </summary>
    public void Follow(CancellationToken cancel = default)
    {
        _dp.WaitForWriter();
        var model = _dp.Broadcast(null);
        if (model.Length == 0) throw new OperationCanceledException("rank 0 stopped before GRPO");   // its stop sentinel
        var rm = _dp.Broadcast(null);
        RunGrpo("grpo", model, rm.Length > 0 ? rm : null, buffer: true, null, cancel);
        RunGrpo("grpo-no-ssb", model, rm.Length > 0 ? rm : null, buffer: false, null, cancel);
        _dp.WaitForWriter();
    }

    /// <summary>The pipeline on rank 0 (or the one process); the other ranks run <see cref="Follow"/>.</summary>
    public PipelineSummary Run(Action<string, double>? progress = null, CancellationToken cancel = default)
    {
        if (!_dp.Writes) throw new InvalidOperationException($"rank {_dp.Rank} runs DigitPipeline.Follow: rank 0 runs the pipeline");
        try { return RunAll(progress, cancel); }
        catch (OperationCanceledException) when (_dp.Ranks > 1 && !_followersReleased)
        {
            // Stopped in a stage rank 0 runs alone: the other ranks, waiting for GRPO, get the stop sentinel.
            _dp.WaitForWriter();
            _dp.Broadcast("");
            throw;
        }
    }

    private bool _followersReleased;

    private PipelineSummary RunAll(Action<string, double>? progress, CancellationToken cancel)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        PipelineOverrides.Validate(s);
        PipelineOverrides.Remember(s, s.Output);
        // 1. Data.
        var configText = s.ModelConfig is null ? BuiltInConfig() : File.ReadAllText(s.ModelConfig);
        var configPath = Dir("model-config.json");
        File.WriteAllText(configPath, configText);
        var vlm = VlmConfig.Load(configPath);
        int canvas = vlm.ForceImageSize;
        var digits = MnistDigits.Embedded();
        if (!File.Exists(Dir("data", "train", "sft.jsonl")))
            new DigitScenes(digits, DigitSplit.Train, canvas).WriteDataset(Dir("data", "train"), s.TrainScenes, s.Seed, s.WorkedTraces);
        if (!File.Exists(Dir("data", "rl", "prompts.jsonl")))
            new DigitScenes(digits, DigitSplit.Reinforcement, canvas).WriteDataset(Dir("data", "rl"), s.RlScenes, s.Seed + 2_000_003);
        if (!File.Exists(Dir("data", "held-out", "prompts.jsonl")))
            new DigitScenes(digits, DigitSplit.HeldOut, canvas).WriteDataset(Dir("data", "held-out"), s.HeldOutScenes, s.Seed + 1_000_003);
        _log($"data: {s.TrainScenes} training scenes, {s.RlScenes} GRPO scenes on their own digit images, {s.HeldOutScenes} held-out scenes (held-out digit images never used in training)");

        // 2. Model and tokenizer.
        var init = Dir("init");
        if (!File.Exists(Path.Combine(init, "model.safetensors")))
            ModelFactory.Init(configPath, init, s.Seed, Dir("data", "train", "text-sft.jsonl"));

        var stages = new List<StageResult>();
        // 3. Language warm-up: the decoder learns the traces with the digits given as text (the role of a pretrained LLM).
        if (s.WarmupSteps > 0)
        {
            var warmOut = Dir("warmup");
            if (!Directory.Exists(Path.Combine(warmOut, "final")))
            {
                using var warm = new SftTrainer(Stage("sft", init, warmOut, Dir("data", "train", "text-sft.jsonl"), s.WarmupSteps,
                    SftOverrides()), backend);
                if (warm.Run(m => progress?.Invoke("warmup", m.Step / (double)s.WarmupSteps), cancel) is null) throw new OperationCanceledException("interrupted during the warm-up");
            }
            init = Path.Combine(warmOut, "final");
        }
        // 4. Vision alignment: the ViT and adapter learn to hand the decoder each cell's digit as the embedding of its word.
        var visionOut = Dir("vision");
        VisionPretrainResult? vision = null;
        if (s.VisionSteps > 0)
        {
            if (!Directory.Exists(Path.Combine(visionOut, "final")))
            {
                using var vlmInit = VisionLanguageModel.Load(backend, init, TrainableParts.AdapterAndVit);
                vision = VisionPretraining.Run(vlmInit, new DigitScenes(digits, DigitSplit.Train, canvas), new DigitScenes(digits, DigitSplit.HeldOut, canvas),
                    new VisionPretrainSettings(s.VisionSteps, s.VisionBatch, s.VisionLr, s.Seed), DigitProbeRows(vlmInit, TextTokenizer.Load(init), s.Seed),
                    (step, _) => progress?.Invoke("vision", step / (double)s.VisionSteps), cancel);
                if (cancel.IsCancellationRequested) throw new OperationCanceledException("interrupted during vision pretraining");
                Directory.CreateDirectory(visionOut);
                File.WriteAllText(Path.Combine(visionOut, "summary.json"), JsonSerializer.Serialize(vision, new JsonSerializerOptions { WriteIndented = true }));
                RunCheckpoints.SaveFinal(visionOut, dir =>
                {
                    vlmInit.Save(dir);
                    foreach (var f in Directory.GetFiles(init, "tokenizer*.json")) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
                });
            }
            else vision = JsonSerializer.Deserialize<VisionPretrainResult>(File.ReadAllText(Path.Combine(visionOut, "summary.json")));
            _log(string.Format(CultureInfo.InvariantCulture, "vision: {0} steps; held-out cells read right {1:F3} (cells with a digit {2:F3})",
                s.VisionSteps, vision!.HeldOutTokenAccuracy, vision.HeldOutDigitAccuracy));
            init = Path.Combine(visionOut, "final");
        }

        // 5. SFT.
        var sftOut = Dir("sft");
        if (!Directory.Exists(Path.Combine(sftOut, "final")))
        {
            using var sft = new SftTrainer(Stage("sft", init, sftOut, Dir("data", "train", "sft.jsonl"), s.SftSteps,
                SftOverrides()), backend);
            if (sft.Run(m => progress?.Invoke("sft", m.Step / (double)s.SftSteps), cancel) is null) throw new OperationCanceledException("interrupted during sft");
        }
        var sftModel = Path.Combine(sftOut, "final");
        stages.Add(Evaluate("sft", sftModel));

        // 6. Preference pairs from the SFT model, scored by rule + format.
        var pairsPath = Dir("data", "pairs.jsonl");
        if (!File.Exists(pairsPath) || !File.Exists(RmPairsPath)) BuildPairs(sftModel, pairsPath);
        int pairs = File.ReadAllLines(pairsPath).Length;
        _log($"pairs: {pairs} from {s.PairPrompts} prompts x ({s.PairSamples} samples + the reference trace), margin {s.PairMargin}");

        double? rmAccuracy = null;
        int rmHeldOutPairs = 0;
        string? rmModel = null;
        string mpoModel = sftModel;
        string? mpoPairSignal = null;
        List<MpoRound> mpoRounds = [];
        if (pairs >= 4)
        {
            // 7. Reward model.
            var rmOut = Dir("rm");
            if (!Directory.Exists(Path.Combine(rmOut, "final")))
            {
                using var rm = new PreferenceTrainer(Stage("rm", sftModel, rmOut, RmPairsPath, s.RmSteps, PreferenceOverrides(s.RmLr)), backend);
                if (rm.Run(m => progress?.Invoke("rm", m.Step / (double)s.RmSteps), cancel) is null) throw new OperationCanceledException("interrupted during rm");
            }
            rmModel = Path.Combine(rmOut, "final");
            var rmSummary = JsonSerializer.Deserialize<PreferenceSummary>(File.ReadAllText(Path.Combine(rmOut, "summary.json")))!;
            rmAccuracy = rmSummary.HeldOutAccuracy;
            rmHeldOutPairs = rmSummary.HeldOutPairs;
            // 8. MPO, on pairs ranked by the paper's hybrid signal once the reward model passes its gate: rule + format +
            // its weighted, standardised term (the same candidates, re-ranked); else by rule + format.
            bool rmPasses = rmAccuracy >= s.RmMinAccuracy && s.RmWeight > 0;
            var mpoPairs = rmPasses ? Dir("data", "mpo-pairs.jsonl") : pairsPath;
            if (rmPasses && !File.Exists(mpoPairs)) HybridPairs(sftModel, rmModel, mpoPairs);
            mpoPairSignal = rmPasses
                ? string.Format(CultureInfo.InvariantCulture, "MPO pairs: rule + format + {0} x the reward model's term, {1} ({2} pairs, the reward model's held-out pair accuracy {3:F3} passes the {4:F2} gate).",
                    s.RmWeight, Scaling().Describe(), File.ReadLines(mpoPairs).Count(), rmAccuracy, s.RmMinAccuracy)
                : string.Format(CultureInfo.InvariantCulture, "MPO pairs: rule + format (the reward model's held-out pair accuracy {0:F3} is below the {1:F2} gate).", rmAccuracy, s.RmMinAccuracy);
            _log(mpoPairSignal);
            var mpoOut = Dir("mpo");
            if (!Directory.Exists(Path.Combine(mpoOut, "final")))
            {
                string[] rounds = s.MpoRounds > 1
                    ? [$"mpo.rounds={s.MpoRounds}", $"mpo.prompts={MpoPrompts()}", $"mpo.samples={s.PairSamples}", $"mpo.max_new_tokens={s.MaxNewTokens}",
                       string.Create(CultureInfo.InvariantCulture, $"mpo.margin={s.PairMargin}"), .. rmPasses ? new[] { $"mpo.reward_model={rmModel}",
                       string.Create(CultureInfo.InvariantCulture, $"mpo.rm_weight={s.RmWeight}"), string.Create(CultureInfo.InvariantCulture, $"mpo.rm_threshold={s.RmThreshold}") } : []]
                    : [];
                var mpo = new IterativeMpo(Stage("mpo", sftModel, mpoOut, mpoPairs, s.MpoSteps, [.. PreferenceOverrides(), .. rounds]), backend);
                if (mpo.Run((round, m) => progress?.Invoke("mpo", ((round - 1) * s.MpoSteps + m.Step) / (double)(s.MpoRounds * s.MpoSteps)), _log, cancel) is null)
                    throw new OperationCanceledException("interrupted during mpo");
            }
            mpoRounds = File.ReadAllLines(Path.Combine(mpoOut, "rounds.jsonl")).Select(l => JsonSerializer.Deserialize<MpoRound>(l)!).ToList();
            mpoModel = Path.Combine(mpoOut, "final");
            stages.Add(Evaluate("mpo", mpoModel));
        }
        else _log($"only {pairs} pairs passed the margin: the reward model and MPO are skipped, GRPO starts from the SFT model");

        // 9. GRPO with and without the Selective Sample Buffer, same seed and budget.
        // The reward model enters GRPO's hybrid reward only when it ranks held-out pairs better than the gate: a reward
        // model near chance gives the policy nothing to learn but a target to game (reward rises, accuracy falls).
        string? grpoRm = rmModel is not null && rmAccuracy >= s.RmMinAccuracy && s.RmWeight > 0 ? rmModel : null;
        string ruleTerms = "rule + format"
            + (s.ReasoningWeight != 0 ? string.Format(CultureInfo.InvariantCulture, " + {0} x [the answer follows the digits it claims]", s.ReasoningWeight) : "")
            + (s.GroundingWeight != 0 ? string.Format(CultureInfo.InvariantCulture, " + {0} x {1}", s.GroundingWeight,
                s.GroundingCredit == "per_digit" ? "[the share of the scene's digits it reads right]" : "[it reads the scene's digits exactly]") : "");
        string rewardNote = grpoRm is not null
            ? string.Format(CultureInfo.InvariantCulture, "GRPO reward: {5} + {0} x the standardised reward-model score where it exceeds {3} standard deviation{4}, {6} (its held-out pair accuracy {1:F3} passes the {2:F2} gate).", s.RmWeight, rmAccuracy, s.RmMinAccuracy, s.RmThreshold,
                s.RmThreshold == 1 ? "" : "s", ruleTerms, Scaling().Describe())
            : rmModel is null ? $"GRPO reward: {ruleTerms} (no reward model was trained)."
            : string.Format(CultureInfo.InvariantCulture, "GRPO reward: {2} only: the reward model's held-out pair accuracy {0:F3} is below the {1:F2} gate (PipelineSettings.RmMinAccuracy), so its score is left out.", rmAccuracy, s.RmMinAccuracy, ruleTerms);
        _log(rewardNote);
        if (_dp.Ranks > 1)
        {
            _log($"GRPO runs data-parallel on {_dp.Ranks} ranks");
            _dp.WaitForWriter();
            _followersReleased = true;
            _dp.Broadcast(mpoModel);
            _dp.Broadcast(grpoRm ?? "");
        }
        var with = RunGrpo("grpo", mpoModel, grpoRm, buffer: true, progress, cancel);
        var without = RunGrpo("grpo-no-ssb", mpoModel, grpoRm, buffer: false, progress, cancel);
        stages.Add(Evaluate("grpo", with.Model));
        stages.Add(Evaluate("grpo-no-ssb", without.Model));

        var sftSamples = Evaluation.ReadSamples(Dir("eval", "sft", "samples.jsonl"));
        stages = stages.Select(st => st.Stage == "sft" ? st : st with
        {
            VersusSft = Evaluation.PairedDifference(sftSamples, Evaluation.ReadSamples(Dir("eval", st.Stage, "samples.jsonl"))),
        }).ToList();
        var summary = new PipelineSummary(stages, rmAccuracy, pairs, clock.Elapsed.TotalSeconds,
            [.. with.Steps.Select(m => m.EffectiveRatio)], [.. without.Steps.Select(m => m.EffectiveRatio)])
        {
            VisionDigitAccuracy = vision?.HeldOutDigitAccuracy, GrpoReward = rewardNote, RewardModelHeldOutPairs = rmHeldOutPairs,
            MpoPairs = mpoPairSignal, MpoRounds = mpoRounds,
            TrainAccuracyWithBuffer = [.. with.Steps.Select(m => m.Accuracy)], TrainAccuracyWithoutBuffer = [.. without.Steps.Select(m => m.Accuracy)],
            FreshInformativeWithBuffer = [.. with.Steps.Select(m => m.FreshInformativeRatio)], FreshInformativeWithoutBuffer = [.. without.Steps.Select(m => m.FreshInformativeRatio)],
            TrainRewardWithBuffer = [.. with.Steps.Select(m => m.Reward)], TrainRewardWithoutBuffer = [.. without.Steps.Select(m => m.Reward)],
        };
        File.WriteAllText(Dir("summary.json"), JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true }));
        WriteSummary(summary);
        if (_dp.Ranks > 1) _dp.WaitForWriter();
        return summary;
    }

    /// <summary>
    /// The probe of vision pretraining: the LLM's input embeddings of the tokens "0" to "9" and, for an empty cell, a
    /// random vector at their scale, so the adapter learns to hand the LLM each digit as the embedding of its word.
    /// </summary>
    private static float[] DigitProbeRows(VisionLanguageModel model, TextTokenizer tokenizer, int seed)
    {
        var embed = model.Parameters["language_model.model.embed_tokens.weight"].Value.ToFloatArray();
        int d = model.Config.Llm.HiddenSize;
        var rows = new float[VisionPretraining.Classes * d];
        for (int digit = 0; digit < 10; digit++)
        {
            var ids = tokenizer.Encode(digit.ToString(CultureInfo.InvariantCulture));
            if (ids.Length != 1) throw new InvalidOperationException($"the tokenizer splits \"{digit}\" into {ids.Length} tokens");
            Array.Copy(embed, (long)ids[0] * d, rows, digit * d, d);
        }
        var rng = new Random(Engine.Seeds.ForRandom(seed, Engine.Seeds.Hash("vision_probe_empty")));
        double scale = Math.Sqrt(rows.Take(10 * d).Average(x => (double)x * x)); // the digit rows' scale (only directions matter to the probe)
        for (int i = 0; i < d; i++) rows[VisionPretraining.Empty * d + i] = (float)((rng.NextDouble() * 2 - 1) * Math.Sqrt(3) * scale);
        return rows;
    }

    private string[] SftOverrides() =>
        [$"sft.batch={s.SftBatch}", $"optim.lr={s.SftLr.ToString(CultureInfo.InvariantCulture)}", "optim.warmup=10", "optim.schedule=cosine", "sft.held_out=0.02"];

    private string CandidatesPath => Dir("data", "pair-candidates.jsonl");

    private RewardModelScaling Scaling() => new(RewardModelTransform.Standardise, threshold: s.RmThreshold);

    /// <summary>Each pair prompt's candidates (the SFT model's samples and the reference trace) with their rule + format rewards.</summary>
    private static void WriteCandidates(string path, IEnumerable<SampledGroup> groups) =>
        File.WriteAllLines(path, groups.Select(g => JsonSerializer.Serialize(new
        {
            prompt = g.Prompt.Index, responses = g.Responses,
            rule = g.Rewards.Select(r => r.Rule), format = g.Rewards.Select(r => r.Format), total = g.Rewards.Select(r => r.Total),
        })));

    /// <summary>MPO's pairs from the same candidates, re-ranked by rule + format + the reward model's weighted, standardised term.</summary>
    private void HybridPairs(string sftModel, string rmModel, string path)
    {
        var prompts = new PromptDataset(Dir("data", "train", "prompts.jsonl"), s.Seed + 7);
        var groups = File.ReadLines(CandidatesPath).Select(line =>
        {
            var o = System.Text.Json.Nodes.JsonNode.Parse(line)!.AsObject();
            var responses = o["responses"]!.AsArray().Select(x => x!.GetValue<string>()).ToList();
            double At(string key, int i) => o[key]![i]!.GetValue<double>();
            var rewards = responses.Select((_, i) => new RewardBreakdown(At("rule", i), 0, 0, At("format", i), At("total", i))).ToList();
            return new SampledGroup(prompts.Read(o["prompt"]!.GetValue<int>()), responses, rewards);
        }).ToList();
        using var rm = RewardModel.Load(backend, rmModel, TrainableParts.None, trainHead: false);
        var hybrid = PromptSampling.WithRewardModel(groups, rm, TextTokenizer.Load(sftModel), s.RmWeight, Scaling());
        PromptSampling.WritePairs(path, PromptSampling.Pairs(hybrid, s.PairMargin));
    }

    /// <summary>The prompts the later MPO rounds sample their pairs from: the next PairPrompts training prompts after the pairs'.</summary>
    private string MpoPrompts()
    {
        var path = Dir("data", "train", "mpo-prompts.jsonl");   // beside prompts.jsonl: its image paths are relative to it
        if (File.Exists(path)) return path;
        var prompts = new PromptDataset(Dir("data", "train", "prompts.jsonl"), s.Seed + 7);
        prompts.Next(s.PairPrompts + s.RmSyntheticPairs);
        var source = File.ReadAllLines(Dir("data", "train", "prompts.jsonl"));
        File.WriteAllLines(path, prompts.Next(s.PairPrompts).Select(p => source[p.Index]));
        return path;
    }

    private string[] PreferenceOverrides(float? lr = null) =>
        [$"pairs.pairs_per_step={s.PairsPerStep}", "pairs.held_out=0.2", $"optim.lr={(lr ?? s.PreferenceLr).ToString(CultureInfo.InvariantCulture)}", "mpo.beta=0.1"];

    private TrainConfig Stage(string stage, string model, string output, string data, int steps, string[] extra) =>
        TrainConfig.Load(null, [$"stage={stage}", $"model={model}", $"output={output}", $"data.path={data}", $"steps={steps}", $"seed={s.Seed}",
            // Warm-up and SFT train everything; the reward model, MPO and GRPO keep the aligned vision encoder as it is.
            $"trainable={(stage == "sft" ? "all" : "adapter+llm")}", $"checkpoint.every={Math.Max(1, steps / 2)}", "checkpoint.keep=1",
            // The CPU trains in fp32 from stage to stage: each stage's final model is exported in fp32, not rounded to bf16.
            "checkpoint.export_dtype=f32", .. extra]);

    private (string Model, List<GrpoStepMetrics> Steps) RunGrpo(string name, string model, string? rmModel, bool buffer, Action<string, double>? progress, CancellationToken cancel)
    {
        var output = Dir(name);
        var config = Stage("grpo", model, output, Dir("data", "rl", "prompts.jsonl"), s.GrpoSteps,
        [
            $"grpo.group_size={s.GroupSize}", $"grpo.prompts_per_step={s.GrpoPrompts}", $"grpo.max_new_tokens={s.MaxNewTokens}", "grpo.minibatches=2",
            $"grpo.ssb.enabled={(buffer ? "true" : "false")}", $"grpo.temperature={s.GrpoTemperature.ToString(CultureInfo.InvariantCulture)}",
            $"grpo.top_p={s.GrpoTopP.ToString(CultureInfo.InvariantCulture)}", $"grpo.advantage={s.GrpoAdvantage}", $"optim.lr={s.GrpoLr.ToString(CultureInfo.InvariantCulture)}",
            $"monitor.claim_pattern={DigitScenes.ClaimPattern}", "grpo.cache_blocks=2048", $"trainable={s.GrpoTrainable}",
            $"reward.reasoning_weight={s.ReasoningWeight.ToString(CultureInfo.InvariantCulture)}", $"reward.grounding_weight={s.GroundingWeight.ToString(CultureInfo.InvariantCulture)}",
            $"reward.grounding_credit={s.GroundingCredit}",
            .. rmModel is null ? Array.Empty<string>() : [$"reward.rm_path={rmModel}", $"reward.rm_weight={s.RmWeight.ToString(CultureInfo.InvariantCulture)}", "reward.rm_transform=standardise",
                $"reward.rm_threshold={s.RmThreshold.ToString(CultureInfo.InvariantCulture)}"],
        ]);
        using (var t = new GrpoTrainer(config, backend, dataParallel: _dp))
        {
            if (t.Step < s.GrpoSteps)
            {
                t.Run(m => progress?.Invoke(name, m.Step / (double)s.GrpoSteps), cancel);
                if (t.Step < s.GrpoSteps) throw new OperationCanceledException($"interrupted during {name}");
            }
        }
        if (!_dp.Writes) return ("", []);
        Report.Write(output);
        var steps = File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToList();
        var final = Path.Combine(output, "final");
        return (Directory.Exists(final) ? final : RunCheckpoints.Latest(output) ?? throw new InvalidOperationException($"{output} has no checkpoint"), steps);
    }

    /// <summary>
    /// Candidates per prompt: the SFT model's samples plus the task's reference trace; each is scored by rule + format,
    /// and the best and worst form a pair when their margin passes.
    /// </summary>
    private void BuildPairs(string model, string path)
    {
        var prompts = new PromptDataset(Dir("data", "train", "prompts.jsonl"), s.Seed + 7);
        var traces = new SftDataset(Dir("data", "train", "sft.jsonl"), 0, shuffle: false);
        if (traces.Count != prompts.Count) throw new InvalidDataException($"{Dir("data", "train")}: {prompts.Count} prompts but {traces.Count} traces");
        var rows = prompts.Next(s.PairPrompts);
        using var vlm = VisionLanguageModel.Load(backend, model);
        var tokenizer = TextTokenizer.Load(model);
        var groups = PromptSampling.Sample(vlm, tokenizer, rows, s.PairSamples, new SamplingParams(1f), s.MaxNewTokens, (ulong)s.Seed,
            PromptSampling.RuleAndFormat);
        var withTraces = groups.Select(g =>
        {
            var trace = traces.Read(g.Prompt.Index).Response;
            return new SampledGroup(g.Prompt, [.. g.Responses, trace], [.. g.Rewards, PromptSampling.RuleAndFormat(trace, g.Prompt)]);
        });
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        var candidates = withTraces.ToList();
        WriteCandidates(CandidatesPath, candidates);
        var sampled = PromptSampling.Pairs(candidates, s.PairMargin);
        PromptSampling.WritePairs(path, sampled);

        // The reward model's pairs: the sampled ones plus, for further training scenes, the reference trace against a
        // wrong one (a misread digit followed consistently, or the right digits and a wrong conclusion), scored by rule
        // + format. They teach it what the policy's samples are too few to: whether the claims fit the image and the
        // conclusion fits the claims.
        var rng = new Random(Engine.Seeds.ForRandom(s.Seed, Engine.Seeds.Hash("rm_pairs")));
        var synthetic = prompts.Next(s.RmSyntheticPairs).Select(p =>
        {
            var trace = traces.Read(p.Index).Response;
            if (DigitScenes.ClaimedDigits(trace) is not { } claimed || p.Type is null)
                throw new InvalidDataException($"{Dir("data", "train", "sft.jsonl")}:{p.Index + 1}: a digit trace with its claim and a typed prompt expected");
            var item = new DigitTaskItem(p.Question, p.Answer, DigitQuestionTypes.Parse(p.Type), claimed, [], 0, []);
            var rejected = DigitScenes.Rejected(item, rng).Trace();
            return (new SampledGroup(p, [trace, rejected], [PromptSampling.RuleAndFormat(trace, p), PromptSampling.RuleAndFormat(rejected, p)]), 0, 1);
        });
        PromptSampling.WritePairs(RmPairsPath, [.. sampled, .. synthetic]);
    }

    private string RmPairsPath => Dir("data", "rm-pairs.jsonl");

    private StageResult Evaluate(string stage, string model)
    {
        var evalDir = Dir("eval", stage);
        EvalResult result;
        if (File.Exists(Path.Combine(evalDir, "eval.json")))
            result = JsonSerializer.Deserialize<EvalResult>(File.ReadAllText(Path.Combine(evalDir, "eval.json")))!;
        else
        {
            var data = new PromptDataset(Dir("data", "held-out", "prompts.jsonl"), 0, shuffle: false);
            var prompts = Enumerable.Range(0, data.Count).Select(data.Read).ToList();
            using var vlm = VisionLanguageModel.Load(backend, model);
            var tokenizer = TextTokenizer.Load(model);
            var settings = new EvalSettings(s.EvalSamples, s.MaxNewTokens, Temperature: s.EvalSamples == 1 ? 0f : 0.6f, TopP: s.EvalSamples == 1 ? 1f : 0.95f,
                Seed: (ulong)s.Seed, ClaimPattern: DigitScenes.ClaimPattern);
            (result, var samples) = Evaluation.Run(vlm, tokenizer, prompts, settings, model, Dir("data", "held-out", "prompts.jsonl"));
            Evaluation.Write(evalDir, result, samples);
        }
        _log(string.Format(CultureInfo.InvariantCulture, "{0}: held-out pass@1 {1:F3} ± {2:F3}, format {3:F3}, hallucination {4}", stage, result.PassAt1,
            result.PassAt1StdError, result.FormatRate, result.HallucinationRate is { } h ? h.ToString("F3", CultureInfo.InvariantCulture) : "-"));
        return new StageResult(stage, model, result);
    }

    private void WriteSummary(PipelineSummary summary)
    {
        var inv = CultureInfo.InvariantCulture;
        var plots = Dir("plots");
        Directory.CreateDirectory(plots);
        StepPlot("GRPO effective-sample ratio", Path.Combine(plots, "effective_ratio.png"), summary.EffectiveRatioWithBuffer, summary.EffectiveRatioWithoutBuffer);
        StepPlot("GRPO accuracy on its training prompts (moving mean)", Path.Combine(plots, "grpo_train_accuracy.png"),
            MovingMean(summary.TrainAccuracyWithBuffer), MovingMean(summary.TrainAccuracyWithoutBuffer));
        var acc = new ScottPlot.Plot();
        var bars = acc.Add.Bars(summary.Stages.Select(x => x.Eval.PassAt1).ToArray());
        acc.Axes.Bottom.SetTicks(Enumerable.Range(0, summary.Stages.Count).Select(i => (double)i).ToArray(), summary.Stages.Select(x => x.Stage).ToArray());
        acc.Title("Held-out pass@1 after each stage");
        acc.SavePng(Path.Combine(plots, "accuracy_by_stage.png"), 800, 450);

        var md = new StringBuilder();
        md.AppendLine("# The digit pipeline").AppendLine();
        md.AppendLine(string.Format(inv, "Seed {0}; this invocation took {1:F0} s (stages finished by an earlier one are loaded, not rerun). Held-out scenes are composed only from held-out MNIST images; nothing was tuned on them. \"vs sft\" is the difference in pass@1 from the SFT model on the same prompts, ± its paired standard error.",
            s.Seed, summary.Seconds)).AppendLine();
        if (PipelineOverrides.Changed(s) is { Count: > 0 } changed)
            md.AppendLine("Settings changed from the defaults (--pipeline): " + string.Join(", ", changed) + ".").AppendLine();
        int k = s.EvalSamples;
        md.AppendLine($"| stage | held-out pass@1 | vs sft (paired) | pass@{k} | majority of {k} | format rate | hallucination rate | reads the digits exactly | answer follows its reading |")
            .AppendLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        static string Rate(double? x) => x is { } v ? v.ToString("F3", CultureInfo.InvariantCulture) : "-";
        foreach (var st in summary.Stages)
            md.AppendLine(string.Format(inv, "| {0} | {1:F3} ± {2:F3} | {3} | {4} | {5} | {6:F3} | {7} | {8} | {9} |", st.Stage, st.Eval.PassAt1, st.Eval.PassAt1StdError,
                st.VersusSft is { } v ? string.Format(inv, "{0:+0.000;-0.000} ± {1:F3}", v.Difference, v.StdError) : "-", Rate(st.Eval.PassAtK), Rate(st.Eval.MajorityAtK), st.Eval.FormatRate,
                Rate(st.Eval.HallucinationRate), Rate(st.Eval.ReadsExactlyRate), Rate(st.Eval.FollowsReadingRate)));
        md.AppendLine().AppendLine($"pass@{k}: some sample of the {k} is right; majority of {k}: their most frequent answer is. Sharpening the sampling alone moves pass@1 toward the majority; beyond it, the model has to prefer answers it now gives less often.");
        md.AppendLine().AppendLine("\"Reads the digits exactly\": the digits a response says it sees are the scene's, in order. \"Answer follows its reading\": the answer is the one the digits it claims imply, right or wrong; a right answer that does not follow came from somewhere other than the reasoning.");
        var types = summary.Stages.SelectMany(x => x.Eval.ByType.Select(t => t.Type)).Distinct().Order(StringComparer.Ordinal).ToList();
        if (types.Count > 0)
        {
            md.AppendLine().AppendLine("| stage | " + string.Join(" | ", types) + " |").AppendLine("| --- |" + string.Concat(types.Select(_ => " --- |")));
            foreach (var st in summary.Stages)
                md.AppendLine($"| {st.Stage} | " + string.Join(" | ", types.Select(t => st.Eval.ByType.FirstOrDefault(x => x.Type == t)?.PassAt1.ToString("F3", inv) ?? "-")) + " |");
        }
        if (summary.VisionDigitAccuracy is { } va)
            md.AppendLine().AppendLine(string.Format(inv, "Vision alignment ({0} steps): on held-out scenes the probe names the digit of {1:F3} of the image tokens over one.", s.VisionSteps, va));
        md.AppendLine().AppendLine(string.Format(inv, "Reward model held-out pair accuracy: {0} on {1} pairs it did not train on; {2} pairs sampled from the SFT model passed the margin by rule + format.",
            summary.RewardModelPairAccuracy is { } r ? r.ToString("F3", inv) : "-", summary.RewardModelHeldOutPairs, summary.Pairs));
        if (summary.MpoPairs is { } pairsNote) md.AppendLine(pairsNote);
        foreach (var round in summary.MpoRounds)
            md.AppendLine(string.Format(inv, "MPO round {0}: {1} pairs, held-out pair accuracy {2} on {3} pairs.", round.Round, round.PairCount,
                round.HeldOutAccuracy is { } held ? held.ToString("F3", inv) : "-", round.HeldOutPairs));
        if (summary.GrpoReward is { } note) md.AppendLine(note);
        md.AppendLine(string.Format(inv, "Mean effective-sample ratio after the buffer's top-up: {0:F3} with the buffer, {1:F3} without; the share of fresh rollouts with non-zero advantage: {2:F3} and {3:F3}.",
            summary.EffectiveRatioWithBuffer.DefaultIfEmpty().Average(), summary.EffectiveRatioWithoutBuffer.DefaultIfEmpty().Average(),
            summary.FreshInformativeWithBuffer.DefaultIfEmpty().Average(), summary.FreshInformativeWithoutBuffer.DefaultIfEmpty().Average()));
        if (summary.TrainRewardWithBuffer.Count > 0 && summary.TrainRewardWithoutBuffer.Count > 0)
        {
            var (r0, r1) = PipelineSummary.Trend(summary.TrainRewardWithBuffer);
            var (q0, q1) = PipelineSummary.Trend(summary.TrainRewardWithoutBuffer);
            md.AppendLine(string.Format(inv, "GRPO's mean training reward (first quarter of the steps -> last quarter): {0:F3} -> {1:F3} with the buffer, {2:F3} -> {3:F3} without.", r0, r1, q0, q1));
        }
        if (summary.TrainAccuracyWithBuffer.Count > 0 && summary.TrainAccuracyWithoutBuffer.Count > 0)
        {
            var (w0, w1) = PipelineSummary.Trend(summary.TrainAccuracyWithBuffer);
            var (n0, n1) = PipelineSummary.Trend(summary.TrainAccuracyWithoutBuffer);
            md.AppendLine(string.Format(inv, "GRPO accuracy on its own training prompts (first quarter of the steps -> last quarter): {0:F3} -> {1:F3} with the buffer, {2:F3} -> {3:F3} without. A rise here with none on held-out scenes is learning the training prompts, not the task.",
                w0, w1, n0, n1));
        }
        md.AppendLine().AppendLine("![accuracy](plots/accuracy_by_stage.png)").AppendLine("![effective ratio](plots/effective_ratio.png)")
            .AppendLine("![GRPO training accuracy](plots/grpo_train_accuracy.png)");
        File.WriteAllText(Dir("summary.md"), md.ToString());
    }

    /// <summary>A per-step series of both GRPO runs, with the buffer and without, against the step.</summary>
    private static void StepPlot(string title, string path, IReadOnlyList<double> withBuffer, IReadOnlyList<double> withoutBuffer)
    {
        var plot = new ScottPlot.Plot();
        foreach (var (series, label) in new[] { (withBuffer, "with the Selective Sample Buffer"), (withoutBuffer, "without") })
        {
            if (series.Count == 0) continue;
            plot.Add.Scatter(Enumerable.Range(1, series.Count).Select(x => (double)x).ToArray(), series.ToArray()).LegendText = label;
        }
        plot.Title(title);
        plot.XLabel("step");
        plot.ShowLegend();
        plot.SavePng(path, 800, 450);
    }

    /// <summary>The mean over a trailing window of a tenth of the series (at least one step; shorter at the start).</summary>
    private static double[] MovingMean(IReadOnlyList<double> series)
    {
        int window = Math.Max(1, series.Count / 10);
        var smooth = new double[series.Count];
        double sum = 0;
        for (int i = 0; i < series.Count; i++)
        {
            sum += series[i] - (i >= window ? series[i - window] : 0);
            smooth[i] = sum / Math.Min(window, i + 1);
        }
        return smooth;
    }

    /// <summary>The built-in model config of the digit task (configs/digits.json, embedded).</summary>
    public static string BuiltInConfig() => EmbeddedConfig("configs/digits.json");

    /// <summary>A model config embedded in R1V2.Native.Trainer (configs/digits.json, configs/digits-tiny.json).</summary>
    public static string EmbeddedConfig(string name)
    {
        using var stream = typeof(DigitPipeline).Assembly.GetManifestResourceStream(name)
            ?? throw new InvalidOperationException($"{name} is not embedded in R1V2.Native.Trainer");
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }
}
