using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer;

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
