namespace R1V2.Native.Engine.Checkpoints;

/// <summary>What an export wrote.</summary>
public sealed record ExportResult(string Source, string Output, int Tensors, long Bytes, int Shards, string DType, IReadOnlyList<string> SideFiles);

/// <summary>
/// A checkpoint (full or lean: a lean one's frozen tensors come from its base) written out whole in the HF InternVL
/// layout: every tensor in one dtype (bf16 by default, the release format), shards of at most 5 GB named
/// model-0000i-of-0000n.safetensors with model.safetensors.index.json (one file, model.safetensors, when it fits),
/// config.json and the tokenizer's and generation files copied. One tensor at a time passes through the host.
/// </summary>
public static class CheckpointExport
{
    public const long ShardBytes = 5_000_000_000;

    /// <summary>Files of a checkpoint directory that are the training run's own and never exported.</summary>
    private static readonly HashSet<string> RunFiles = new(StringComparer.Ordinal)
        { Checkpoint.BaseFile, Checkpoint.IndexFile, "manifest.json", "trainer_state.json", "optimizer.safetensors", "buffer.bin" };

    public static ExportResult Export(string source, string output, string dtype = "BF16", long shardBytes = ShardBytes)
    {
        if (dtype is not ("BF16" or "F32")) throw new ArgumentException($"export dtype must be BF16 or F32, not {dtype}");
        if (!File.Exists(Path.Combine(source, "config.json"))) throw new CheckpointException($"{source}: no config.json; expected a checkpoint directory");
        if (Path.GetFullPath(source) == Path.GetFullPath(output)) throw new CheckpointException($"{output}: the export must go to another directory than its source");
        using var checkpoint = Checkpoint.Open(source);
        var names = checkpoint.Names.Order(StringComparer.Ordinal).ToList();
        var layout = names.Select(n => (n, checkpoint.Info(n).Shape.Select(d => checked((int)d)).ToArray())).ToList();
        var tmp = output.TrimEnd('/', '\\') + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try
        {
            Checkpoint.SaveStreamed(tmp, layout, i => checkpoint.Read(layout[i].n, layout[i].Item2), dtype, shardBytes);
            var copied = new List<string>();
            foreach (var f in Directory.GetFiles(source))
            {
                var name = Path.GetFileName(f);
                if (RunFiles.Contains(name) || name.EndsWith(".safetensors", StringComparison.Ordinal) || name.Contains(".tmp-", StringComparison.Ordinal)) continue;
                File.Copy(f, Path.Combine(tmp, name));
                copied.Add(name);
            }
            if (Directory.Exists(output)) Directory.Delete(output, true);
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
