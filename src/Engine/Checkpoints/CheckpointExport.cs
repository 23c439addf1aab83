namespace R1V2.Native.Engine.Checkpoints;

/// <summary>What an export wrote.</summary>
public sealed record ExportResult(string Source, string Output, int Tensors, long Bytes, int Shards, string DType, IReadOnlyList<string> SideFiles);

/// <summary>
/// A checkpoint (full or lean: a lean one's frozen tensors come from its base) written out whole in the HF InternVL
/// layout: every tensor in one dtype (bf16 by default, the release format), shards of at most 5 GB named
/// model-0000i-of-0000n.safetensors with model.safetensors.index.json (one file, model.safetensors, when it fits),
/// config.json and the tokenizer's, generation and remote-code files copied (from the source, then its bases). One
/// tensor at a time passes through the host. The output must be new or empty and may not hold the source or its bases.
/// </summary>
public static class CheckpointExport
{
    public const long ShardBytes = 5_000_000_000;

    /// <summary>Files of a checkpoint directory that are the training run's own and never exported.</summary>
    private static readonly HashSet<string> RunFiles = new(StringComparer.Ordinal)
        { Checkpoint.BaseFile, Checkpoint.IndexFile, "manifest.json", "trainer_state.json", "optimizer.safetensors", "buffer.bin" };

    /// <summary>Whether <paramref name="path"/> is <paramref name="directory"/> or lies inside it.</summary>
    private static bool IsWithin(string path, string directory)
    {
        var p = Path.GetFullPath(path).TrimEnd('/', '\\') + "/";
        return p.StartsWith(directory + "/", StringComparison.Ordinal);
    }

    public static ExportResult Export(string source, string output, string dtype = "BF16", long shardBytes = ShardBytes)
    {
        if (dtype is not ("BF16" or "F32")) throw new ArgumentException($"export dtype must be BF16 or F32, not {dtype}");
        if (!File.Exists(Path.Combine(source, "config.json"))) throw new CheckpointException($"{source}: no config.json; expected a checkpoint directory");
        string full = Path.GetFullPath(output).TrimEnd('/', '\\');
        if (Directory.Exists(output) && Directory.EnumerateFileSystemEntries(output).Any())
            throw new CheckpointException($"{output}: exists and is not empty; export into a new directory");
        using var checkpoint = Checkpoint.Open(source);
        for (var c = Path.GetFullPath(source); c is not null; c = Checkpoint.ReadBase(c)?.Path)
            if (IsWithin(c, full)) throw new CheckpointException($"{output}: the export would write over {c}, which it reads");
        var names = checkpoint.Names.Order(StringComparer.Ordinal).ToList();
        var layout = names.Select(n => (n, checkpoint.Info(n).Shape.Select(d => checked((int)d)).ToArray())).ToList();
        var tmp = output.TrimEnd('/', '\\') + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try
        {
            Checkpoint.SaveStreamed(tmp, layout, i => checkpoint.Read(layout[i].n, layout[i].Item2), dtype, shardBytes);
            // The source's own files first, then what its bases add (a lean checkpoint carries config.json and tokenizer.json;
            // its base has the rest: tokenizer_config.json, generation_config.json, remote code).
            var copied = new List<string>();
            for (var dir = source; dir is not null; dir = Checkpoint.ReadBase(dir)?.Path)
                foreach (var f in Directory.GetFiles(dir))
                {
                    var name = Path.GetFileName(f);
                    if (RunFiles.Contains(name) || name.EndsWith(".safetensors", StringComparison.Ordinal) || name.Contains(".tmp-", StringComparison.Ordinal)
                        || copied.Contains(name)) continue;
                    File.Copy(f, Path.Combine(tmp, name));
                    copied.Add(name);
                }
            if (Directory.Exists(output)) Directory.Delete(output); // empty, checked above
            Directory.Move(tmp, output);
            long bytes = layout.Sum(t => t.Item2.Aggregate(1L, (a, d) => a * d)) * (dtype == "F32" ? 4 : 2);
            int shards = Directory.GetFiles(output, "*.safetensors").Length;
            return new ExportResult(source, output, layout.Count, bytes, shards, dtype, copied);
        }
        catch
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
            throw;
        }
    }
}
