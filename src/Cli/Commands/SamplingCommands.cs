using System.CommandLine;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine build-pairs` (MPO pairs from sampled responses) and `engine prefilter` (drop prompts whose samples agree).</summary>
public static class SamplingCommands
{
    private static (Option<string> Model, Option<string> Data, Option<string> Out, Option<int> Samples, Option<int> MaxNew, Option<float> Temperature,
        Option<ulong> Seed, Option<string> Backend) Common() => (
        new("--model") { Description = "Checkpoint directory", Required = true },
        new("--data") { Description = "Prompt dataset, JSONL or Parquet (question, answer, images, choices)", Required = true },
        new("--out") { Description = "Output JSONL", Required = true },
        new("--samples") { Description = "Responses per prompt", DefaultValueFactory = _ => 8 },
        new("--max-new-tokens") { DefaultValueFactory = _ => 256 },
        new("--temperature") { DefaultValueFactory = _ => 1f },
        new("--seed") { DefaultValueFactory = _ => 1UL },
        Backends.Option());

    private static List<SampledGroup> Run(string model, string data, int samples, int maxNew, float temperature, ulong seed, string backendName)
    {
        using var backend = Backends.Create(backendName);
        using var vlm = VisionLanguageModel.Load(backend, model);
        var tokenizer = TextTokenizer.Load(model);
        var dataset = new PromptDataset(data, 0, shuffle: false);
        var prompts = Enumerable.Range(0, dataset.Count).Select(dataset.Read).ToList();
        List<SampledGroup> groups = [];
        AnsiConsole.Status().Start($"sampling {samples} responses for {prompts.Count} prompts", _ =>
            groups = PromptSampling.Sample(vlm, tokenizer, prompts, samples, new SamplingParams(temperature), maxNew, seed,
                PromptSampling.RuleAndFormat));
        return groups;
    }

    public static Command CreateBuildPairs()
    {
        var c = Common();
        var margin = new Option<double>("--margin") { Description = "Minimum reward gap between chosen and rejected", DefaultValueFactory = _ => 0.5 };
        var rewardModel = new Option<string?>("--reward-model")
            { Description = "Reward-model checkpoint (engine train --stage rm): rank by rule + format + its weighted, standardised score (the paper's hybrid signal)" };
        var rmWeight = new Option<double>("--rm-weight") { Description = "Weight of the reward model's standardised score", DefaultValueFactory = _ => 0.25 };
        var rmThreshold = new Option<double>("--rm-threshold")
            { Description = "The reward model's term counts only for scores this many standard deviations above the mean of the sampled responses (>= 0)", DefaultValueFactory = _ => 1.0 };
        var cmd = new Command("build-pairs", "Sample responses per prompt, score them with the hybrid reward, and write best-vs-worst preference pairs whose margin passes the threshold")
            { c.Model, c.Data, c.Out, c.Samples, c.MaxNew, c.Temperature, c.Seed, c.Backend, margin, rewardModel, rmWeight, rmThreshold };
        cmd.SetAction(r =>
        {
            if (r.GetValue(rmThreshold) is var t && !(t >= 0)) throw new ArgumentException($"--rm-threshold must be >= 0, got {t}");
            var groups = Run(r.GetValue(c.Model)!, r.GetValue(c.Data)!, r.GetValue(c.Samples), r.GetValue(c.MaxNew), r.GetValue(c.Temperature), r.GetValue(c.Seed), r.GetValue(c.Backend)!);
            string signal = "rule + format";
            if (r.GetValue(rewardModel) is { } rmDir)
            {
                using var backend = Backends.Create(r.GetValue(c.Backend)!);
                using var rm = RewardModel.Load(backend, rmDir, TrainableParts.None, trainHead: false);
                var scaling = new RewardModelScaling(RewardModelTransform.Standardise, threshold: r.GetValue(rmThreshold));
                groups = PromptSampling.WithRewardModel(groups, rm, TextTokenizer.Load(r.GetValue(c.Model)!), r.GetValue(rmWeight), scaling);
                signal = $"rule + format + {r.GetValue(rmWeight)} x the reward model's term, {scaling.Describe()}";
            }
            var pairs = PromptSampling.Pairs(groups, r.GetValue(margin));
            PromptSampling.WritePairs(r.GetValue(c.Out)!, pairs);
            AnsiConsole.MarkupLineInterpolated($"{pairs.Count} pairs from {groups.Count} prompts (ranked by {signal}; margin >= {r.GetValue(margin)}); wrote {r.GetValue(c.Out)}");
            return 0;
        });
        return cmd;
    }

    public static Command CreatePrefilter()
    {
        var c = Common();
        var cmd = new Command("prefilter", "Drop prompts whose sampled responses all get the same reward (they would give zero advantage)")
            { c.Model, c.Data, c.Out, c.Samples, c.MaxNew, c.Temperature, c.Seed, c.Backend };
        cmd.SetAction(r =>
        {
            var groups = Run(r.GetValue(c.Model)!, r.GetValue(c.Data)!, r.GetValue(c.Samples), r.GetValue(c.MaxNew), r.GetValue(c.Temperature), r.GetValue(c.Seed), r.GetValue(c.Backend)!);
            int kept = PromptSampling.WriteInformative(r.GetValue(c.Out)!, groups);
            AnsiConsole.MarkupLineInterpolated($"kept {kept} of {groups.Count} prompts; wrote {r.GetValue(c.Out)}");
            return 0;
        });
        return cmd;
    }
}
