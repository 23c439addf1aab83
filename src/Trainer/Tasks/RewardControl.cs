using System.Globalization;
using System.Text;
using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;

namespace R1V2.Native.Trainer.Tasks;

/// <summary>Settings of the reward-control task (<c>engine train --task reward-control</c>).</summary>
public sealed record RewardControlSettings
{
    public required string Output { get; init; }
    public int Seed { get; init; } = 1;
    public int Steps { get; init; } = 40;
    public int PromptsPerStep { get; init; } = 16;
    public int GroupSize { get; init; } = 8;
    public int MaxNewTokens { get; init; } = 6;
    public float Lr { get; init; } = 1e-2f;
    public float Temperature { get; init; } = 1f;

    /// <summary>A checkpoint to start from; null: a fresh <c>engine init</c> of configs/digits-tiny.json.</summary>
    public string? Model { get; init; }
}

/// <summary>The reward's trend: mean training reward over the first and the last quarter of the steps.</summary>
public sealed record RewardControlResult(int Steps, double FirstQuarter, double LastQuarter, IReadOnlyList<GrpoStepMetrics> History)
{
    public double Rise => LastQuarter - FirstQuarter;
}

/// <summary>
/// A control for GRPO itself: a reward the model can obviously earn, on prompts that never repeat. Each prompt names a
/// digit ("Write the digit 7, as often as you can. Request 000123.", a running request number so that no prompt comes
/// twice) and the reward is the share of the response's characters that are that digit. A correct GRPO raises the mean
/// reward on the fresh prompts step over step; a flipped advantage sign lowers it, and a zero gradient or advantages
/// shuffled across samples leave it flat. The model starts from a fresh random initialisation (or a given checkpoint),
/// all of it trainable, without the Selective Sample Buffer or a reward model: nothing but the policy gradient.
/// </summary>
public static class RewardControl
{
    /// <summary>Prompt <paramref name="index"/> of a run: the digit it names comes from the seed, the request number is the index.</summary>
    public static PromptRow Prompt(int index, int seed)
    {
        int digit = new Random(Engine.Seeds.ForRandom(seed, index, Engine.Seeds.Hash("reward-control"))).Next(10);
        var question = string.Format(CultureInfo.InvariantCulture, "Write the digit {0}, as often as you can. Request {1:D6}.", digit, index);
        return new PromptRow(index, question, digit.ToString(CultureInfo.InvariantCulture), [], null, null);
    }

    /// <summary>The share of the response's characters that are the prompt's digit (its answer), in [0, 1].</summary>
    public static RewardBreakdown Reward(string response, PromptRow prompt)
    {
        char digit = prompt.Answer[0];
        double r = response.Length == 0 ? 0 : response.Count(c => c == digit) / (double)response.Length;
        return new RewardBreakdown(r, 0, 0, 0, r);
    }

    public static RewardControlResult Run(RewardControlSettings s, Backend backend, Action<GrpoStepMetrics>? onStep = null, CancellationToken cancel = default)
    {
        if (s.Steps < 4) throw new ArgumentException($"the reward-control task needs at least 4 steps to compare its first and last quarter, got {s.Steps}");
        if (s.PromptsPerStep < 1 || s.GroupSize < 2 || s.MaxNewTokens < 1)
            throw new ArgumentException("the reward-control task needs prompts per step >= 1, group size >= 2 and max new tokens >= 1");
        Directory.CreateDirectory(s.Output);
        string model = s.Model ?? Path.Combine(s.Output, "init");
        if (s.Model is null && !File.Exists(Path.Combine(model, "config.json")))
        {
            var configPath = Path.Combine(s.Output, "model-config.json");
            File.WriteAllText(configPath, BuiltInTinyConfig());
            ModelFactory.Init(configPath, model, s.Seed);
        }
        // One prompt per request number: a run never sees a prompt twice.
        var data = Path.Combine(s.Output, "prompts.jsonl");
        var rows = Enumerable.Range(0, s.Steps * s.PromptsPerStep).Select(i => Prompt(i, s.Seed))
            .Select(p => JsonSerializer.Serialize(new { question = p.Question, answer = p.Answer }));
        File.WriteAllLines(data, rows);
        var config = TrainConfig.Load(null, [$"model={model}", $"output={Path.Combine(s.Output, "grpo")}", $"data.path={data}", "data.shuffle=false",
            $"steps={s.Steps}", $"seed={s.Seed}", "trainable=all", string.Create(CultureInfo.InvariantCulture, $"optim.lr={s.Lr}"),
            $"grpo.group_size={s.GroupSize}", $"grpo.prompts_per_step={s.PromptsPerStep}", $"grpo.max_new_tokens={s.MaxNewTokens}",
            string.Create(CultureInfo.InvariantCulture, $"grpo.temperature={s.Temperature}"), "grpo.ssb.enabled=false", "grpo.cache_blocks=256",
            $"checkpoint.every={s.Steps}"]);
        using (var trainer = new GrpoTrainer(config, backend, Reward)) trainer.Run(onStep, cancel);
        var history = File.ReadAllLines(Path.Combine(config.Output, "metrics.jsonl")).Select(l => JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToList();
        int quarter = Math.Max(1, history.Count / 4);
        var result = new RewardControlResult(history.Count, history.Take(quarter).Average(m => m.Reward), history.TakeLast(quarter).Average(m => m.Reward), history);
        File.WriteAllText(Path.Combine(s.Output, "summary.md"), Summary(s, result));
        return result;
    }

    private static string Summary(RewardControlSettings s, RewardControlResult r)
    {
        var inv = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        sb.AppendLine("# Reward control");
        sb.AppendLine();
        sb.AppendLine(string.Format(inv, "GRPO from {0} on prompts that never repeat, reward = the share of the response's characters that are the digit the prompt names.",
            s.Model ?? "a fresh initialisation of configs/digits-tiny.json"));
        sb.AppendLine(string.Format(inv, "{0} steps of {1} prompts x {2} samples, lr {3}, temperature {4}, seed {5}.", r.Steps, s.PromptsPerStep, s.GroupSize, s.Lr, s.Temperature, s.Seed));
        sb.AppendLine();
        sb.AppendLine(string.Format(inv, "Mean training reward: first quarter {0:F4}, last quarter {1:F4} (rise {2:+0.0000;-0.0000}).", r.FirstQuarter, r.LastQuarter, r.Rise));
        return sb.ToString();
    }

    /// <summary>configs/digits-tiny.json, embedded.</summary>
    public static string BuiltInTinyConfig() => Pipeline.DigitPipeline.EmbeddedConfig("configs/digits-tiny.json");
}
