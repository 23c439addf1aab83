using System.Text.Json;
using System.Text.Json.Nodes;

namespace R1V2.Native.Engine.Backends.Cuda;

/// <summary>A kernel that reached a smaller share of the GPU's peak than its baseline did.</summary>
public sealed record KernelRegression(string Op, string Shape, double BaselinePercent, double NowPercent)
{
    public double Drop => 1 - NowPercent / BaselinePercent;
}

/// <summary>
/// The regression gate of `engine bench kernels`: each kernel's % of peak against a checked-in baseline of the same GPU
/// model (perf/baselines/&lt;gpu&gt;.json, the benchmark's own JSON), matched by op and shape. A kernel that falls by more
/// than the tolerance (5% of its baseline share) fails the run; kernels the baseline lacks are listed as new.
/// </summary>
public static class KernelBaseline
{
    public const double Tolerance = 0.05;

    /// <summary>perf/baselines/&lt;gpu name, lower case, dashes&gt;.json under <paramref name="root"/>.</summary>
    public static string PathFor(string gpuName, string root = "perf") =>
        Path.Combine(root, "baselines", new string(gpuName.Select(c => char.IsLetterOrDigit(c) ? char.ToLowerInvariant(c) : '-').ToArray()).Trim('-') + ".json");

    public static (List<KernelRegression> Regressions, List<string> New) Compare(IReadOnlyList<KernelTiming> now, IReadOnlyList<KernelTiming> baseline,
        double tolerance = Tolerance)
    {
        var byKey = baseline.GroupBy(t => (t.Op, t.Shape)).ToDictionary(g => g.Key, g => g.First());
        var regressions = new List<KernelRegression>();
        var fresh = new List<string>();
        foreach (var t in now)
        {
            if (!byKey.TryGetValue((t.Op, t.Shape), out var b)) { fresh.Add($"{t.Op} {t.Shape}"); continue; }
            if (t.PercentOfPeak < b.PercentOfPeak * (1 - tolerance)) regressions.Add(new KernelRegression(t.Op, t.Shape, b.PercentOfPeak, t.PercentOfPeak));
        }
        return (regressions, fresh);
    }

    /// <summary>A benchmark JSON (<see cref="KernelBenchmark.WriteJson"/>): its GPU's name and timings; a malformed file is an error naming it.</summary>
    public static (string Gpu, List<KernelTiming> Timings) Read(string path)
    {
        try
        {
            var root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new InvalidDataException($"{path}: not a JSON object");
            string gpu = root["device"]?["Name"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}: no device.Name");
            var timings = root["timings"]?.Deserialize<List<KernelTiming>>() ?? throw new InvalidDataException($"{path}: no timings");
            return (gpu, timings);
        }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a kernel benchmark JSON ({e.Message})", e); }
    }
}
