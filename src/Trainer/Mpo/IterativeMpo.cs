using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;

namespace R1V2.Native.Trainer.Mpo;

/// <summary>One round of iterative MPO: its pairs and the held-out pair accuracy of the policy it trained.</summary>
public sealed record MpoRound(int Round, string Pairs, int PairCount, int HeldOutPairs, double? HeldOutAccuracy, double FinalLoss);

/// <summary>
/// Iterative MPO (<c>mpo.rounds</c>): round 1 trains on the configured pairs; each later round samples
/// <c>mpo.samples</c> responses per prompt of <c>mpo.prompts</c> from the policy the previous round made, ranks them by
/// rule + format (+ the reward model's weighted, standardised term when <c>mpo.reward_model</c> is set: the paper's
/// hybrid signal), keeps best-vs-worst pairs whose margin passes <c>mpo.margin</c>, and trains on them with that policy
/// as the frozen reference. Each round lives in output/round-N (its pairs, checkpoints, metrics, final model);
/// output/rounds.jsonl has every round's pair count and held-out accuracy; output/final is the last round's model. A
/// rerun skips finished rounds and resumes the unfinished one.
/// </summary>
public sealed class IterativeMpo(TrainConfig config, Backend backend)
{
    public string RoundsPath => Path.Combine(config.Output, "rounds.jsonl");

    /// <returns>Every round, or null when cancelled (the running round has written a checkpoint).</returns>
    public List<MpoRound>? Run(Action<int, PreferenceStepMetrics>? onStep = null, Action<string>? log = null, CancellationToken cancel = default)
    {
        var m = config.Mpo;
        // Inputs of the later rounds are checked before round 1 trains.
        if (m.Rounds > 1 && !File.Exists(m.Prompts)) throw new FileNotFoundException($"mpo.prompts: {m.Prompts} not found (the prompts rounds 2..{m.Rounds} sample pairs from)", m.Prompts);
        if (m.RewardModel.Length > 0 && !File.Exists(Path.Combine(m.RewardModel, "config.json")))
            throw new FileNotFoundException($"mpo.reward_model: no checkpoint at {m.RewardModel} (config.json expected)", m.RewardModel);
        Directory.CreateDirectory(config.Output);
        var rounds = new List<MpoRound>();
        string model = config.Model, pairs = config.Data.Path;
        for (int round = 1; round <= config.Mpo.Rounds; round++)
        {
            var dir = Path.Combine(config.Output, $"round-{round}");
            Directory.CreateDirectory(dir);
            if (round > 1)
            {
                pairs = Path.Combine(dir, "pairs.jsonl");
                if (!File.Exists(pairs)) SamplePairs(model, pairs, round, log);
            }
            int count = File.ReadLines(pairs).Count(l => l.Trim().Length > 0);
            // A round is done when its final model is saved (written after its summary).
            if (!Directory.Exists(Path.Combine(dir, "final")))
            {
                var c = config.Clone();
                c.Model = model;
                c.Output = dir;
                c.Data.Path = pairs;
                c.Mpo.Rounds = 1;
                using var trainer = new PreferenceTrainer(c, backend);
                if (trainer.Run(m => onStep?.Invoke(round, m), cancel) is null) return null;
            }
            var summary = JsonSerializer.Deserialize<PreferenceSummary>(File.ReadAllText(Path.Combine(dir, "summary.json")))!;
            rounds.Add(new MpoRound(round, pairs, count, summary.HeldOutPairs, summary.HeldOutAccuracy, summary.FinalLoss));
            File.WriteAllLines(RoundsPath, rounds.Select(r => JsonSerializer.Serialize(r)));
            log?.Invoke($"mpo round {round}: {count} pairs, held-out pair accuracy {summary.HeldOutAccuracy?.ToString("F3") ?? "n/a"}");
            model = Path.Combine(dir, "final");
        }
        RunCheckpoints.SaveFinal(config.Output, tmp => CopyDirectory(model, tmp));
        return rounds;
    }

    /// <summary>Pairs from the current policy's samples, ranked by rule + format (+ the reward model's term).</summary>
    private void SamplePairs(string model, string path, int round, Action<string>? log)
    {
        var m = config.Mpo;
        var prompts = new PromptDataset(m.Prompts, config.Seed, shuffle: false, config.Data.SkipBadRows);
        var rows = Enumerable.Range(0, prompts.Count).Select(prompts.Read).ToList();
        using var policy = VisionLanguageModel.Load(backend, model);
        var tokenizer = TextTokenizer.Load(model);
        var groups = PromptSampling.Sample(policy, tokenizer, rows, m.Samples, new SamplingParams(m.Temperature), m.MaxNewTokens,
            Engine.Seeds.Combine(config.Seed, round, Engine.Seeds.Hash("mpo-round")), PromptSampling.RuleAndFormat);
        if (m.RewardModel.Length > 0)
        {
            using var rm = RewardModel.Load(backend, m.RewardModel, TrainableParts.None, trainHead: false);
            groups = PromptSampling.WithRewardModel(groups, rm, tokenizer, m.RmWeight, new RewardModelScaling(RewardModelTransform.Standardise, threshold: m.RmThreshold));
        }
        var pairs = PromptSampling.Pairs(groups, m.Margin);
        if (pairs.Count == 0)
            throw new InvalidDataException($"mpo round {round}: no pair of {m.Samples} samples per prompt of {m.Prompts} passed the margin {m.Margin}; lower mpo.margin or raise mpo.samples");
        PromptSampling.WritePairs(path, pairs);
        log?.Invoke($"mpo round {round}: {pairs.Count} pairs from {rows.Count} prompts x {m.Samples} samples of round {round - 1}'s policy");
    }

    private static void CopyDirectory(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var file in Directory.GetFiles(from)) File.Copy(file, Path.Combine(to, Path.GetFileName(file)), overwrite: true);
        foreach (var sub in Directory.GetDirectories(from)) CopyDirectory(sub, Path.Combine(to, Path.GetFileName(sub)));
    }
}
