using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>cublasLtEpilogue_t values used by the engine.</summary>
public enum CublasLtEpilogue { Default = 1, Relu = 2, Bias = 4, Gelu = 32, BGradA = 256, BGradB = 512 }

/// <summary>
/// cuBLASLt: matmul with a fused bias epilogue (column-major, as cuBLAS). Descriptors are created per call: the
/// engine caches nothing here so that autotuning can later pick an algorithm per shape above this layer.
/// </summary>
public static unsafe partial class CublasLt
{
    private const string Lib = "r1v2_cublaslt";

    static CublasLt() => NativeLibraries.EnsureResolver();

    // Attribute ids from cublasLt.h.
    private const int DescComputeType = 0, DescScaleType = 1, DescTransA = 3, DescTransB = 4, DescEpilogue = 7,
        DescBiasPointer = 8, DescBiasDataType = 26;
    private const int LayoutBatchCount = 5, LayoutStridedBatchOffset = 6;
    private const int PrefMaxWorkspaceBytes = 1;
    private const int PrefMinAlignmentA = 5, PrefMinAlignmentB = 6, PrefMinAlignmentC = 7, PrefMinAlignmentD = 8;

    /// <summary>Largest power of two (up to 256) dividing the address: what the heuristic may assume of an operand.</summary>
    private static uint Alignment(ulong pointer) => pointer == 0 ? 256u : (uint)Math.Min(256ul, pointer & (~pointer + 1));

    [StructLayout(LayoutKind.Sequential, Size = 96)]
    internal struct HeuristicResult
    {
        public fixed ulong Algo[8];
        public nuint WorkspaceSize;
        public int State;
        public float WavesCount;
        public fixed int Reserved[4];
    }

