using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>An MPI call returned an error code: the message names the call, the code and MPI's error string.</summary>
public sealed class MpiException(string call, int code, string text) : Exception($"{call} failed with MPI error {code}: {text}")
{
    public string Call { get; } = call;
    public int Code { get; } = code;
}

/// <summary>Which MPI implementation's handle ABI the loaded library uses.</summary>
public enum MpiAbi { OpenMpi, Mpich }

/// <summary>
/// The MPI C API through P/Invoke. Handles (communicators, datatypes, ops) are pointer-sized: Open MPI's are the
/// addresses of exported predefined objects (<c>ompi_mpi_comm_world</c>, ...), MPICH's are fixed integers; both pass
/// as <see cref="nint"/>. The library is probed like the CUDA ones (<c>R1V2_LIBMPI</c> overrides the search).
/// </summary>
public static unsafe partial class Mpi
{
    private const string Lib = "r1v2_mpi";

    static Mpi() => NativeLibraries.EnsureResolver();

    [LibraryImport(Lib, EntryPoint = "MPI_Initialized")] private static partial int MPI_Initialized(int* flag);
    [LibraryImport(Lib, EntryPoint = "MPI_Finalized")] private static partial int MPI_Finalized(int* flag);
    [LibraryImport(Lib, EntryPoint = "MPI_Init_thread")] private static partial int MPI_Init_thread(int* argc, byte*** argv, int required, int* provided);
    [LibraryImport(Lib, EntryPoint = "MPI_Finalize")] private static partial int MPI_Finalize();
    [LibraryImport(Lib, EntryPoint = "MPI_Comm_rank")] private static partial int MPI_Comm_rank(nint comm, int* rank);
    [LibraryImport(Lib, EntryPoint = "MPI_Comm_size")] private static partial int MPI_Comm_size(nint comm, int* size);
    [LibraryImport(Lib, EntryPoint = "MPI_Comm_split")] private static partial int MPI_Comm_split(nint comm, int color, int key, nint* newComm);
    [LibraryImport(Lib, EntryPoint = "MPI_Comm_split_type")] private static partial int MPI_Comm_split_type(nint comm, int type, int key, nint info, nint* newComm);
    [LibraryImport(Lib, EntryPoint = "MPI_Comm_free")] private static partial int MPI_Comm_free(nint* comm);
    [LibraryImport(Lib, EntryPoint = "MPI_Allreduce")] private static partial int MPI_Allreduce(void* send, void* recv, int count, nint type, nint op, nint comm);
    [LibraryImport(Lib, EntryPoint = "MPI_Reduce_scatter_block")] private static partial int MPI_Reduce_scatter_block(void* send, void* recv, int count, nint type, nint op, nint comm);
    [LibraryImport(Lib, EntryPoint = "MPI_Allgather")] private static partial int MPI_Allgather(void* send, int sendCount, nint sendType, void* recv, int recvCount, nint recvType, nint comm);
    [LibraryImport(Lib, EntryPoint = "MPI_Bcast")] private static partial int MPI_Bcast(void* buffer, int count, nint type, int root, nint comm);
    [LibraryImport(Lib, EntryPoint = "MPI_Barrier")] private static partial int MPI_Barrier(nint comm);
    [LibraryImport(Lib, EntryPoint = "MPI_Iallreduce")] private static partial int MPI_Iallreduce(void* send, void* recv, int count, nint type, nint op, nint comm, nint* request);
    [LibraryImport(Lib, EntryPoint = "MPI_Ireduce_scatter_block")] private static partial int MPI_Ireduce_scatter_block(void* send, void* recv, int count, nint type, nint op, nint comm, nint* request);
    [LibraryImport(Lib, EntryPoint = "MPI_Iallgather")] private static partial int MPI_Iallgather(void* send, int sendCount, nint sendType, void* recv, int recvCount, nint recvType, nint comm, nint* request);
    [LibraryImport(Lib, EntryPoint = "MPI_Ibcast")] private static partial int MPI_Ibcast(void* buffer, int count, nint type, int root, nint comm, nint* request);
    [LibraryImport(Lib, EntryPoint = "MPI_Ibarrier")] private static partial int MPI_Ibarrier(nint comm, nint* request);
    [LibraryImport(Lib, EntryPoint = "MPI_Test")] private static partial int MPI_Test(nint* request, int* flag, void* status);
    [LibraryImport(Lib, EntryPoint = "MPI_Abort")] private static partial int MPI_Abort(nint comm, int code);
    [LibraryImport(Lib, EntryPoint = "MPI_Error_string")] private static partial int MPI_Error_string(int code, byte* text, int* length);

