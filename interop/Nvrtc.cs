using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace R1V2.Native.Interop;

/// <summary>Output of one NVRTC compilation.</summary>
public sealed record NvrtcResult(byte[] Image, bool IsCubin, string Log);

/// <summary>Compilation failed; <see cref="Exception.Message"/> carries the NVRTC program log.</summary>
public sealed class NvrtcCompileException : Exception
{
    public NvrtcCompileException(string programName, string log)
        : base($"NVRTC could not compile {programName}:\n{log}")
    {
        ProgramName = programName;
        Log = log;
    }

    public string ProgramName { get; }
    public string Log { get; }
}

/// <summary>NVRTC: runtime compilation of CUDA C++ to PTX or CUBIN.</summary>
public static unsafe partial class Nvrtc
{
    private const string Lib = "r1v2_nvrtc";

    static Nvrtc() => NativeLibraries.EnsureResolver();

    [LibraryImport(Lib, EntryPoint = "nvrtcVersion")] private static partial int nvrtcVersion(int* major, int* minor);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetErrorString")] private static partial byte* nvrtcGetErrorString(int result);
    [LibraryImport(Lib, EntryPoint = "nvrtcCreateProgram")]
    private static partial int nvrtcCreateProgram(IntPtr* prog, byte* src, byte* name, int numHeaders, byte** headers, byte** includeNames);
    [LibraryImport(Lib, EntryPoint = "nvrtcDestroyProgram")] private static partial int nvrtcDestroyProgram(IntPtr* prog);
    [LibraryImport(Lib, EntryPoint = "nvrtcCompileProgram")] private static partial int nvrtcCompileProgram(IntPtr prog, int numOptions, byte** options);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetPTXSize")] private static partial int nvrtcGetPTXSize(IntPtr prog, nuint* size);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetPTX")] private static partial int nvrtcGetPTX(IntPtr prog, byte* ptx);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetCUBINSize")] private static partial int nvrtcGetCUBINSize(IntPtr prog, nuint* size);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetCUBIN")] private static partial int nvrtcGetCUBIN(IntPtr prog, byte* cubin);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetProgramLogSize")] private static partial int nvrtcGetProgramLogSize(IntPtr prog, nuint* size);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetProgramLog")] private static partial int nvrtcGetProgramLog(IntPtr prog, byte* log);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetNumSupportedArchs")] private static partial int nvrtcGetNumSupportedArchs(int* count);
    [LibraryImport(Lib, EntryPoint = "nvrtcGetSupportedArchs")] private static partial int nvrtcGetSupportedArchs(int* archs);

    private static readonly string[] ResultNames =
    [
        "NVRTC_SUCCESS", "NVRTC_ERROR_OUT_OF_MEMORY", "NVRTC_ERROR_PROGRAM_CREATION_FAILURE", "NVRTC_ERROR_INVALID_INPUT",
        "NVRTC_ERROR_INVALID_PROGRAM", "NVRTC_ERROR_INVALID_OPTION", "NVRTC_ERROR_COMPILATION",
        "NVRTC_ERROR_BUILTIN_OPERATION_FAILURE", "NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION",
        "NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION", "NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID",
        "NVRTC_ERROR_INTERNAL_ERROR", "NVRTC_ERROR_TIME_FILE_WRITE_FAILED", "NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED",
        "NVRTC_ERROR_PCH_CREATE_HEAP_EXHAUSTED", "NVRTC_ERROR_PCH_CREATE", "NVRTC_ERROR_CANCELLED",
        "NVRTC_ERROR_TIME_TRACE_FILE_WRITE_FAILED",
    ];

    public static string ErrorName(int result) =>
        result >= 0 && result < ResultNames.Length ? ResultNames[result] : $"NVRTC_ERROR_{result}";

    private static void Check(int status, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status == 0) return;
        var paren = call.IndexOf('(');
        var text = Marshal.PtrToStringUTF8((IntPtr)nvrtcGetErrorString(status));
        throw new CudaException(paren > 0 ? call[..paren] : call, status, ErrorName(status), text);
    }

    public static Version Version()
    {
        int major, minor;
        Check(nvrtcVersion(&major, &minor));
        return new Version(major, minor);
    }

    /// <summary>The compute capabilities this NVRTC can target, e.g. 80 and 90.</summary>
    public static int[] SupportedArchs()
    {
        int n;
        Check(nvrtcGetNumSupportedArchs(&n));
        var archs = new int[n];
        fixed (int* p = archs) Check(nvrtcGetSupportedArchs(p));
        return archs;
    }

    /// <summary>
    /// Compiles <paramref name="source"/> with in-memory <paramref name="headers"/> (include name to text). With
    /// <paramref name="cubin"/> the result is a CUBIN for a real arch (-arch=sm_XY), otherwise PTX (compute_XY).
    /// A failed compilation throws <see cref="NvrtcCompileException"/> carrying the program log.
    /// </summary>
    public static NvrtcResult Compile(string source, string programName, IReadOnlyDictionary<string, string> headers,
        IReadOnlyList<string> options, bool cubin)
    {
        var allocations = new List<IntPtr>();
        IntPtr Utf8(string s)
        {
            var p = Marshal.StringToCoTaskMemUTF8(s);
            allocations.Add(p);
            return p;
        }

        IntPtr prog = IntPtr.Zero;
        try
        {
            var headerNames = headers.Keys.ToArray();
            var headerPtrs = stackalloc byte*[Math.Max(1, headerNames.Length)];
            var includePtrs = stackalloc byte*[Math.Max(1, headerNames.Length)];
            for (int i = 0; i < headerNames.Length; i++)
            {
                headerPtrs[i] = (byte*)Utf8(headers[headerNames[i]]);
                includePtrs[i] = (byte*)Utf8(headerNames[i]);
            }
            Check(nvrtcCreateProgram(&prog, (byte*)Utf8(source), (byte*)Utf8(programName), headerNames.Length, headerPtrs, includePtrs));

            var opts = stackalloc byte*[Math.Max(1, options.Count)];
            for (int i = 0; i < options.Count; i++) opts[i] = (byte*)Utf8(options[i]);
            var status = nvrtcCompileProgram(prog, options.Count, opts);
            var log = ProgramLog(prog);
            if (status == 6 /* NVRTC_ERROR_COMPILATION */) throw new NvrtcCompileException(programName, log);
            Check(status, "nvrtcCompileProgram");

            nuint size;
            byte[] image;
            if (cubin)
            {
                Check(nvrtcGetCUBINSize(prog, &size));
                image = new byte[(int)size];
                fixed (byte* p = image) Check(nvrtcGetCUBIN(prog, p));
            }
            else
            {
                Check(nvrtcGetPTXSize(prog, &size));
                image = new byte[(int)size];
                fixed (byte* p = image) Check(nvrtcGetPTX(prog, p));
            }
            return new NvrtcResult(image, cubin, log);
        }
        finally
        {
            if (prog != IntPtr.Zero) nvrtcDestroyProgram(&prog);
            foreach (var p in allocations) Marshal.FreeCoTaskMem(p);
        }
    }

    private static string ProgramLog(IntPtr prog)
    {
        nuint size;
        Check(nvrtcGetProgramLogSize(prog, &size));
        if (size <= 1) return "";
        var buf = new byte[(int)size];
        fixed (byte* p = buf) Check(nvrtcGetProgramLog(prog, p));
        return Encoding.UTF8.GetString(buf, 0, buf.Length - 1).TrimEnd();
    }
}
