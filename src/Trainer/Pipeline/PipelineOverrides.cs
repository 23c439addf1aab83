using System.Globalization;
using System.Reflection;
using System.Text;
using System.Text.Json;

namespace R1V2.Native.Trainer.Pipeline;

/// <summary>
/// The default pipeline's settings by name: `engine train --pipeline grpo_steps=300` sets
/// <see cref="PipelineSettings.GrpoSteps"/>. Keys are the properties in snake_case; <c>output</c> and <c>seed</c> are
/// left to --out and --seed. A run directory remembers its settings (<see cref="FileName"/>), so continuing a run with
/// other settings is an error rather than a mix of stages trained two ways.
/// </summary>
public static class PipelineOverrides
{
    public const string FileName = "pipeline-settings.json";

    private static readonly string[] LeftToOptions = ["output", "seed"];

    private static readonly Dictionary<string, PropertyInfo> Properties = typeof(PipelineSettings)
        .GetProperties(BindingFlags.Public | BindingFlags.Instance)
        .Where(p => p.CanWrite && p.GetIndexParameters().Length == 0 && p.Name != "EqualityContract")
        .ToDictionary(p => SnakeCase(p.Name), StringComparer.Ordinal);

    /// <summary>Every key --pipeline accepts, in declaration order.</summary>
    public static IReadOnlyList<string> Keys { get; } = [.. Properties.Keys.Where(k => !LeftToOptions.Contains(k))];

    /// <summary>GrpoTopP -> grpo_top_p.</summary>
    public static string SnakeCase(string name)
    {
        var sb = new StringBuilder(name.Length + 4);
        for (int i = 0; i < name.Length; i++)
        {
            char c = name[i];
            if (char.IsUpper(c) && i > 0 && (char.IsLower(name[i - 1]) || char.IsDigit(name[i - 1]))) sb.Append('_');
            sb.Append(char.ToLowerInvariant(c));
        }
        return sb.ToString();
    }

    /// <summary>The settings with each key=value applied in order; an unknown key, a value of the wrong type or one out of range is an error naming it.</summary>
    public static PipelineSettings Apply(PipelineSettings settings, IEnumerable<string> overrides)
    {
        var result = settings with { };
        foreach (var o in overrides)
        {
            int eq = o.IndexOf('=');
            if (eq <= 0) throw new ArgumentException($"--pipeline '{o}': expected key=value, e.g. grpo_steps=300");
            string key = o[..eq].Trim(), text = o[(eq + 1)..].Trim();
            if (LeftToOptions.Contains(key)) throw new ArgumentException($"--pipeline {key}: set it with --{(key == "output" ? "out" : key)}");
            if (!Properties.TryGetValue(key, out var p))
                throw new ArgumentException($"--pipeline {key}: no such setting; the settings are {string.Join(", ", Keys)}");
            p.SetValue(result, Parse(key, text, p.PropertyType));
        }
        Validate(result);
        return result;
    }

    /// <summary>Rejects settings no pipeline could run with, naming the key.</summary>
    public static void Validate(PipelineSettings s)
    {
        foreach (var (key, p) in Properties)
        {
            var v = p.GetValue(s);
            bool bad = v switch
            {
                int i => i < 0 || (i == 0 && key is "train_scenes" or "held_out_scenes" or "rl_scenes" or "sft_steps" or "sft_batch" or "grpo_steps" or "grpo_prompts"
                    or "rm_steps" or "mpo_steps" or "mpo_rounds" or "max_new_tokens" or "eval_samples" or "vision_batch" or "pair_prompts" or "pair_samples" or "pairs_per_step"),
                float f => !float.IsFinite(f) || f < 0 || (f == 0 && key.EndsWith("_lr", StringComparison.Ordinal)) || (key is "grpo_temperature" && f == 0),
                double d => !double.IsFinite(d) || d < 0,
                _ => false,
            };
            if (key is "grpo_top_p" && v is float top && top is <= 0 or > 1) bad = true;
            if (key is "worked_traces" && v is double share && share > 1) bad = true;
            if (bad) throw new ArgumentException($"pipeline setting {key} = {Format(v)} is out of range");
        }
        if (s.GroupSize < 2) throw new ArgumentException($"pipeline setting group_size = {s.GroupSize}: GRPO needs at least 2 samples per prompt");
        if (s.GrpoAdvantage is not ("mean_std" or "mean_only" or "leave_one_out"))
            throw new ArgumentException($"pipeline setting grpo_advantage = '{s.GrpoAdvantage}': mean_std, mean_only or leave_one_out expected");
        if (s.GrpoTrainable is not ("adapter" or "adapter+llm" or "adapter+vit" or "all"))
            throw new ArgumentException($"pipeline setting grpo_trainable = '{s.GrpoTrainable}': adapter, adapter+llm, adapter+vit or all expected");
        if (s.GroundingCredit is not ("exact" or "per_digit"))
            throw new ArgumentException($"pipeline setting grounding_credit = '{s.GroundingCredit}': exact or per_digit expected");
    }