    public const int ThreadFunneled = 1;

    public static MpiAbi Abi { get; private set; }

    /// <summary>The predefined handles of the loaded implementation.</summary>
    public static nint CommWorld { get; private set; }
    public static nint Float { get; private set; }
    public static nint Double { get; private set; }
    public static nint Byte { get; private set; }
    public static nint Sum { get; private set; }
    public static nint Max { get; private set; }

    /// <summary>MPI_IN_PLACE: 1 in Open MPI, -1 in MPICH.</summary>
    public static void* InPlace { get; private set; }

    /// <summary>MPI_COMM_TYPE_SHARED (0 in Open MPI, 1 in MPICH) and MPI_INFO_NULL.</summary>
    private static int CommTypeShared { get; set; }
    private static nint InfoNull { get; set; }

    /// <summary>MPI_STATUS_IGNORE: 0 in Open MPI, 1 in MPICH.</summary>
    private static void* StatusIgnore { get; set; }

    /// <summary>Loads the library, finds its ABI and predefined handles, and initialises MPI (once; funneled threads).</summary>
    public static void Initialize()
    {
        var handle = NativeLibraries.Mpi.Handle;
        if (NativeLibrary.TryGetExport(handle, "ompi_mpi_comm_world", out var world))
        {
            Abi = MpiAbi.OpenMpi;
            nint Export(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p
                : throw new MpiException("dlsym", -1, $"{name} is not exported by the MPI library: not Open MPI's ABI");
            CommWorld = world;
            Float = Export("ompi_mpi_float");
            Double = Export("ompi_mpi_double");
            Byte = Export("ompi_mpi_byte");
            Sum = Export("ompi_mpi_op_sum");
            Max = Export("ompi_mpi_op_max");
            InPlace = (void*)1;
            StatusIgnore = null;
            CommTypeShared = 0;
            InfoNull = Export("ompi_mpi_info_null");
        }
        else
        {
            // MPICH and its derivatives (Intel MPI, Cray MPICH): handles are fixed 32-bit values.
            Abi = MpiAbi.Mpich;
            CommWorld = 0x44000000;
            Float = 0x4c00040a;
            Double = 0x4c00080b;
            Byte = 0x4c00010d;
            Sum = 0x58000003;
            Max = 0x58000001;
            InPlace = (void*)-1;
            StatusIgnore = (void*)1;
            CommTypeShared = 1;
            InfoNull = 0x1c000000;
        }
        int flag;
        Check(MPI_Initialized(&flag), "MPI_Initialized");
        if (flag != 0) return;
        int provided;
        Check(MPI_Init_thread(null, null, ThreadFunneled, &provided), "MPI_Init_thread");
    }

    public static void FinalizeIfInitialized()
    {
        int init, done;
        Check(MPI_Initialized(&init), "MPI_Initialized");
        Check(MPI_Finalized(&done), "MPI_Finalized");
        if (init != 0 && done == 0) Check(MPI_Finalize(), "MPI_Finalize");
    }

    public static int Rank(nint comm) { int r; Check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank"); return r; }
    public static int Size(nint comm) { int s; Check(MPI_Comm_size(comm, &s), "MPI_Comm_size"); return s; }

    public static nint Split(nint comm, int color, int key)
    {
        nint result;
        Check(MPI_Comm_split(comm, color, key, &result), "MPI_Comm_split");
        return result;
    }

    /// <summary>The ranks of <paramref name="comm"/> that share this one's memory (its node), ordered by rank.</summary>
    public static nint SplitShared(nint comm)
    {
        nint result;
        Check(MPI_Comm_split_type(comm, CommTypeShared, Rank(comm), InfoNull, &result), "MPI_Comm_split_type");
        return result;
    }

    public static void Free(nint comm) => Check(MPI_Comm_free(&comm), "MPI_Comm_free");

    public static void AllReduceInPlace(void* data, int count, nint type, nint op, nint comm) =>
        Check(MPI_Allreduce(InPlace, data, count, type, op, comm), "MPI_Allreduce");

    public static void ReduceScatterBlock(void* send, void* recv, int countPerRank, nint type, nint op, nint comm) =>
        Check(MPI_Reduce_scatter_block(send, recv, countPerRank, type, op, comm), "MPI_Reduce_scatter_block");

    public static void AllGather(void* send, int countPerRank, nint type, void* recv, nint comm) =>
        Check(MPI_Allgather(send, countPerRank, type, recv, countPerRank, type, comm), "MPI_Allgather");

    public static void Broadcast(void* data, int count, nint type, int root, nint comm) => Check(MPI_Bcast(data, count, type, root, comm), "MPI_Bcast");

    public static void Barrier(nint comm) => Check(MPI_Barrier(comm), "MPI_Barrier");

    // Non-blocking forms: the request handle (a pointer in Open MPI, a 32-bit integer in MPICH, which the low half of
    // an nint holds on little-endian machines) is completed by Test. They let a wait sleep between polls and give up.

    public static nint StartAllReduceInPlace(void* data, int count, nint type, nint op, nint comm)
    {
        nint r = 0;
        Check(MPI_Iallreduce(InPlace, data, count, type, op, comm, &r), "MPI_Iallreduce");
        return r;
    }

    public static nint StartReduceScatterBlock(void* send, void* recv, int countPerRank, nint type, nint op, nint comm)
    {
        nint r = 0;
        Check(MPI_Ireduce_scatter_block(send, recv, countPerRank, type, op, comm, &r), "MPI_Ireduce_scatter_block");
        return r;
    }

    public static nint StartAllGather(void* send, int countPerRank, nint type, void* recv, nint comm)
    {
        nint r = 0;
        Check(MPI_Iallgather(send, countPerRank, type, recv, countPerRank, type, comm, &r), "MPI_Iallgather");
        return r;
    }

    public static nint StartBroadcast(void* data, int count, nint type, int root, nint comm)
    {
        nint r = 0;
        Check(MPI_Ibcast(data, count, type, root, comm, &r), "MPI_Ibcast");
        return r;
    }

    public static nint StartBarrier(nint comm)
    {
        nint r = 0;
        Check(MPI_Ibarrier(comm, &r), "MPI_Ibarrier");
        return r;
    }

    /// <summary>Whether <paramref name="request"/> has completed (it is then freed and set to MPI_REQUEST_NULL).</summary>
    public static bool Test(ref nint request)
    {
        int flag;
        fixed (nint* r = &request) Check(MPI_Test(r, &flag, StatusIgnore), "MPI_Test");
        return flag != 0;
    }

    /// <summary>Ends every rank of <paramref name="comm"/>'s job with <paramref name="code"/>; does not return on success.</summary>
    public static void Abort(nint comm, int code) => MPI_Abort(comm, code);

    private static void Check(int code, string call)
    {
        if (code == 0) return;
        var text = new byte[1024];
        int length = 0;
        fixed (byte* p = text) MPI_Error_string(code, p, &length);
        throw new MpiException(call, code, System.Text.Encoding.ASCII.GetString(text, 0, Math.Clamp(length, 0, text.Length)));
    }
}
