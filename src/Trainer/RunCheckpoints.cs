using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer;

/// <summary>What every trainer's checkpoint records beside its weights; <see cref="Extra"/> holds the stage's own fields.</summary>
public sealed record TrainerState(string Stage, int Step, int BadInARow, (int Epoch, int Index) DataPosition, JsonObject Extra);

/// <summary>
/// Checkpoints of a run directory: output/checkpoints/step-NNNNNN, each written into a temporary directory, closed by
/// a manifest (every file's size and SHA-256, written last and flushed to disk), then renamed, with the rename flushed
/// too: a crash or a full disk leaves the previous checkpoints intact. The oldest are removed beyond the last K. A
/// checkpoint holds what the trainer writes (weights in the HF layout, tokenizer, trainer_state.json) and the
/// optimiser moments. Resuming takes the newest checkpoint whose manifest verifies, warning about any newer one that
/// does not (truncated, changed or missing files) and falling back past it; the temporary directories a killed run
/// left behind are removed first.
/// </summary>
public static class RunCheckpoints
{
    public const string ManifestName = "manifest.json";

    /// <summary>Where warnings about damaged checkpoints go (standard error unless replaced).</summary>
    public static Action<string> Warn { get; set; } = message => Console.Error.WriteLine($"warning: {message}");

    /// <summary>
    /// The newest intact checkpoint of a run, or null. First removes the run's own leftover temporary checkpoint
    /// directories (step-N.tmp-*, final.tmp-*); then verifies manifests from the newest down, warning about each damaged one.
    /// </summary>
    /// <param name="cleanup">false: leave temporaries alone (a reader such as <c>engine export</c> next to a live run).</param>
    public static string? Latest(string output, bool cleanup = true)
    {
        if (cleanup) RemoveStaleTemporaries(output);
        var dir = Path.Combine(output, "checkpoints");
        if (!Directory.Exists(dir)) return null;
        foreach (var candidate in Directories(dir).Reverse())
        {
            if (VerifyManifest(candidate) is not { } problem) return candidate;
            Warn($"checkpoint {candidate} is damaged ({problem}); falling back to the one before it");
        }
        return null;
    }

    /// <summary>The finished checkpoints of a checkpoints directory, oldest first.</summary>
    private static IEnumerable<string> Directories(string root) =>
        Directory.GetDirectories(root, "step-*").Where(d => !Path.GetFileName(d).Contains(".tmp-", StringComparison.Ordinal)).OrderBy(d => d, StringComparer.Ordinal);

    /// <summary>Removes step-N.tmp-* under output/checkpoints and final.tmp-* in output: what a killed write left.</summary>
    public static void RemoveStaleTemporaries(string output)
    {
        var stale = new List<string>();
        var root = Path.Combine(output, "checkpoints");
        if (Directory.Exists(root)) stale.AddRange(Directory.GetDirectories(root, "step-*.tmp-*"));
        if (Directory.Exists(output)) stale.AddRange(Directory.GetDirectories(output, "final.tmp-*"));
        foreach (var d in stale)
        {
            Warn($"removing {d}, a checkpoint an interrupted run did not finish");
            Directory.Delete(d, true);
        }
    }

