using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>An NCCL call returned an error: the message names the call, the result code and NCCL's error string.</summary>
public sealed class NcclException(string call, int code, string text) : Exception($"{call} failed with NCCL result {code}: {text}")
{
    public string Call { get; } = call;
    public int Code { get; } = code;
}

/// <summary>ncclUniqueId: 128 opaque bytes made by rank 0 and sent to every rank (over MPI) before ncclCommInitRank.</summary>
[StructLayout(LayoutKind.Sequential, Size = Nccl.UniqueIdBytes)]
public unsafe struct NcclUniqueId
{
    public fixed byte Internal[Nccl.UniqueIdBytes];
}

/// <summary>ncclDataType_t values this engine passes.</summary>
public enum NcclDataType { Int8 = 0, Uint8 = 1, Int32 = 2, Float16 = 6, Float32 = 7, Float64 = 8, Bfloat16 = 9 }

/// <summary>ncclRedOp_t values this engine passes.</summary>
public enum NcclRedOp { Sum = 0, Prod = 1, Max = 2, Min = 3 }

/// <summary>
/// NCCL (libnccl.so.2, from the NGC container, NVIDIA's apt repository or the nvidia-nccl pip wheel) through P/Invoke:
/// communicator set-up from a unique id, the collectives on device buffers and a CUDA stream, the asynchronous error
/// query a watchdog polls, and abort. The library is probed like the CUDA ones; <c>R1V2_LIBNCCL</c> overrides the search.
/// </summary>
public static unsafe partial class Nccl
{
    private const string Lib = "r1v2_nccl";
    public const int UniqueIdBytes = 128;

    /// <summary>ncclSuccess and ncclInProgress (a non-blocking communicator's call still running).</summary>
    public const int Success = 0, InProgress = 7;

    static Nccl() => NativeLibraries.EnsureResolver();

    [LibraryImport(Lib, EntryPoint = "ncclGetVersion")] private static partial int ncclGetVersion(int* version);
    [LibraryImport(Lib, EntryPoint = "ncclGetUniqueId")] private static partial int ncclGetUniqueId(NcclUniqueId* id);
    [LibraryImport(Lib, EntryPoint = "ncclCommInitRank")] private static partial int ncclCommInitRank(nint* comm, int ranks, NcclUniqueId id, int rank);
    [LibraryImport(Lib, EntryPoint = "ncclCommDestroy")] private static partial int ncclCommDestroy(nint comm);
    [LibraryImport(Lib, EntryPoint = "ncclCommAbort")] private static partial int ncclCommAbort(nint comm);
    [LibraryImport(Lib, EntryPoint = "ncclCommGetAsyncError")] private static partial int ncclCommGetAsyncError(nint comm, int* result);
    [LibraryImport(Lib, EntryPoint = "ncclGetErrorString")] private static partial byte* ncclGetErrorString(int result);
    [LibraryImport(Lib, EntryPoint = "ncclAllReduce")] private static partial int ncclAllReduce(ulong send, ulong recv, nuint count, int type, int op, nint comm, nint stream);
    [LibraryImport(Lib, EntryPoint = "ncclReduceScatter")] private static partial int ncclReduceScatter(ulong send, ulong recv, nuint recvCount, int type, int op, nint comm, nint stream);
    [LibraryImport(Lib, EntryPoint = "ncclAllGather")] private static partial int ncclAllGather(ulong send, ulong recv, nuint sendCount, int type, nint comm, nint stream);
    [LibraryImport(Lib, EntryPoint = "ncclBroadcast")] private static partial int ncclBroadcast(ulong send, ulong recv, nuint count, int type, int root, nint comm, nint stream);
    [LibraryImport(Lib, EntryPoint = "ncclGroupStart")] private static partial int ncclGroupStart();
    [LibraryImport(Lib, EntryPoint = "ncclGroupEnd")] private static partial int ncclGroupEnd();

    /// <summary>NCCL's version as major * 10000 + minor * 100 + patch (2.18.3: 21803).</summary>
    public static int Version()
    {
        int v;
        Check(ncclGetVersion(&v), "ncclGetVersion");
        return v;
    }

    public static NcclUniqueId UniqueId()
    {
        NcclUniqueId id;
        Check(ncclGetUniqueId(&id), "ncclGetUniqueId");
        return id;
    }

    /// <summary>This rank's communicator among <paramref name="ranks"/>, on the current CUDA device.</summary>
    public static nint InitRank(int ranks, NcclUniqueId id, int rank)
    {
        nint comm;
        Check(ncclCommInitRank(&comm, ranks, id, rank), "ncclCommInitRank");
        return comm;
    }

    public static void Destroy(nint comm) => Check(ncclCommDestroy(comm), "ncclCommDestroy");

    /// <summary>Ends the communicator's outstanding operations (a hung or failed collective) so the process can exit.</summary>
    public static void Abort(nint comm) => ncclCommAbort(comm);

    /// <summary>The communicator's asynchronous error (a peer that died, a network failure), or <see cref="Success"/>.</summary>
    public static int AsyncError(nint comm)
    {
        int result;
        Check(ncclCommGetAsyncError(comm, &result), "ncclCommGetAsyncError");
        return result;
    }

    public static string ErrorString(int result) => Marshal.PtrToStringAnsi((nint)ncclGetErrorString(result)) ?? $"NCCL result {result}";

    public static void AllReduce(ulong send, ulong recv, long count, NcclDataType type, NcclRedOp op, nint comm, nint stream) =>
        Check(ncclAllReduce(send, recv, (nuint)count, (int)type, (int)op, comm, stream), "ncclAllReduce");

    public static void ReduceScatter(ulong send, ulong recv, long recvCount, NcclDataType type, NcclRedOp op, nint comm, nint stream) =>
        Check(ncclReduceScatter(send, recv, (nuint)recvCount, (int)type, (int)op, comm, stream), "ncclReduceScatter");

    public static void AllGather(ulong send, ulong recv, long sendCount, NcclDataType type, nint comm, nint stream) =>
        Check(ncclAllGather(send, recv, (nuint)sendCount, (int)type, comm, stream), "ncclAllGather");

    public static void Broadcast(ulong send, ulong recv, long count, NcclDataType type, int root, nint comm, nint stream) =>
        Check(ncclBroadcast(send, recv, (nuint)count, (int)type, root, comm, stream), "ncclBroadcast");

    public static void GroupStart() => Check(ncclGroupStart(), "ncclGroupStart");
    public static void GroupEnd() => Check(ncclGroupEnd(), "ncclGroupEnd");

    private static void Check(int result, string call)
    {
        if (result != Success) throw new NcclException(call, result, ErrorString(result));
    }
}