    /// <summary>The keys whose values differ from the defaults, as key=value (output and seed left out).</summary>
    public static IReadOnlyList<string> Changed(PipelineSettings s)
    {
        var defaults = new PipelineSettings();
        return [.. Keys.Where(k => !Equals(Properties[k].GetValue(s), Properties[k].GetValue(defaults))).Select(k => $"{k}={Format(Properties[k].GetValue(s))}")];
    }

    /// <summary>
    /// Writes the settings into the run directory, or, when it already holds some, checks they are the same: the
    /// stages a run directory holds were trained with them.
    /// </summary>
    public static void Remember(PipelineSettings s, string runDir)
    {
        var path = Path.Combine(runDir, FileName);
        var mine = Snapshot(s);
        if (File.Exists(path))
        {
            Dictionary<string, JsonElement> saved;
            try { saved = JsonSerializer.Deserialize<Dictionary<string, JsonElement>>(File.ReadAllText(path)) ?? []; }
            catch (JsonException e) { throw new InvalidDataException($"{path}: not a settings file ({e.Message})", e); }
            var differ = Keys.Where(k => !saved.TryGetValue(k, out var v) || v.ToString() != mine[k].ToString())
                .Select(k => $"{k} {(saved.TryGetValue(k, out var v) ? v.ToString() : "(absent)")} -> {mine[k]}").ToList();
            if (differ.Count > 0)
                throw new InvalidOperationException($"{path}: this run directory was trained with other settings ({string.Join("; ", differ)}); continue it with the same --pipeline settings or start a new --out");
            return;
        }
        Directory.CreateDirectory(runDir);
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, JsonSerializer.Serialize(mine, new JsonSerializerOptions { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
    }

    private static Dictionary<string, JsonElement> Snapshot(PipelineSettings s) =>
        Keys.ToDictionary(k => k, k => JsonSerializer.SerializeToElement(Properties[k].GetValue(s), Properties[k].PropertyType));

    private static object? Parse(string key, string text, Type type)
    {
        var inv = CultureInfo.InvariantCulture;
        if (type == typeof(string)) return key == "model_config" && text.Length == 0 ? null : text; // model_config= : the built-in config
        (object? value, string expected) = type switch
        {
            var t when t == typeof(int) => (int.TryParse(text, NumberStyles.Integer, inv, out var i) ? i : null, "a whole number"),
            var t when t == typeof(float) => (float.TryParse(text, NumberStyles.Float, inv, out var f) ? f : null, "a number"),
            var t when t == typeof(double) => (double.TryParse(text, NumberStyles.Float, inv, out var d) ? d : (object?)null, "a number"),
            _ => throw new ArgumentException($"--pipeline {key}: settings of type {type.Name} cannot be set from the command line"),
        };
        return value ?? throw new ArgumentException($"--pipeline {key}={text}: {expected} expected");
    }

    private static string Format(object? v) => v switch
    {
        null => "null",
        float f => f.ToString("R", CultureInfo.InvariantCulture),
        double d => d.ToString("R", CultureInfo.InvariantCulture),
        IFormattable x => x.ToString(null, CultureInfo.InvariantCulture),
        _ => v.ToString() ?? "",
    };
}
