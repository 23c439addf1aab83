using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Checkpoints;

/// <summary>
/// The weights of a Hugging Face checkpoint directory: `model.safetensors`, or shards listed by
/// `model.safetensors.index.json` (weight_map: tensor name -> shard file). Every tensor is located once at open; reads
/// check the expected shape and name the file and tensor in every error.
/// </summary>
public sealed class Checkpoint : IDisposable
{
    public const string SingleFile = "model.safetensors";
    public const string IndexFile = "model.safetensors.index.json";

    public const string BaseFile = "base.json";

    private readonly List<SafetensorsFile> _files;
    private readonly Dictionary<string, SafetensorsFile> _where;
    private readonly Checkpoint? _base;

    private Checkpoint(string directory, List<SafetensorsFile> files, Dictionary<string, SafetensorsFile> where, Checkpoint? baseCheckpoint, BaseReference? reference)
    {
        Directory = directory;
        _files = files;
        _where = where;
        _base = baseCheckpoint;
        Base = reference;
    }

    public string Directory { get; }

    /// <summary>A lean checkpoint's base as base.json names it (verified against its hash when opened), or null for a full checkpoint.</summary>
    public BaseReference? Base { get; }

    /// <summary>The base a lean checkpoint layers over (its frozen tensors come from there), or null for a full checkpoint.</summary>
    public string? BaseDirectory => _base?.Directory;

    /// <summary>This checkpoint's directory, then its base's, and so on down the stack of lean checkpoints.</summary>
    public IEnumerable<string> Chain => _base is null ? [Directory] : [Directory, .. _base.Chain];

    /// <summary>The tensors stored in this directory itself (a lean checkpoint's trainable ones), not those of its base.</summary>
    public IEnumerable<string> OwnNames => _where.Where(kv => _files.Contains(kv.Value)).Select(kv => kv.Key);
    public IEnumerable<string> Names => _where.Keys;
    public bool Contains(string name) => _where.ContainsKey(name);

    /// <summary>
    /// Opens a checkpoint directory. A lean checkpoint (a training checkpoint that stores only what trains) holds
    /// base.json, naming its base checkpoint (path and <see cref="ContentHash"/>): every tensor it does not hold is
    /// read from the base, which is refused, naming it, when its content changed since the checkpoint was written.
    /// </summary>
    public static Checkpoint Open(string directory) => Open(directory, 0);

    /// <summary>How many lean checkpoints may stack on each other before base.json is taken for a cycle.</summary>
    public const int MaxBaseDepth = 16;

