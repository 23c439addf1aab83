using System.Text.Json;
using System.Text.Json.Nodes;

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

    private readonly List<SafetensorsFile> _files;
    private readonly Dictionary<string, SafetensorsFile> _where;

    private Checkpoint(string directory, List<SafetensorsFile> files, Dictionary<string, SafetensorsFile> where)
    {
        Directory = directory;
        _files = files;
        _where = where;
    }

    public string Directory { get; }
    public IEnumerable<string> Names => _where.Keys;
    public bool Contains(string name) => _where.ContainsKey(name);

    public static Checkpoint Open(string directory)
    {
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
        return new Checkpoint(directory, files, where);
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

    public SafetensorInfo Info(string name) =>
        _where.TryGetValue(name, out var f) ? f.Tensors[name] : throw new CheckpointException($"{Directory}: missing tensor '{name}'");

    /// <summary>
    /// Writes tensors as one file, or as shards of at most <paramref name="maxShardBytes"/> with an index, in the HF
    /// layout. Each file is written to a temporary name and renamed.
    /// </summary>
    public static void Save(string directory, IReadOnlyList<(string Name, int[] Shape, float[] Data)> tensors, string dtype = "F32", long maxShardBytes = 4L << 30)
    {
        System.IO.Directory.CreateDirectory(directory);
        int size = dtype == "F32" ? 4 : 2;
        var shards = new List<List<(string, int[], float[])>> { new() };
        long current = 0, total = 0;
        foreach (var t in tensors)
        {
            long bytes = t.Data.LongLength * size;
            if (current > 0 && current + bytes > maxShardBytes) { shards.Add([]); current = 0; }
            shards[^1].Add(t);
            current += bytes;
            total += bytes;
        }
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        if (shards.Count == 1)
        {
            SafetensorsFile.Write(Path.Combine(directory, SingleFile), shards[0], dtype, metadata);
            File.Delete(Path.Combine(directory, IndexFile));
            return;
        }
        var map = new JsonObject();
        for (int i = 0; i < shards.Count; i++)
        {
            var file = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            SafetensorsFile.Write(Path.Combine(directory, file), shards[i], dtype, metadata);
            foreach (var (name, _, _) in shards[i]) map[name] = file;
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
    }
}
