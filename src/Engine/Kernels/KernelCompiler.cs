using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Kernels;

/// <summary>Resource use of one compiled kernel, from ptxas' verbose report.</summary>
public sealed record KernelResources(string Kernel, string Arch, int Registers, int SpillStoreBytes, int SpillLoadBytes, int StaticSharedBytes, int StackBytes);

/// <summary>A compiled family: the image to load, whether it came from the cache, and ptxas' per-kernel report.</summary>
public sealed record CompiledFamily(string Family, string Arch, byte[] Image, bool IsCubin, bool FromCache, string Log, IReadOnlyList<KernelResources> Kernels);

/// <summary>
/// Compiles kernel families with NVRTC for one arch with fixed options, and caches images on disk. The cache key
/// hashes the source, every header, the options, the NVRTC version and the arch; an entry is written to a temporary
/// file then renamed, and carries a checksum so that a truncated or corrupt entry is recompiled, never loaded.
/// </summary>
public sealed class KernelCompiler
{
    private static readonly byte[] Magic = "R1V2KC01"u8.ToArray();

    public KernelCompiler(string? cacheDirectory = null, KernelTuning? tuning = null)
    {
        CacheDirectory = cacheDirectory ?? DefaultCacheDirectory();
        Tuning = tuning ?? KernelTuning.Default;
    }

    public string CacheDirectory { get; }
    public KernelTuning Tuning { get; }

    /// <summary>R1V2_KERNEL_CACHE, else $XDG_CACHE_HOME/r1v2-native/kernels, else ~/.cache/r1v2-native/kernels.</summary>
    public static string DefaultCacheDirectory()
    {
        var env = Environment.GetEnvironmentVariable("R1V2_KERNEL_CACHE");
        if (!string.IsNullOrWhiteSpace(env)) return env;
        var xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        var root = !string.IsNullOrWhiteSpace(xdg) ? xdg : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(root, "r1v2-native", "kernels");
    }

    /// <summary>The fixed NVRTC options for <paramref name="arch"/> (e.g. "sm_90").</summary>
    public IReadOnlyList<string> Options(string family, string arch, bool cubin, Version? nvrtc = null)
    {
        var target = cubin ? arch : arch.Replace("sm_", "compute_", StringComparison.Ordinal);
        // NVRTC 12.9 and later keep their own cache of compiled programs and print no ptxas report for a program served
        // from it; the engine caches images itself, so NVRTC's cache is turned off to keep the report.
        string[] noCache = nvrtc is not null && nvrtc >= new Version(12, 9) ? ["--no-cache"] : [];
        return [$"-arch={target}", "-std=c++17", "--ptxas-options=-v", "-DNDEBUG", .. noCache, .. Tuning.Defines(family)];
    }

    /// <summary>Parses "sm_80" / "80" / "8.0" into a compute capability number (80).</summary>
    public static int ParseArch(string arch)
    {
        var s = arch.Trim().ToLowerInvariant().Replace("sm_", "").Replace("compute_", "").Replace(".", "");
        return int.TryParse(s, out var cc) && cc >= 50 && cc < 200
            ? cc
            : throw new ArgumentException($"'{arch}' is not a GPU arch; expected a form like sm_80 or sm_90");
    }

    /// <summary>
    /// The target for a device of compute capability <paramref name="cc"/>: a CUBIN for it when this NVRTC knows the
    /// arch, else PTX for the newest arch it knows (the driver JIT-compiles it), and an error when it knows none below.
    /// </summary>
    public static (string Arch, bool Cubin) TargetFor(int cc, IReadOnlyList<int> supported)
    {
        if (supported.Contains(cc)) return ($"sm_{cc}", true);
        var below = supported.Where(a => a <= cc).DefaultIfEmpty(-1).Max();
        if (below < 0) throw new InvalidOperationException($"NVRTC supports archs {string.Join(", ", supported)}; none runs on sm_{cc}");
        return ($"sm_{below}", false);
    }

    public CompiledFamily Compile(string family, string arch, bool cubin = true)
    {
        var source = KernelSources.Source(family);
        var nvrtcVersion = Nvrtc.Version();
        var options = Options(family, arch, cubin, nvrtcVersion);
        var key = CacheKey(family, source, options, nvrtcVersion, arch, cubin);
        var path = Path.Combine(CacheDirectory, $"{family}-{arch}-{key[..16]}.{(cubin ? "cubin" : "ptx")}.bin");

        if (TryReadCache(path, out var cachedImage, out var cachedLog))
            return new CompiledFamily(family, arch, cachedImage, cubin, FromCache: true, cachedLog, ParseReport(cachedLog, arch));

        NvrtcResult result;
        try
        {
            result = Nvrtc.Compile(source, $"{family}.cu", KernelSources.Headers, options, cubin);
        }
        catch (NvrtcCompileException e)
        {
            throw new NvrtcCompileException($"kernels/{family}.cu for {arch}", e.Log);
        }
        var warnings = Warnings(result.Log);
        if (warnings.Count > 0)
            throw new NvrtcCompileException($"kernels/{family}.cu for {arch} (warnings are errors)", string.Join("\n", warnings));
        WriteCache(path, result.Image, result.Log);
        return new CompiledFamily(family, arch, result.Image, cubin, FromCache: false, result.Log, ParseReport(result.Log, arch));
    }

