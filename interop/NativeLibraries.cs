using System.Reflection;
using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>Thrown when none of the versioned names of a native library could be loaded.</summary>
public sealed class NativeLibraryNotFoundException : DllNotFoundException
{
    public NativeLibraryNotFoundException(string library, string envVariable, IReadOnlyList<string> tried, IReadOnlyList<string> reasons)
        : base($"Could not load {library}. Tried, in order: {string.Join(", ", tried)}. " +
               $"Set {envVariable} to the full path of the library to override the search." +
               (reasons.Count > 0 ? " Loader messages: " + string.Join(" | ", reasons) : ""))
    {
        Library = library;
        Tried = tried;
    }

    public string Library { get; }
    public IReadOnlyList<string> Tried { get; }
}

/// <summary>One native library found by probing versioned names, with an environment-variable override.</summary>
public sealed class NativeLibrarySpec
{
    private readonly object _gate = new();
    private IntPtr _handle;

    public NativeLibrarySpec(string logicalName, string envVariable, params string[] candidates)
    {
        LogicalName = logicalName;
        EnvVariable = envVariable;
        Candidates = candidates;
    }

    /// <summary>The name used in LibraryImport attributes; resolved by <see cref="NativeLibraries"/>.</summary>
    public string LogicalName { get; }
    public string EnvVariable { get; }
    public IReadOnlyList<string> Candidates { get; }

    /// <summary>The names that would be tried now: the override (if set) first, then the versioned names.</summary>
    public IReadOnlyList<string> SearchOrder()
    {
        var over = Environment.GetEnvironmentVariable(EnvVariable);
        return string.IsNullOrWhiteSpace(over) ? Candidates : [over, .. Candidates];
    }

    public bool IsLoaded => _handle != IntPtr.Zero;

    /// <summary>Loads the library (once) or throws <see cref="NativeLibraryNotFoundException"/> listing every name tried.</summary>
    public IntPtr Handle
    {
        get
        {
            if (_handle != IntPtr.Zero) return _handle;
            lock (_gate)
            {
                if (_handle == IntPtr.Zero) _handle = Probe(SearchOrder());
                return _handle;
            }
        }
    }

    /// <summary>True when the library can be loaded here; never throws.</summary>
    public bool TryLoad(out string? error)
    {
        try { _ = Handle; error = null; return true; }
        catch (NativeLibraryNotFoundException e) { error = e.Message; return false; }
    }

    private IntPtr Probe(IReadOnlyList<string> names)
    {
        var reasons = new List<string>();
        foreach (var name in names)
        {
            try { return NativeLibrary.Load(name); }
            catch (DllNotFoundException e) { reasons.Add(e.Message.Split('\n')[0]); }
            catch (BadImageFormatException e) { reasons.Add($"{name}: {e.Message}"); }
        }
        throw new NativeLibraryNotFoundException(LogicalName, EnvVariable, names, reasons);
    }

    /// <summary>True when the loaded library exports <paramref name="entryPoint"/>.</summary>
    public bool HasExport(string entryPoint) => NativeLibrary.TryGetExport(Handle, entryPoint, out _);
}

/// <summary>
/// The native libraries of the engine and the resolver that maps their logical names (used in every
/// LibraryImport) to the probed file.
/// </summary>
public static class NativeLibraries
{
    public static readonly NativeLibrarySpec Cuda = new("r1v2_cuda", "R1V2_LIBCUDA", "libcuda.so.1", "libcuda.so", "nvcuda.dll");

    public static readonly NativeLibrarySpec Nvrtc = new("r1v2_nvrtc", "R1V2_LIBNVRTC",
        "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so",
        "nvrtc64_130_0.dll", "nvrtc64_120_0.dll", "nvrtc64_112_0.dll");

    public static readonly NativeLibrarySpec Cublas = new("r1v2_cublas", "R1V2_LIBCUBLAS",
        "libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so",
        "cublas64_13.dll", "cublas64_12.dll", "cublas64_11.dll");

    public static readonly NativeLibrarySpec CublasLt = new("r1v2_cublaslt", "R1V2_LIBCUBLASLT",
        "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so",
        "cublasLt64_13.dll", "cublasLt64_12.dll", "cublasLt64_11.dll");

    /// <summary>MPI (Open MPI 4/5 from Debian or a cluster module; MPICH-family libraries by their usual names).</summary>
    public static readonly NativeLibrarySpec Mpi = new("r1v2_mpi", "R1V2_LIBMPI", "libmpi.so.40", "libmpi.so.12", "libmpi.so");

    /// <summary>NCCL for collectives on CUDA tensors (NGC container, NVIDIA's apt repository, or the nvidia-nccl-cu12 wheel's lib directory).</summary>
    public static readonly NativeLibrarySpec Nccl = new("r1v2_nccl", "R1V2_LIBNCCL", "libnccl.so.2", "libnccl.so");

    public static IReadOnlyList<NativeLibrarySpec> All { get; } = [Cuda, Nvrtc, Cublas, CublasLt, Mpi, Nccl];

    /// <summary>What the CUDA backend needs.</summary>
    public static IReadOnlyList<NativeLibrarySpec> CudaStack { get; } = [Cuda, Nvrtc, Cublas, CublasLt];

    private static int _installed;

    /// <summary>Installs the resolver for this assembly; called by every binding class's static constructor.</summary>
    internal static void EnsureResolver()
    {
        if (Interlocked.Exchange(ref _installed, 1) == 1) return;
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);
    }

    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
    {
        foreach (var lib in All)
            if (lib.LogicalName == name) return lib.Handle; // throws NativeLibraryNotFoundException with the list
        return IntPtr.Zero;
    }

    /// <summary>Entry-point names of every LibraryImport in <paramref name="bindings"/> (for export checks).</summary>
    public static IEnumerable<string> EntryPoints(Type bindings) =>
        bindings.GetMethods(BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic)
            .Select(m => m.GetCustomAttribute<LibraryImportAttribute>())
            .Where(a => a is not null)
            .Select(a => a!.EntryPoint!)
            .Distinct();
}