    [LibraryImport(Lib, EntryPoint = "cublasLtCreate")] private static partial int cublasLtCreate(IntPtr* handle);
    [LibraryImport(Lib, EntryPoint = "cublasLtDestroy")] private static partial int cublasLtDestroy(IntPtr handle);
    [LibraryImport(Lib, EntryPoint = "cublasLtGetVersion")] private static partial nuint cublasLtGetVersion();
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulDescCreate")] private static partial int cublasLtMatmulDescCreate(IntPtr* desc, int computeType, int scaleType);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulDescDestroy")] private static partial int cublasLtMatmulDescDestroy(IntPtr desc);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulDescSetAttribute")] private static partial int cublasLtMatmulDescSetAttribute(IntPtr desc, int attr, void* buf, nuint size);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatrixLayoutCreate")] private static partial int cublasLtMatrixLayoutCreate(IntPtr* layout, int type, ulong rows, ulong cols, long ld);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatrixLayoutDestroy")] private static partial int cublasLtMatrixLayoutDestroy(IntPtr layout);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatrixLayoutSetAttribute")] private static partial int cublasLtMatrixLayoutSetAttribute(IntPtr layout, int attr, void* buf, nuint size);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulPreferenceCreate")] private static partial int cublasLtMatmulPreferenceCreate(IntPtr* pref);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulPreferenceDestroy")] private static partial int cublasLtMatmulPreferenceDestroy(IntPtr pref);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulPreferenceSetAttribute")] private static partial int cublasLtMatmulPreferenceSetAttribute(IntPtr pref, int attr, void* buf, nuint size);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmulAlgoGetHeuristic")]
    private static partial int cublasLtMatmulAlgoGetHeuristic(IntPtr handle, IntPtr desc, IntPtr aDesc, IntPtr bDesc, IntPtr cDesc,
        IntPtr dDesc, IntPtr pref, int requested, HeuristicResult* results, int* returned);
    [LibraryImport(Lib, EntryPoint = "cublasLtMatmul")]
    private static partial int cublasLtMatmul(IntPtr handle, IntPtr desc, void* alpha, ulong a, IntPtr aDesc, ulong b, IntPtr bDesc,
        void* beta, ulong c, IntPtr cDesc, ulong d, IntPtr dDesc, void* algo, ulong workspace, nuint workspaceBytes, IntPtr stream);

    private static void Check(int status, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status == 0) return;
        var paren = call.IndexOf('(');
        throw new CudaException(paren > 0 ? call[..paren] : call, status, Cublas.StatusName(status));
    }

    internal static IntPtr Create()
    {
        IntPtr h;
        Check(cublasLtCreate(&h));
        return h;
    }

    internal static void Destroy(IntPtr h) => Check(cublasLtDestroy(h));
    public static long Version() => (long)cublasLtGetVersion();

    private static IntPtr Layout(CudaDataType type, int rows, int cols, int ld, int batch, long stride)
    {
        IntPtr l;
        Check(cublasLtMatrixLayoutCreate(&l, (int)type, (ulong)rows, (ulong)cols, ld));
        if (batch > 1)
        {
            Check(cublasLtMatrixLayoutSetAttribute(l, LayoutBatchCount, &batch, sizeof(int)));
            Check(cublasLtMatrixLayoutSetAttribute(l, LayoutStridedBatchOffset, &stride, sizeof(long)));
        }
        return l;
    }

    /// <summary>
    /// D = alpha op(A) op(B) + beta C (+ bias per row of the column-major D, i.e. per output feature), column-major,
    /// fp32 compute. C and D may alias. <paramref name="bias"/> of 0 means no bias.
    /// </summary>
    public static void Matmul(CublasLtHandle handle, CublasOperation opA, CublasOperation opB, int m, int n, int k, float alpha,
        ulong a, CudaDataType aType, int lda, ulong b, CudaDataType bType, int ldb, float beta, ulong c, CudaDataType cType, int ldc,
        ulong bias, CudaDataType biasType, ulong workspace, long workspaceBytes, IntPtr stream, int batch = 1,
        long strideA = 0, long strideB = 0, long strideC = 0)
    {
        IntPtr desc = 0, la = 0, lb = 0, lc = 0, pref = 0;
        try
        {
            Check(cublasLtMatmulDescCreate(&desc, (int)CublasComputeType.Compute32F, (int)CudaDataType.R32F));
            int ta = (int)opA, tb = (int)opB;
            Check(cublasLtMatmulDescSetAttribute(desc, DescTransA, &ta, sizeof(int)));
            Check(cublasLtMatmulDescSetAttribute(desc, DescTransB, &tb, sizeof(int)));
            if (bias != 0)
            {
                int epi = (int)CublasLtEpilogue.Bias, bt = (int)biasType;
                Check(cublasLtMatmulDescSetAttribute(desc, DescEpilogue, &epi, sizeof(int)));
                Check(cublasLtMatmulDescSetAttribute(desc, DescBiasPointer, &bias, sizeof(ulong)));
                Check(cublasLtMatmulDescSetAttribute(desc, DescBiasDataType, &bt, sizeof(int)));
            }
            la = opA == CublasOperation.N ? Layout(aType, m, k, lda, batch, strideA) : Layout(aType, k, m, lda, batch, strideA);
            lb = opB == CublasOperation.N ? Layout(bType, k, n, ldb, batch, strideB) : Layout(bType, n, k, ldb, batch, strideB);
            lc = Layout(cType, m, n, ldc, batch, strideC);

            Check(cublasLtMatmulPreferenceCreate(&pref));
            ulong ws = (ulong)workspaceBytes;
            Check(cublasLtMatmulPreferenceSetAttribute(pref, PrefMaxWorkspaceBytes, &ws, sizeof(ulong)));
            // Views (row slices) need not start 256-byte aligned: tell the heuristic the real alignment of each operand.
            uint alA = Alignment(a), alB = Alignment(b), alC = Alignment(c);
            Check(cublasLtMatmulPreferenceSetAttribute(pref, PrefMinAlignmentA, &alA, sizeof(uint)));
            Check(cublasLtMatmulPreferenceSetAttribute(pref, PrefMinAlignmentB, &alB, sizeof(uint)));
            Check(cublasLtMatmulPreferenceSetAttribute(pref, PrefMinAlignmentC, &alC, sizeof(uint)));
            Check(cublasLtMatmulPreferenceSetAttribute(pref, PrefMinAlignmentD, &alC, sizeof(uint)));
            // One algorithm per problem for the handle's life: the heuristic's first choice, asked once and then pinned, so
            // every call of a shape runs the same kernel with the same reduction (and skips the heuristic's cost).
            var key = new AlgoKey(opA, opB, m, n, k, aType, bType, cType, lda, ldb, ldc, bias != 0, biasType, batch, strideA, strideB, strideC,
                alA, alB, alC, workspaceBytes);
            HeuristicResult result;
            bool known;
            lock (handle.Algorithms) known = handle.Algorithms.TryGetValue(key, out result);
            if (!known)
            {
                int found;
                Check(cublasLtMatmulAlgoGetHeuristic(handle.Handle, desc, la, lb, lc, lc, pref, 1, &result, &found));
                if (found == 0) throw new CudaException("cublasLtMatmulAlgoGetHeuristic", 15, "CUBLAS_STATUS_NOT_SUPPORTED", $"no algorithm for m={m} n={n} k={k}");
                lock (handle.Algorithms) handle.Algorithms[key] = result;
            }
            Check(cublasLtMatmul(handle.Handle, desc, &alpha, a, la, b, lb, &beta, c, lc, c, lc, result.Algo, workspace, (nuint)workspaceBytes, stream));
        }
        finally
        {
            if (pref != 0) cublasLtMatmulPreferenceDestroy(pref);
            if (lc != 0) cublasLtMatrixLayoutDestroy(lc);
            if (lb != 0) cublasLtMatrixLayoutDestroy(lb);
            if (la != 0) cublasLtMatrixLayoutDestroy(la);
            if (desc != 0) cublasLtMatmulDescDestroy(desc);
        }
    }
}

/// <summary>Everything the heuristic's choice depends on: the problem, its layouts and alignments, and the workspace.</summary>
internal readonly record struct AlgoKey(CublasOperation OpA, CublasOperation OpB, int M, int N, int K, CudaDataType A, CudaDataType B, CudaDataType C,
    int Lda, int Ldb, int Ldc, bool Bias, CudaDataType BiasType, int Batch, long StrideA, long StrideB, long StrideC, uint AlignA, uint AlignB, uint AlignC,
    long Workspace);

public sealed class CublasLtHandle : IDisposable
{
    public CublasLtHandle() => Handle = CublasLt.Create();
    public IntPtr Handle { get; private set; }

    /// <summary>The algorithm pinned for each problem this handle has run (<see cref="CublasLt.Matmul"/>).</summary>
    internal Dictionary<AlgoKey, CublasLt.HeuristicResult> Algorithms { get; } = new();

    /// <summary>How many problems have an algorithm pinned.</summary>
    public int PinnedAlgorithms { get { lock (Algorithms) return Algorithms.Count; } }

    public void Dispose()
    {
        if (Handle == IntPtr.Zero) return;
        CublasLt.Destroy(Handle);
        Handle = IntPtr.Zero;
    }
}
