using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>cudaDataType values used by cuBLAS.</summary>
public enum CudaDataType { R32F = 0, R16F = 2, R16BF = 14 }

/// <summary>cublasComputeType_t.</summary>
public enum CublasComputeType { Compute32F = 68, Compute32FFastTf32 = 77 }

public enum CublasOperation { N = 0, T = 1 }

/// <summary>cuBLAS (legacy API, column-major): handle, stream, workspace and the Ex GEMMs with fp32 accumulation.</summary>
public static unsafe partial class Cublas
{
    private const string Lib = "r1v2_cublas";

    static Cublas() => NativeLibraries.EnsureResolver();

    [LibraryImport(Lib, EntryPoint = "cublasCreate_v2")] private static partial int cublasCreate(IntPtr* handle);
    [LibraryImport(Lib, EntryPoint = "cublasDestroy_v2")] private static partial int cublasDestroy(IntPtr handle);
    [LibraryImport(Lib, EntryPoint = "cublasGetVersion_v2")] private static partial int cublasGetVersion(IntPtr handle, int* version);
    [LibraryImport(Lib, EntryPoint = "cublasSetStream_v2")] private static partial int cublasSetStream(IntPtr handle, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cublasSetWorkspace_v2")] private static partial int cublasSetWorkspace(IntPtr handle, ulong workspace, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cublasSetMathMode")] private static partial int cublasSetMathMode(IntPtr handle, int mode);
    [LibraryImport(Lib, EntryPoint = "cublasGetStatusName")] private static partial byte* cublasGetStatusName(int status);
    [LibraryImport(Lib, EntryPoint = "cublasGemmEx")]
    private static partial int cublasGemmEx(IntPtr handle, int transa, int transb, int m, int n, int k, void* alpha,
        ulong a, int aType, int lda, ulong b, int bType, int ldb, void* beta, ulong c, int cType, int ldc, int computeType, int algo);
    [LibraryImport(Lib, EntryPoint = "cublasGemmStridedBatchedEx")]
    private static partial int cublasGemmStridedBatchedEx(IntPtr handle, int transa, int transb, int m, int n, int k, void* alpha,
        ulong a, int aType, int lda, long strideA, ulong b, int bType, int ldb, long strideB, void* beta,
        ulong c, int cType, int ldc, long strideC, int batchCount, int computeType, int algo);

    private static readonly Dictionary<int, string> StatusNames = new()
    {
        [0] = "CUBLAS_STATUS_SUCCESS", [1] = "CUBLAS_STATUS_NOT_INITIALIZED", [3] = "CUBLAS_STATUS_ALLOC_FAILED",
        [7] = "CUBLAS_STATUS_INVALID_VALUE", [8] = "CUBLAS_STATUS_ARCH_MISMATCH", [11] = "CUBLAS_STATUS_MAPPING_ERROR",
        [13] = "CUBLAS_STATUS_EXECUTION_FAILED", [14] = "CUBLAS_STATUS_INTERNAL_ERROR", [15] = "CUBLAS_STATUS_NOT_SUPPORTED",
        [16] = "CUBLAS_STATUS_LICENSE_ERROR",
    };

    /// <summary>The status name; from the library when it knows it, else from the documented table.</summary>
    public static string StatusName(int status)
    {
        try
        {
            var p = cublasGetStatusName(status);
            if (p != null) return Marshal.PtrToStringUTF8((IntPtr)p)!;
        }
        catch (EntryPointNotFoundException) { }
        return StatusNames.TryGetValue(status, out var n) ? n : $"CUBLAS_STATUS_{status}";
    }

    internal static void Check(int status, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status == 0) return;
        var paren = call.IndexOf('(');
        throw new CudaException(paren > 0 ? call[..paren] : call, status, StatusName(status));
    }

    internal static IntPtr Create()
    {
        IntPtr h;
        Check(cublasCreate(&h));
        return h;
    }

    internal static void Destroy(IntPtr h) => Check(cublasDestroy(h));

    internal static int GetVersion(IntPtr h)
    {
        int v;
        Check(cublasGetVersion(h, &v));
        return v;
    }

    internal static void SetStream(IntPtr h, IntPtr stream) => Check(cublasSetStream(h, stream));
    internal static void SetWorkspace(IntPtr h, ulong ptr, long bytes) => Check(cublasSetWorkspace(h, ptr, (nuint)bytes));
    internal static void SetMathMode(IntPtr h, int mode) => Check(cublasSetMathMode(h, mode));

    /// <summary>C = alpha op(A) op(B) + beta C, column-major, fp32 scalars and accumulation.</summary>
    public static void GemmEx(CublasHandle handle, CublasOperation opA, CublasOperation opB, int m, int n, int k, float alpha,
        ulong a, CudaDataType aType, int lda, ulong b, CudaDataType bType, int ldb, float beta,
        ulong c, CudaDataType cType, int ldc, CublasComputeType compute = CublasComputeType.Compute32F)
    {
        Check(cublasGemmEx(handle.Handle, (int)opA, (int)opB, m, n, k, &alpha, a, (int)aType, lda, b, (int)bType, ldb,
            &beta, c, (int)cType, ldc, (int)compute, -1 /* CUBLAS_GEMM_DEFAULT */));
    }

    /// <summary>Strided-batched GemmEx: matrix i of each operand starts at base + i * stride elements.</summary>
    public static void GemmStridedBatchedEx(CublasHandle handle, CublasOperation opA, CublasOperation opB, int m, int n, int k,
        float alpha, ulong a, CudaDataType aType, int lda, long strideA, ulong b, CudaDataType bType, int ldb, long strideB,
        float beta, ulong c, CudaDataType cType, int ldc, long strideC, int batch,
        CublasComputeType compute = CublasComputeType.Compute32F)
    {
        Check(cublasGemmStridedBatchedEx(handle.Handle, (int)opA, (int)opB, m, n, k, &alpha, a, (int)aType, lda, strideA,
            b, (int)bType, ldb, strideB, &beta, c, (int)cType, ldc, strideC, batch, (int)compute, -1));
    }
}

/// <summary>A cuBLAS handle bound to one stream with its own workspace.</summary>
public sealed class CublasHandle : IDisposable
{
    public CublasHandle() => Handle = Cublas.Create();
    public IntPtr Handle { get; private set; }
    public int Version => Cublas.GetVersion(Handle);
    public void SetStream(CudaStream stream) => Cublas.SetStream(Handle, stream.Handle);

    /// <summary>Gives cuBLAS a caller-owned workspace so it never allocates during a captured or timed region.</summary>
    public void SetWorkspace(ulong ptr, long bytes) => Cublas.SetWorkspace(Handle, ptr, bytes);

    /// <summary>0: default math (no TF32 for fp32 GEMMs, keeps fp32 results exact to fp32).</summary>
    public void SetDefaultMath() => Cublas.SetMathMode(Handle, 0);

    public void Dispose()
    {
        if (Handle == IntPtr.Zero) return;
        Cublas.Destroy(Handle);
        Handle = IntPtr.Zero;
    }
}
