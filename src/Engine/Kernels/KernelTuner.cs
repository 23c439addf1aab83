using System.Text.Json;
using System.Text.Json.Nodes;

namespace R1V2.Native.Engine.Kernels;

/// <summary>One variant's outcome: its time, or why it was set aside (it failed its check against the CPU twin, or did not compile).</summary>
public sealed record VariantResult(KernelVariant Variant, double? Milliseconds, string? Rejected);

/// <summary>A family's winner and every variant tried.</summary>
public sealed record FamilyChoice(string Family, KernelVariant Variant, double? Milliseconds, IReadOnlyList<VariantResult> Tried);

/// <summary>What the tuner asks of a device: whether a variant computes what the CPU twin does, and how long it takes.</summary>
public interface IVariantRunner
{
    /// <summary>Null when the variant's results equal the CPU twin's on a small input (within the op's tolerance), else what differs.</summary>
    string? Check(string family, KernelVariant variant);

    /// <summary>The variant's time in milliseconds at the shapes being tuned for.</summary>
    double Time(string family, KernelVariant variant);
}

/// <summary>
/// The search of `engine tune`: every variant of a family's space is checked against the CPU twin first (a variant
/// that computes something else never wins, however fast) and timed; the fastest checked one is the family's choice.
/// A family whose every variant fails keeps its default, and says so.
/// </summary>
public static class KernelTuner
{
    public static FamilyChoice Tune(string family, IVariantRunner runner, IReadOnlyList<KernelVariant>? space = null)
    {
        var tried = new List<VariantResult>();
        foreach (var variant in space ?? KernelTuning.Space(family))
        {
            string? problem;
            try { problem = runner.Check(family, variant); }
            catch (Exception e) when (e is not OutOfMemoryException) { problem = $"{e.GetType().Name}: {e.Message}"; }
            if (problem is not null)
            {
                tried.Add(new VariantResult(variant, null, problem));
                continue;
            }
            tried.Add(new VariantResult(variant, runner.Time(family, variant), null));
        }
        var best = tried.Where(t => t.Milliseconds is not null).OrderBy(t => t.Milliseconds).ThenBy(t => t.Variant.Block).ThenBy(t => t.Variant.Kept).FirstOrDefault();
        return best is null
            ? new FamilyChoice(family, KernelTuning.DefaultVariant(family), null, tried)
            : new FamilyChoice(family, best.Variant, best.Milliseconds, tried);
    }
}

/// <summary>
/// Where tuned launch parameters apply: one GPU model (name and compute capability), driver and NVRTC versions, and a
/// shape bucket (the standard shapes, or a model's: "hidden-5120"). A result carried to another GPU, driver or
/// compiler is not trusted: the key leaves it unused.
/// </summary>
public sealed record TuningKey(string Gpu, string ComputeCapability, int Driver, string Nvrtc, string ShapeBucket)
{
    public const string StandardShapes = "standard";

    public string FileName
    {
        get
        {
            static string Clean(string s) => new string(s.Select(c => char.IsLetterOrDigit(c) || c is '.' or '-' ? char.ToLowerInvariant(c) : '-').ToArray()).Trim('-');
            return $"{Clean(Gpu)}-sm{Clean(ComputeCapability)}-driver{Driver}-nvrtc{Clean(Nvrtc)}-{Clean(ShapeBucket)}.json";
        }
    }

    /// <summary>The bucket of a model's shapes: its decoder width.</summary>
    public static string BucketOf(int hiddenSize) => $"hidden-{hiddenSize}";
}

/// <summary>
/// The tuning cache: one JSON file per <see cref="TuningKey"/> under <c>R1V2_TUNING_CACHE</c> or
/// ~/.cache/r1v2-native/tuning, holding each family's chosen block size and the times behind it. Reading is forgiving:
/// a missing file means the defaults; a file that is unreadable, or names an unknown family or an invalid value, is
/// reported (naming the file and what is wrong) and the defaults are used.
/// </summary>
public sealed class TuningCache(string? directory = null)
{
    public string Directory { get; } = directory ?? DefaultDirectory();

    public static string DefaultDirectory() =>
        Environment.GetEnvironmentVariable("R1V2_TUNING_CACHE") is { Length: > 0 } env ? env
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "r1v2-native", "tuning");

    public string PathOf(TuningKey key) => Path.Combine(Directory, key.FileName);

    /// <summary>Writes the choices of <paramref name="key"/> (merged over what the file already holds), atomically.</summary>
    public string Save(TuningKey key, IReadOnlyList<FamilyChoice> choices)
    {
        System.IO.Directory.CreateDirectory(Directory);
        var path = PathOf(key);
        var variants = new Dictionary<string, KernelVariant>();
        if (File.Exists(path) && TryRead(path, out var existing, out _)) foreach (var (f, v) in existing) variants[f] = v;
        foreach (var c in choices) variants[c.Family] = c.Variant;
        var doc = new JsonObject
        {
            ["key"] = JsonSerializer.SerializeToNode(key),
            // A block size alone as a number; with kept values as "block x kept" (e.g. "256x16").
            ["blocks"] = new JsonObject(variants.OrderBy(b => b.Key, StringComparer.Ordinal)
                .Select(b => KeyValuePair.Create(b.Key, b.Value.Kept == 0 ? (JsonNode?)b.Value.Block : b.Value.ToString()))),
            ["tried"] = JsonSerializer.SerializeToNode(choices),
        };
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, doc.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
        return path;
    }

    /// <summary>The tuning for <paramref name="key"/>: the cached choices over the defaults, or the defaults (with a warning when the file is bad).</summary>
    public KernelTuning Load(TuningKey key, Action<string>? warn = null)
    {
        var path = PathOf(key);
        if (!File.Exists(path)) return KernelTuning.Default;
        if (!TryRead(path, out var blocks, out var problem))
        {
            warn?.Invoke($"{path}: {problem}; using the default launch parameters (run engine tune again to replace it)");
            return KernelTuning.Default;
        }
        try { return new KernelTuning(blocks); }
        catch (ArgumentException e)
        {
            warn?.Invoke($"{path}: {e.Message}; using the default launch parameters (run engine tune again to replace it)");
            return KernelTuning.Default;
        }
    }

    private static bool TryRead(string path, out Dictionary<string, KernelVariant> blocks, out string? problem)
    {
        blocks = [];
        problem = null;
        try
        {
            if (JsonNode.Parse(File.ReadAllText(path)) is not JsonObject root || root["blocks"] is not JsonObject b)
            {
                problem = "no \"blocks\" object";
                return false;
            }
            foreach (var (family, value) in b)
            {
                if (value is JsonValue v && v.TryGetValue<int>(out int block)) blocks[family] = block;
                else if (value is JsonValue s && s.TryGetValue<string>(out var text) && KernelVariant.TryParse(text, out var variant)) blocks[family] = variant;
                else
                {
                    problem = $"the variant of '{family}' is neither a block size (an integer) nor \"block x kept\" (e.g. \"256x16\")";
                    return false;
                }
            }
            return true;
        }
        catch (Exception e) when (e is JsonException or IOException or InvalidOperationException)
        {
            problem = $"unreadable ({e.Message})";
            return false;
        }
    }
}
