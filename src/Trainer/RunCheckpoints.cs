using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer;

/// <summary>What every trainer's checkpoint records beside its weights; <see cref="Extra"/> holds the stage's own fields.</summary>
public sealed record TrainerState(string Stage, int Step, int BadInARow, (int Epoch, int Index) DataPosition, JsonObject Extra);

/// <summary>
/// Checkpoints of a run directory: output/checkpoints/step-NNNNNN, each written into a temporary directory and then
/// renamed (a crash leaves the previous ones intact), the oldest removed beyond the last K. A checkpoint holds what
/// the trainer writes (weights in the HF layout, tokenizer, trainer_state.json) and the optimiser moments.
/// </summary>
public static class RunCheckpoints
{
    public static string? Latest(string output)
    {
        var dir = Path.Combine(output, "checkpoints");
        if (!Directory.Exists(dir)) return null;
        return Directory.GetDirectories(dir, "step-*").Where(d => !d.Contains(".tmp")).OrderBy(d => d, StringComparer.Ordinal).LastOrDefault();
    }

    /// <summary>Writes checkpoint <paramref name="step"/> through <paramref name="write"/> (given the temporary directory) and prunes to <paramref name="keep"/>.</summary>
    public static string Save(string output, int step, int keep, Action<string> write)
    {
        var root = Path.Combine(output, "checkpoints");
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, $"step-{step:D6}");
        var tmp = final + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try { write(tmp); }
        catch
        {
            Directory.Delete(tmp, true);
            throw;
        }
        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        foreach (var old in Directory.GetDirectories(root, "step-*").Where(d => !d.Contains(".tmp")).OrderBy(d => d, StringComparer.Ordinal).SkipLast(Math.Max(1, keep)))
            Directory.Delete(old, true);
        return final;
    }

    /// <summary>
    /// The common part of a checkpoint: the optimiser moments (optimizer.safetensors) and trainer_state.json with the
    /// stage, step, optimiser step, guard count, data position and the stage's extra fields.
    /// </summary>
    public static void WriteState(string dir, TrainerState state, AdamWOptimizer opt)
    {
        int optStep = SaveOptimizer(dir, opt);
        var json = new JsonObject
        {
            ["stage"] = state.Stage,
            ["step"] = state.Step,
            ["optimizer_step"] = optStep,
            ["bad_in_a_row"] = state.BadInARow,
            ["data_epoch"] = state.DataPosition.Epoch,
            ["data_index"] = state.DataPosition.Index,
        };
        foreach (var (key, value) in state.Extra) json[key] = value?.DeepClone();
        File.WriteAllText(Path.Combine(dir, "trainer_state.json"), json.ToJsonString());
    }

    /// <summary>Reads trainer_state.json and loads the optimiser moments of <paramref name="dir"/> into <paramref name="opt"/>.</summary>
    public static TrainerState ReadState(string dir, AdamWOptimizer opt)
    {
        var path = Path.Combine(dir, "trainer_state.json");
        if (!File.Exists(path)) throw new InvalidDataException($"checkpoint {dir} has no trainer_state.json");
        var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        int Int(string key) => json[key]?.GetValue<int>() ?? throw new InvalidDataException($"{path}: no '{key}'");
        LoadOptimizer(dir, opt, Int("optimizer_step"));
        return new TrainerState(json["stage"]?.GetValue<string>() ?? "grpo", Int("step"), Int("bad_in_a_row"), (Int("data_epoch"), Int("data_index")), json);
    }

    /// <summary>The first <paramref name="steps"/> lines of a run's metrics.jsonl; later lines (steps after the checkpoint) are dropped from the file.</summary>
    public static List<T> RewindMetrics<T>(string metricsPath, int steps)
    {
        var kept = File.Exists(metricsPath)
            ? File.ReadAllLines(metricsPath).Where(l => l.Trim().Length > 0).Take(steps).Select(l => JsonSerializer.Deserialize<T>(l)!).ToList()
            : [];
        File.WriteAllLines(metricsPath, kept.Select(m => JsonSerializer.Serialize(m)));
        return kept;
    }

    /// <summary>Writes output/final through <paramref name="write"/> into a temporary directory, then renames it over the old one.</summary>
    public static string SaveFinal(string output, Action<string> write)
    {
        var final = Path.Combine(output, "final");
        var tmp = final + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try { write(tmp); }
        catch
        {
            Directory.Delete(tmp, true);
            throw;
        }
        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        return final;
    }

    /// <summary>Refuses to resume a run of one stage from another stage's checkpoint (trainer_state.json "stage"; none means grpo).</summary>
    public static void CheckStage(string dir, string stage)
    {
        var statePath = Path.Combine(dir, "trainer_state.json");
        if (!File.Exists(statePath)) throw new InvalidDataException($"checkpoint {dir} has no trainer_state.json; use another output directory");
        var saved = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(statePath))?["stage"]?.GetValue<string>() ?? "grpo";
        if (saved != stage) throw new InvalidDataException($"{statePath}: the checkpoint is from stage '{saved}', this run is stage '{stage}'; use another output directory");
    }

    /// <summary>The AdamW moments as optimizer.safetensors (NAME.exp_avg, NAME.exp_avg_sq); returns the optimiser's step count.</summary>
    public static int SaveOptimizer(string dir, AdamWOptimizer opt)
    {
        var (step, moments) = opt.Export();
        SafetensorsFile.Write(Path.Combine(dir, "optimizer.safetensors"),
            moments.SelectMany(m => new[] { (m.Name + ".exp_avg", m.Shape, m.M), (m.Name + ".exp_avg_sq", m.Shape, m.V) }));
        return step;
    }

    public static void LoadOptimizer(string dir, AdamWOptimizer opt, int step)
    {
        var path = Path.Combine(dir, "optimizer.safetensors");
        if (!File.Exists(path)) throw new FileNotFoundException($"checkpoint {dir} has no optimizer.safetensors", path);
        using var file = SafetensorsFile.Open(path);
        var moments = opt.ParameterNames.ToDictionary(n => n, n => (file.ReadFloats(n + ".exp_avg"), file.ReadFloats(n + ".exp_avg_sq")));
        opt.Import(step, moments);
    }
}
