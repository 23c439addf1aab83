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

    /// <summary>
    /// The files beside a model's weights and config.json that an HF checkpoint carries: the tokenizer's files,
    /// generation and preprocessing settings, chat templates and remote code (never the run's own state).
    /// </summary>
    public static IEnumerable<string> SideFiles(string directory) =>
        Directory.Exists(directory)
            ? Directory.GetFiles(directory).Where(f => Path.GetFileName(f) is var n && !n.Contains(".tmp-", StringComparison.Ordinal)
                && (n.StartsWith("tokenizer", StringComparison.Ordinal) || n.StartsWith("chat_template", StringComparison.Ordinal) || n.EndsWith(".py", StringComparison.Ordinal)
                    || n is "special_tokens_map.json" or "generation_config.json" or "vocab.json" or "merges.txt" or "added_tokens.json" or "preprocessor_config.json"))
            : [];

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
        foreach (var read in checkpoint.Chain)
            if (IsWithin(read, full)) throw new CheckpointException($"{output}: the export would write over {read}, which it reads");
        var names = checkpoint.Names.Order(StringComparer.Ordinal).ToList();
        var layout = names.Select(n => (n, checkpoint.Info(n).Shape.Select(d => checked((int)d)).ToArray())).ToList();
        var tmp = output.TrimEnd('/', '\\') + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try
        {
            Checkpoint.SaveStreamed(tmp, layout, i => checkpoint.Read(layout[i].n, layout[i].Item2), dtype, shardBytes);
            // config.json from the source; the side files from the source first, then what its bases add (a lean
            // checkpoint carries tokenizer.json; its base has tokenizer_config.json, generation_config.json, remote code).
            File.Copy(Path.Combine(source, "config.json"), Path.Combine(tmp, "config.json"));
            var copied = new List<string> { "config.json" };
            foreach (var dir in checkpoint.Chain)
                foreach (var f in SideFiles(dir).Where(f => !copied.Contains(Path.GetFileName(f))))
                {
                    File.Copy(f, Path.Combine(tmp, Path.GetFileName(f)));
                    copied.Add(Path.GetFileName(f));
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