    /// <summary>Compiles every family for <paramref name="arch"/>.</summary>
    public IReadOnlyList<CompiledFamily> CompileAll(string arch, bool cubin = true) =>
        KernelSources.Families.Keys.Select(f => Compile(f, arch, cubin)).ToList();

    /// <summary>Lines of the NVRTC log that are compiler or ptxas warnings.</summary>
    public static IReadOnlyList<string> Warnings(string log) =>
        log.Split('\n').Where(l => l.Contains("warning", StringComparison.OrdinalIgnoreCase)).Select(l => l.TrimEnd()).ToList();

    private static string CacheKey(string family, string source, IReadOnlyList<string> options, Version nvrtc, string arch, bool cubin)
    {
        var sb = new StringBuilder();
        sb.Append(family).Append('\0').Append(source).Append('\0');
        foreach (var (name, text) in KernelSources.Headers) sb.Append(name).Append('\0').Append(text).Append('\0');
        sb.Append(string.Join(' ', options)).Append('\0').Append(nvrtc).Append('\0').Append(arch).Append(cubin ? "cubin" : "ptx");
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(sb.ToString())));
    }

    // Entry layout: magic, int32 image length, int32 log length, image, log (UTF-8), SHA-256 of everything before it.
    private static bool TryReadCache(string path, out byte[] image, out string log)
    {
        image = [];
        log = "";
        byte[] bytes;
        try
        {
            if (!File.Exists(path)) return false;
            bytes = File.ReadAllBytes(path);
        }
        catch (IOException) { return false; }
        catch (UnauthorizedAccessException) { return false; }

        const int header = 16, hash = 32;
        if (bytes.Length < header + hash || !bytes.AsSpan(0, 8).SequenceEqual(Magic)) return false;
        int imageLength = BitConverter.ToInt32(bytes, 8), logLength = BitConverter.ToInt32(bytes, 12);
        if (imageLength <= 0 || logLength < 0 || (long)header + imageLength + logLength + hash != bytes.Length) return false;
        var body = bytes.AsSpan(0, bytes.Length - hash);
        if (!SHA256.HashData(body).AsSpan().SequenceEqual(bytes.AsSpan(bytes.Length - hash))) return false;
        image = bytes.AsSpan(header, imageLength).ToArray();
        log = Encoding.UTF8.GetString(bytes, header + imageLength, logLength);
        return true;
    }

    private static void WriteCache(string path, byte[] image, string log)
    {
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            var logBytes = Encoding.UTF8.GetBytes(log);
            using var ms = new MemoryStream();
            ms.Write(Magic);
            ms.Write(BitConverter.GetBytes(image.Length));
            ms.Write(BitConverter.GetBytes(logBytes.Length));
            ms.Write(image);
            ms.Write(logBytes);
            ms.Write(SHA256.HashData(ms.ToArray()));
            var tmp = path + "." + Environment.ProcessId + "." + Guid.NewGuid().ToString("N")[..8] + ".tmp";
            File.WriteAllBytes(tmp, ms.ToArray());
            File.Move(tmp, path, overwrite: true);
        }
        catch (IOException) { /* a read-only or full cache only costs a recompile next time */ }
        catch (UnauthorizedAccessException) { }
    }

    private static readonly Regex EntryLine = new(@"Compiling entry function '([^']+)' for '([^']+)'", RegexOptions.Compiled);
    private static readonly Regex SpillLine = new(@"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", RegexOptions.Compiled);
    private static readonly Regex UsedLine = new(@"Used (\d+) registers", RegexOptions.Compiled);
    private static readonly Regex SmemField = new(@"(\d+) bytes smem", RegexOptions.Compiled);

    /// <summary>Per-kernel registers, spills and static shared memory from ptxas' -v output (CUBIN builds only).</summary>
    public static IReadOnlyList<KernelResources> ParseReport(string log, string arch)
    {
        var list = new List<KernelResources>();
        string? kernel = null;
        int stack = 0, spillStores = 0, spillLoads = 0;
        foreach (var line in log.Split('\n'))
        {
            var e = EntryLine.Match(line);
            if (e.Success) { kernel = e.Groups[1].Value; stack = spillStores = spillLoads = 0; continue; }
            if (kernel is null) continue;
            var s = SpillLine.Match(line);
            if (s.Success)
            {
                stack = int.Parse(s.Groups[1].Value);
                spillStores = int.Parse(s.Groups[2].Value);
                spillLoads = int.Parse(s.Groups[3].Value);
                continue;
            }
            var u = UsedLine.Match(line);
            if (u.Success)
            {
                var sm = SmemField.Match(line); // "Used 40 registers, 128 bytes smem" or, newer, "..., used 1 barriers, 128 bytes smem"
                int smem = sm.Success ? int.Parse(sm.Groups[1].Value) : 0;
                list.Add(new KernelResources(kernel, arch, int.Parse(u.Groups[1].Value), spillStores, spillLoads, smem, stack));
                kernel = null;
            }
        }
        return list.OrderBy(k => k.Kernel, StringComparer.Ordinal).ToList();
    }
}
