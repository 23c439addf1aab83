using System.Reflection;

namespace R1V2.Native.Engine.Kernels;

/// <summary>The CUDA sources embedded in this assembly: one family per .cu file, plus the shared headers.</summary>
public static class KernelSources
{
    private static readonly Lazy<(IReadOnlyDictionary<string, string> Families, IReadOnlyDictionary<string, string> Headers)> Loaded = new(Load);

    /// <summary>Family name (file stem, e.g. "rmsnorm") to source text.</summary>
    public static IReadOnlyDictionary<string, string> Families => Loaded.Value.Families;

    /// <summary>Header include name (e.g. "common.cuh") to text.</summary>
    public static IReadOnlyDictionary<string, string> Headers => Loaded.Value.Headers;

    public static string Source(string family) =>
        Families.TryGetValue(family, out var s) ? s : throw new ArgumentException($"no kernel family '{family}'; known: {string.Join(", ", Families.Keys)}");

    private static (IReadOnlyDictionary<string, string>, IReadOnlyDictionary<string, string>) Load()
    {
        var asm = typeof(KernelSources).Assembly;
        var families = new SortedDictionary<string, string>(StringComparer.Ordinal);
        var headers = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var name in asm.GetManifestResourceNames())
        {
            if (!name.StartsWith("kernels/", StringComparison.Ordinal)) continue;
            var file = name["kernels/".Length..];
            var text = Read(asm, name);
            if (file.EndsWith(".cu", StringComparison.Ordinal)) families[file[..^3]] = text;
            else if (file.EndsWith(".cuh", StringComparison.Ordinal)) headers[file] = text;
        }
        return (families, headers);
    }

    private static string Read(Assembly asm, string name)
    {
        using var s = asm.GetManifestResourceStream(name)!;
        using var r = new StreamReader(s);
        return r.ReadToEnd();
    }
}