    private static Checkpoint Open(string directory, int depth)
    {
        if (depth > MaxBaseDepth) throw new CheckpointException($"{directory}: more than {MaxBaseDepth} checkpoints stacked through {BaseFile} (a cycle?)");
        var index = Path.Combine(directory, IndexFile);
        var single = Path.Combine(directory, SingleFile);
        var files = new List<SafetensorsFile>();
        var where = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
        try
        {
            if (File.Exists(index))
            {
                JsonObject map;
                try
                {
                    map = JsonNode.Parse(File.ReadAllText(index))?["weight_map"] as JsonObject
                          ?? throw new CheckpointException($"{index}: no weight_map object");
                }
                catch (JsonException e) { throw new CheckpointException($"{index}: not valid JSON ({e.Message})"); }
                var byShard = new Dictionary<string, SafetensorsFile>();
                foreach (var (name, node) in map)
                {
                    var shard = node?.GetValueKind() == JsonValueKind.String ? node.GetValue<string>() : throw new CheckpointException($"{index}: weight_map['{name}'] is not a file name");
                    if (shard.Contains('/') || shard.Contains('\\')) throw new CheckpointException($"{index}: weight_map['{name}'] = '{shard}' must be a file in the checkpoint directory");
                    if (!byShard.TryGetValue(shard, out var file))
                    {
                        file = SafetensorsFile.Open(Path.Combine(directory, shard));
                        files.Add(file);
                        byShard[shard] = file;
                    }
                    if (!file.Tensors.ContainsKey(name)) throw new CheckpointException($"{file.Path}: tensor '{name}' is listed in {IndexFile} but missing from the shard");
                    where[name] = file;
                }
                foreach (var file in files)
                    foreach (var name in file.Tensors.Keys)
                        if (!where.TryGetValue(name, out var owner) || owner != file)
                            throw new CheckpointException($"{file.Path}: tensor '{name}' is not listed for this shard in {IndexFile}");
            }
            else if (File.Exists(single))
            {
                var file = SafetensorsFile.Open(single);
                files.Add(file);
                foreach (var name in file.Tensors.Keys) where[name] = file;
            }
            else throw new CheckpointException($"{directory}: neither {SingleFile} nor {IndexFile} exists");
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
        Checkpoint? baseCheckpoint = null;
        BaseReference? reference;
        try
        {
            reference = ReadBase(directory);
            if (reference is not null)
            {
                baseCheckpoint = Open(reference.Path, depth + 1);
                foreach (var name in baseCheckpoint.Names)
                    if (!where.ContainsKey(name)) where[name] = baseCheckpoint._where[name];
            }
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
        return new Checkpoint(directory, files, where, baseCheckpoint, reference);
    }

    /// <summary>A lean checkpoint's base: its directory and the content hash it had when the checkpoint was written.</summary>
    public sealed record BaseReference(string Path, string Sha256);

    /// <summary>Writes base.json into <paramref name="directory"/>: the base's absolute path and content hash.</summary>
    public static void WriteBase(string directory, BaseReference reference) =>
        File.WriteAllText(System.IO.Path.Combine(directory, BaseFile), new JsonObject { ["path"] = reference.Path, ["sha256"] = reference.Sha256 }.ToJsonString());

    /// <summary>The base a directory's checkpoint layers over, checked against its recorded hash; null for a full checkpoint.</summary>
    public static BaseReference? ReadBase(string directory)
    {
        var path = System.IO.Path.Combine(directory, BaseFile);
        if (!File.Exists(path)) return null;
        string basePath, recorded;
        try
        {
            var json = JsonNode.Parse(File.ReadAllText(path));
            basePath = json?["path"]?.GetValueKind() == JsonValueKind.String ? json["path"]!.GetValue<string>() : throw new CheckpointException($"{path}: no \"path\" string naming the base checkpoint");
            recorded = json["sha256"]?.GetValueKind() == JsonValueKind.String ? json["sha256"]!.GetValue<string>() : throw new CheckpointException($"{path}: no \"sha256\" string");
        }
        catch (JsonException e) { throw new CheckpointException($"{path}: not valid JSON ({e.Message})"); }
        catch (InvalidOperationException) { throw new CheckpointException($"{path}: expected an object with \"path\" and \"sha256\" strings"); }
        if (!System.IO.Path.IsPathRooted(basePath)) basePath = System.IO.Path.GetFullPath(System.IO.Path.Combine(directory, basePath));
        if (!System.IO.Directory.Exists(basePath))
            throw new CheckpointException($"{directory}: its base checkpoint {basePath} (named in {BaseFile}) does not exist; the checkpoint holds only the trained tensors");
        var now = ContentHash(basePath);
        if (now != recorded)
            throw new CheckpointException($"{directory}: its base checkpoint {basePath} changed since this checkpoint was written (content hash {now[..12]}, recorded {recorded[..Math.Min(12, recorded.Length)]}); restore that base or start a new run");
        return new BaseReference(basePath, recorded);
    }

    /// <summary>
    /// A content hash of a checkpoint directory that does not read its weights in full: SHA-256 over config.json, the
    /// shard index, base.json (a lean base's own base), and for each safetensors file its name, size and header, and
    /// for every tensor in it the first and last 4 KiB of its data. Retraining any tensor (the adapter alone of a
    /// base, in the middle of its file) changes its bytes at both ends; a copy keeps the hash.
    /// </summary>
    public static string ContentHash(string directory)
    {
        using var sha = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        void Text(string s) { var b = System.Text.Encoding.UTF8.GetBytes(s + "\n"); sha.AppendData(b); }
        foreach (var name in new[] { "config.json", IndexFile, BaseFile })
        {
            var path = System.IO.Path.Combine(directory, name);
            Text(name);
            if (File.Exists(path)) sha.AppendData(File.ReadAllBytes(path));
        }
        foreach (var path in System.IO.Directory.GetFiles(directory, "*.safetensors").Where(p => System.IO.Path.GetFileName(p) != "optimizer.safetensors")
                     .Order(StringComparer.Ordinal))
        {
            Text($"{System.IO.Path.GetFileName(path)} {new FileInfo(path).Length}");
            using var file = SafetensorsFile.Open(path);
            foreach (var (name, info) in file.Tensors.OrderBy(t => t.Value.Begin))
            {
                Text($"{name} {info.DType} {info.ShapeString} {info.Begin} {info.End}");
                long bytes = info.End - info.Begin;
                const int edge = 4096;
                sha.AppendData(file.Bytes(name, 0, (int)Math.Min(edge, bytes)));
                if (bytes > edge) sha.AppendData(file.Bytes(name, Math.Max(edge, bytes - edge), (int)(bytes - Math.Max(edge, bytes - edge))));
            }
        }
        return Convert.ToHexString(sha.GetHashAndReset()).ToLowerInvariant();
    }

    /// <summary>Checks names and shapes against what the model expects, listing every problem at once.</summary>
    public void Validate(IReadOnlyDictionary<string, int[]> expected, IReadOnlyDictionary<string, int[]>? optional = null)
    {
        var problems = new List<string>();
        foreach (var (name, shape) in expected)
        {
            if (!_where.TryGetValue(name, out var file)) { problems.Add($"missing tensor '{name}' (expected [{string.Join(", ", shape)}])"); continue; }
            var info = file.Tensors[name];
            if (!info.Shape.SequenceEqual(shape.Select(d => (long)d)))
                problems.Add($"{Path.GetFileName(file.Path)}: tensor '{name}' has shape {info.ShapeString}, expected [{string.Join(", ", shape)}]");
            if (info.DType is not ("F32" or "BF16" or "F16"))
                problems.Add($"{Path.GetFileName(file.Path)}: tensor '{name}' is {info.DType}, expected F32, BF16 or F16");
        }
        foreach (var (name, shape) in optional ?? new Dictionary<string, int[]>())
            if (_where.TryGetValue(name, out var file) && !file.Tensors[name].Shape.SequenceEqual(shape.Select(d => (long)d)))
                problems.Add($"{Path.GetFileName(file.Path)}: tensor '{name}' has shape {file.Tensors[name].ShapeString}, expected [{string.Join(", ", shape)}]");
        foreach (var name in _where.Keys)
            if (!expected.ContainsKey(name) && optional?.ContainsKey(name) != true) problems.Add($"{Path.GetFileName(_where[name].Path)}: unexpected tensor '{name}'");
        if (problems.Count > 0)
            throw new CheckpointException($"{Directory}: the checkpoint does not match the model config:\n  " + string.Join("\n  ", problems));
    }

    /// <summary>
    /// Whether a NaN or an infinity in a weight is an error (the default) or let through, for inspecting a damaged
    /// checkpoint (<c>R1V2_ALLOW_NONFINITE_WEIGHTS=1</c>).
    /// </summary>
    public static bool AllowNonFiniteWeights { get; set; } = Environment.GetEnvironmentVariable("R1V2_ALLOW_NONFINITE_WEIGHTS") == "1";

    /// <summary>Reads a tensor as fp32, checking its shape and that every value is finite.</summary>
    public float[] Read(string name, int[] shape)
    {
        if (!_where.TryGetValue(name, out var file)) throw new CheckpointException($"{Directory}: missing tensor '{name}'");
        var info = file.Tensors[name];
        if (!info.Shape.SequenceEqual(shape.Select(d => (long)d)))
            throw new CheckpointException($"{file.Path}: tensor '{name}' has shape {info.ShapeString}, expected [{string.Join(", ", shape)}]");
        var values = file.ReadFloats(name);
        if (!AllowNonFiniteWeights && FirstNonFinite(values) is int at and >= 0)
            throw new CheckpointException($"{file.Path}: tensor '{name}' holds {values[at]} at element {at} (R1V2_ALLOW_NONFINITE_WEIGHTS=1 loads it anyway, for inspection)");
        return values;
    }

    /// <summary>
    /// Moves a tensor from the memory-mapped file to <paramref name="destination"/> (<see cref="Backends.Backend.UploadStored"/>:
    /// bytes of the destination's type go straight to the device, others through one staging slice), checking its
    /// shape and, slice by slice, that every value is finite. The host never holds the tensor.
    /// </summary>
    public void ReadInto(string name, int[] shape, Tensor destination)
    {
        if (!_where.TryGetValue(name, out var file)) throw new CheckpointException($"{Directory}: missing tensor '{name}'");
        var info = file.Tensors[name];
        if (!info.Shape.SequenceEqual(shape.Select(d => (long)d)))
            throw new CheckpointException($"{file.Path}: tensor '{name}' has shape {info.ShapeString}, expected [{string.Join(", ", shape)}]");
        if (info.DType is not ("F32" or "BF16" or "F16")) throw new CheckpointException($"{file.Path}: tensor '{name}' is {info.DType}; expected F32, BF16 or F16");
        int size = SafetensorInfo.ElementSize(info.DType);
        destination.Backend.UploadStored(destination, info.DType, info.Length, (offset, count) =>
        {
            var bytes = file.Bytes(name, offset, count);
            if (!AllowNonFiniteWeights && FirstNonFinite(bytes, info.DType) is int at and >= 0)
            {
                var v = bytes.Slice(at * size, size);
                float value = info.DType switch
                {
                    "F32" => BitConverter.ToSingle(v),
                    "BF16" => BFloat16.ToFloat(BitConverter.ToUInt16(v)),
                    _ => (float)BitConverter.ToHalf(v),
                };
                throw new CheckpointException($"{file.Path}: tensor '{name}' holds {value} at element {offset / size + at} (R1V2_ALLOW_NONFINITE_WEIGHTS=1 loads it anyway, for inspection)");
            }
            return bytes;
        });
    }

    /// <summary>The index of the first NaN or infinity among stored values of <paramref name="dtype"/>, or -1 (all-ones exponent bits).</summary>
    private static int FirstNonFinite(ReadOnlySpan<byte> bytes, string dtype)
    {
        switch (dtype)
        {
            case "F32": return FirstNonFinite(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes));
            case "BF16":
                var bf = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(bytes);
                for (int i = 0; i < bf.Length; i++) if ((bf[i] & 0x7f80) == 0x7f80) return i;
                return -1;
            default:
                var h = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(bytes);
                for (int i = 0; i < h.Length; i++) if ((h[i] & 0x7c00) == 0x7c00) return i;
                return -1;
        }
    }

    /// <summary>The index of the first NaN or infinity, or -1 (x - x is 0 for every finite x and NaN otherwise).</summary>
    private static int FirstNonFinite(ReadOnlySpan<float> values)
    {
        var v = System.Numerics.Vector<float>.Count;
        int i = 0;
        for (; i + v <= values.Length; i += v)
        {
            var x = new System.Numerics.Vector<float>(values[i..]);
            if (!System.Numerics.Vector.EqualsAll(x - x, System.Numerics.Vector<float>.Zero)) break;
        }
        for (; i < values.Length; i++) if (!float.IsFinite(values[i])) return i;
        return -1;
    }

    /// <summary>
    /// A frozen tensor's identity for sharing it on a device (<see cref="Layers.SharedFrozenParameters"/>): name, stored
    /// type, shape and a 128-bit xxHash of its stored bytes, read slice by slice from the mapped file.
    /// </summary>
    public Layers.SharedFrozenParameters.Key ContentKey(string name)
    {
        if (!_where.TryGetValue(name, out var file)) throw new CheckpointException($"{Directory}: missing tensor '{name}'");
        var info = file.Tensors[name];
        var hash = new System.IO.Hashing.XxHash128();
        long bytes = info.End - info.Begin;
        for (long at = 0; at < bytes; at += 1 << 26)
            hash.Append(file.Bytes(name, at, (int)Math.Min(1 << 26, bytes - at)));
        return new Layers.SharedFrozenParameters.Key(name, info.DType, info.ShapeString, hash.GetCurrentHashAsUInt128());
    }

    public SafetensorInfo Info(string name) =>
        _where.TryGetValue(name, out var f) ? f.Tensors[name] : throw new CheckpointException($"{Directory}: missing tensor '{name}'");

    /// <summary>
    /// Writes tensors as one file, or as shards of at most <paramref name="maxShardBytes"/> with an index, in the HF
    /// layout. Each file is written to a temporary name and renamed.
    /// </summary>
    public static void Save(string directory, IReadOnlyList<(string Name, int[] Shape, float[] Data)> tensors, string dtype = "F32", long maxShardBytes = CheckpointExport.ShardBytes) =>
        SaveStreamed(directory, [.. tensors.Select(t => (t.Name, t.Shape))], i => tensors[i].Data, dtype, maxShardBytes);

    /// <summary>
    /// <see cref="Save"/> with each tensor's values fetched by its index in <paramref name="layout"/> when it is
    /// written: the host holds one tensor at a time. Shards are model-0000i-of-0000n.safetensors with
    /// model.safetensors.index.json; a model that fits one shard is model.safetensors. Stale files of the other layout are removed.
    /// </summary>
    public static void SaveStreamed(string directory, IReadOnlyList<(string Name, int[] Shape)> layout, Func<int, float[]> data, string dtype = "F32",
        long maxShardBytes = CheckpointExport.ShardBytes)
    {
        System.IO.Directory.CreateDirectory(directory);
        int size = dtype == "F32" ? 4 : 2;
        var shards = new List<List<int>> { new() };
        long current = 0, total = 0;
        for (int i = 0; i < layout.Count; i++)
        {
            long bytes = layout[i].Shape.Aggregate(1L, (a, d) => a * d) * size;
            if (current > 0 && current + bytes > maxShardBytes) { shards.Add([]); current = 0; }
            shards[^1].Add(i);
            current += bytes;
            total += bytes;
        }
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        foreach (var stale in System.IO.Directory.GetFiles(directory, "model-*-of-*.safetensors")) File.Delete(stale);
        if (shards.Count == 1)
        {
            SafetensorsFile.WriteStreamed(Path.Combine(directory, SingleFile), [.. shards[0].Select(i => layout[i])], k => data(shards[0][k]), dtype, metadata);
            File.Delete(Path.Combine(directory, IndexFile));
            return;
        }
        var map = new JsonObject();
        for (int s = 0; s < shards.Count; s++)
        {
            var file = $"model-{s + 1:D5}-of-{shards.Count:D5}.safetensors";
            var shard = shards[s];
            SafetensorsFile.WriteStreamed(Path.Combine(directory, file), [.. shard.Select(i => layout[i])], k => data(shard[k]), dtype, metadata);
            foreach (var i in shard) map[layout[i].Name] = file;
        }
        var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = total }, ["weight_map"] = map };
        var path = Path.Combine(directory, IndexFile);
        File.WriteAllText(path + ".tmp", index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(path + ".tmp", path, overwrite: true);
        File.Delete(Path.Combine(directory, SingleFile));
    }

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
        _base?.Dispose();
    }
}