    /// <summary>Writes checkpoint <paramref name="step"/> through <paramref name="write"/> (given the temporary directory) and prunes to <paramref name="keep"/>.</summary>
    public static string Save(string output, int step, int keep, Action<string> write)
    {
        var root = Path.Combine(output, "checkpoints");
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, $"step-{step:D6}");
        WriteDurably(final, write);
        foreach (var old in Directories(root).SkipLast(Math.Max(1, keep))) Directory.Delete(old, true);
        return final;
    }

    /// <summary>
    /// write(tmp), then the manifest, every file flushed to disk, the rename to <paramref name="final"/>, and the parent
    /// directory flushed. Any failure (a full disk) removes the temporary directory and leaves <paramref name="final"/>'s
    /// previous content as it was until the rename.
    /// </summary>
    private static void WriteDurably(string final, Action<string> write)
    {
        var tmp = final + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try
        {
            write(tmp);
            WriteManifest(tmp);
        }
        catch
        {
            try { Directory.Delete(tmp, true); } catch (IOException) { }
            throw;
        }
        var parent = Path.GetDirectoryName(final)!;
        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        Interop.Posix.FsyncDirectory(parent);
    }

    /// <summary>manifest.json: each file's path (relative), size and SHA-256; every file, then the manifest, flushed to disk.</summary>
    private static void WriteManifest(string dir)
    {
        var files = new JsonArray();
        var manifest = Path.Combine(dir, ManifestName);
        foreach (var path in Directory.GetFiles(dir, "*", SearchOption.AllDirectories).Where(p => p != manifest).Order(StringComparer.Ordinal))
        {
            using (var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite)) fs.Flush(flushToDisk: true);
            files.Add(new JsonObject
            {
                ["path"] = Path.GetRelativePath(dir, path).Replace('\\', '/'),
                ["bytes"] = new FileInfo(path).Length,
                ["sha256"] = Sha256(path),
            });
        }
        using (var fs = new FileStream(manifest, FileMode.Create, FileAccess.Write))   // a copied directory may bring its own
        {
            var bytes = System.Text.Encoding.UTF8.GetBytes(new JsonObject { ["files"] = files }.ToJsonString());
            fs.Write(bytes);
            fs.Flush(flushToDisk: true);
        }
        Interop.Posix.FsyncDirectory(dir);
    }

    /// <summary>What is wrong with a checkpoint against its manifest, or null when it is intact (or predates manifests).</summary>
    public static string? VerifyManifest(string dir)
    {
        var manifest = Path.Combine(dir, ManifestName);
        if (!File.Exists(manifest))
            return File.Exists(Path.Combine(dir, "trainer_state.json")) ? null : $"no {ManifestName}"; // a checkpoint from before manifests
        JsonArray files;
        try { files = JsonNode.Parse(File.ReadAllText(manifest))!["files"]!.AsArray(); }
        catch (Exception e) when (e is JsonException or NullReferenceException or InvalidOperationException) { return $"{ManifestName} is unreadable"; }
        foreach (var f in files)
        {
            string rel = f!["path"]!.GetValue<string>();
            var path = Path.Combine(dir, rel);
            if (!File.Exists(path)) return $"{rel} is missing";
            long bytes = f["bytes"]!.GetValue<long>();
            if (new FileInfo(path).Length != bytes) return $"{rel} has {new FileInfo(path).Length} bytes, the manifest says {bytes}";
            if (Sha256(path) != f["sha256"]!.GetValue<string>()) return $"{rel} does not match its SHA-256";
        }
        return null;
    }

    private static string Sha256(string path)
    {
        using var fs = File.OpenRead(path);
        return Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(fs)).ToLowerInvariant();
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
    /// <remarks>The file is replaced whole (written beside it, then renamed) and only when lines go: a run killed while
    /// rewinding leaves the old file or the new one, never a truncated one (the random SIGKILL test found that).</remarks>
    public static List<T> RewindMetrics<T>(string metricsPath, int steps)
    {
        var lines = File.Exists(metricsPath) ? File.ReadAllLines(metricsPath).Where(l => l.Trim().Length > 0).ToList() : [];
        var kept = lines.Take(steps).ToList();
        if (kept.Count != lines.Count || !File.Exists(metricsPath))
        {
            var tmp = metricsPath + ".tmp";
            File.WriteAllLines(tmp, kept);
            File.Move(tmp, metricsPath, overwrite: true);
        }
        return [.. kept.Select(l => JsonSerializer.Deserialize<T>(l)!)];
    }

    /// <summary>Writes output/final through <paramref name="write"/> into a temporary directory, then renames it over the old one.</summary>
    public static string SaveFinal(string output, Action<string> write)
    {
        var final = Path.Combine(output, "final");
        WriteDurably(final, write);
        return final;
    }

    /// <summary>
    /// The base a run's lean checkpoints name for their frozen tensors: the one the checkpoint being resumed names
    /// (refused, naming it, when its content changed), else the model the run starts from.
    /// </summary>
    /// <param name="trained">The tensors this run trains: a lean checkpoint written with another set is refused (what it
    /// trained would silently fall back to the base on the next resume).</param>
    public static Checkpoint.BaseReference BaseOf(string? resume, string model, IEnumerable<string> trained)
    {
        using var lean = resume is null ? null : Checkpoint.Open(resume);
        if (lean?.Base is not { } reference) return new Checkpoint.BaseReference(Path.GetFullPath(model), Checkpoint.ContentHash(model)); // a fresh run or a full checkpoint
        var held = lean.OwnNames.ToHashSet(StringComparer.Ordinal);
        var now = trained.ToHashSet(StringComparer.Ordinal);
        if (!held.SetEquals(now))
        {
            var extra = held.Except(now).Order(StringComparer.Ordinal).ToList();
            var missing = now.Except(held).Order(StringComparer.Ordinal).ToList();
            throw new CheckpointException($"{resume}: the checkpoint holds the tensors its run trained; this run trains another set ({(extra.Count > 0 ? $"no longer {extra.Count} such as '{extra[0]}'" : "")}{(extra.Count > 0 && missing.Count > 0 ? ", " : "")}{(missing.Count > 0 ? $"{missing.Count} more such as '{missing[0]}'" : "")}); resume with the same trainable setting or use another output directory");
        }
        return reference;
    }

    /// <summary>Copies the tokenizer's and generation files of <paramref name="source"/> (<see cref="CheckpointExport.SideFiles"/>) into <paramref name="destination"/>.</summary>
    public static void CopySideFiles(string source, string destination)
    {
        foreach (var f in CheckpointExport.SideFiles(source)) File.Copy(f, Path.Combine(destination, Path.GetFileName(f)), overwrite: true);
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
        if (opt.KeepsOwnFile) return opt.StepCount;   // each rank writes its own (SaveOwnOptimizer)
        var (step, moments) = opt.Export();
        WriteMoments(Path.Combine(dir, "optimizer.safetensors"), moments);
        return step;
    }

    private static void WriteMoments(string path, IReadOnlyList<(string Name, int[] Shape, float[] M, float[] V)> moments) =>
        SafetensorsFile.Write(path, moments.SelectMany(m => new[] { (m.Name + ".exp_avg", m.Shape, m.M), (m.Name + ".exp_avg_sq", m.Shape, m.V) }));

    /// <summary>
    /// This rank's optimiser state in its own file (<see cref="AdamWOptimizer.OwnFile"/>): a ZeRO-1 shard (master and
    /// moments), or with tensor parallelism the moments of this rank's slices. Every rank writes one.
    /// </summary>
    public static void SaveOwnOptimizer(string dir, AdamWOptimizer opt)
    {
        var path = Path.Combine(dir, opt.OwnFile);
        if (!opt.Sharded)
        {
            WriteMoments(path, opt.Export().Moments);
            return;
        }
        var (_, master, m, v) = opt.ExportShard();   // the step is trainer_state.json's optimizer_step
        SafetensorsFile.Write(path, [("master", [master.Length], master), ("exp_avg", [m.Length], m), ("exp_avg_sq", [v.Length], v)]);
    }

    public static void LoadOptimizer(string dir, AdamWOptimizer opt, int step)
    {
        var path = Path.Combine(dir, opt.KeepsOwnFile ? opt.OwnFile : "optimizer.safetensors");
        if (!File.Exists(path))
            throw new InvalidDataException(opt.KeepsOwnFile
                ? $"checkpoint {dir} has no {opt.OwnFile}: it was written by another number of ranks, another tensor-parallel size, or without parallel.shard_optimizer; resume it as it was written"
                : $"checkpoint {dir} has no optimizer.safetensors (it was written with parallel.shard_optimizer or tensor parallelism: resume it as it was written)");
        using var file = SafetensorsFile.Open(path);
        if (opt.Sharded)
        {
            opt.ImportShard(step, file.ReadFloats("master"), file.ReadFloats("exp_avg"), file.ReadFloats("exp_avg_sq"));
            return;
        }
        var moments = opt.ParameterNames.ToDictionary(n => n, n => (file.ReadFloats(n + ".exp_avg"), file.ReadFloats(n + ".exp_avg_sq")));
        opt.Import(step, moments);
    }
}
