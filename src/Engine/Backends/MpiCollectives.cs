using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Backends;

/// <summary>
/// Collectives over MPI (Open MPI, or the MPICH family): the process group of a job started by <c>mpirun</c> or
/// <c>srun --mpi=pmix</c>. Host spans go to MPI directly; a tensor's values pass through the host (CPU tensors are host
/// memory already; GPU tensors take NCCL). The local rank comes from the launcher's variables.
/// </summary>
public sealed unsafe class MpiCollectives : ICollectives
{
    private readonly nint _comm;
    private readonly bool _owned;

    private MpiCollectives(nint comm, bool owned, int localRank)
    {
        _comm = comm;
        _owned = owned;
        Rank = Mpi.Rank(comm);
        WorldSize = Mpi.Size(comm);
        LocalRank = localRank;
    }

    /// <summary>MPI_COMM_WORLD, initialising MPI first.</summary>
    public static MpiCollectives World()
    {
        Mpi.Initialize();
        return new MpiCollectives(Mpi.CommWorld, owned: false, Launch.LocalRank() ?? NodeRank());
    }

    /// <summary>This process's rank among the processes of its node, from MPI's shared-memory split (a launcher that sets no local-rank variable).</summary>
    public static int NodeRank()
    {
        var node = Mpi.SplitShared(Mpi.CommWorld);
        try { return Mpi.Rank(node); }
        finally { Mpi.Free(node); }
    }

    public int Rank { get; }
    public int WorldSize { get; }
    public int LocalRank { get; }

    /// <summary>
    /// How long one collective may wait for the other ranks (<c>parallel.timeout_s</c>, 600 s by default) before it ends
    /// the job naming itself: a rank that died or hangs must not leave the others waiting for ever.
    /// </summary>
    public TimeSpan Timeout { get; set; } = TimeSpan.FromSeconds(600);

    public void AllReduceSum(Span<double> values)
    {
        fixed (double* p = values) Wait(Mpi.StartAllReduceInPlace(p, values.Length, Mpi.Double, Mpi.Sum, _comm), "all_reduce sum");
    }

    public void AllReduceMax(Span<double> values)
    {
        fixed (double* p = values) Wait(Mpi.StartAllReduceInPlace(p, values.Length, Mpi.Double, Mpi.Max, _comm), "all_reduce max");
    }

    public void AllReduceSum(Span<float> values)
    {
        fixed (float* p = values) Wait(Mpi.StartAllReduceInPlace(p, values.Length, Mpi.Float, Mpi.Sum, _comm), "all_reduce sum (fp32)");
    }

    public Action StartAllReduceSum(float[] values)
    {
        var pin = System.Runtime.InteropServices.GCHandle.Alloc(values, System.Runtime.InteropServices.GCHandleType.Pinned);
        nint request;
        try { request = Mpi.StartAllReduceInPlace((void*)pin.AddrOfPinnedObject(), values.Length, Mpi.Float, Mpi.Sum, _comm); }
        catch
        {
            pin.Free();
            throw;
        }
        return () =>
        {
            try { Wait(request, $"all_reduce sum of a {values.Length}-value gradient bucket"); }
            finally { pin.Free(); }
        };
    }

    public void AllReduceSum(Tensor tensor)
    {
        if (tensor.DType != DType.F32) throw new ArgumentException($"all_reduce: {tensor} must be fp32 (gradients are)");
        var host = tensor.ToFloatArray();
        const int slice = 1 << 28;
        fixed (float* p = host)
            for (long at = 0; at < host.LongLength; at += slice)
                Wait(Mpi.StartAllReduceInPlace(p + at, (int)Math.Min(slice, host.LongLength - at), Mpi.Float, Mpi.Sum, _comm), $"all_reduce sum of {tensor.Name}");
        tensor.CopyFrom(host);
    }

    public void Broadcast(Span<byte> data, int root)
    {
        if (root < 0 || root >= WorldSize) throw new ArgumentOutOfRangeException(nameof(root), $"root {root} outside the group of {WorldSize}");
        fixed (byte* p = data) Wait(Mpi.StartBroadcast(p, data.Length, Mpi.Byte, root, _comm), $"broadcast from rank {root}");
    }

    public void AllGather(ReadOnlySpan<float> mine, Span<float> all)
    {
        if (all.Length != mine.Length * WorldSize) throw new ArgumentException($"all_gather: {all.Length} values for {WorldSize} ranks x {mine.Length}");
        fixed (float* s = mine) fixed (float* r = all) Wait(Mpi.StartAllGather(s, mine.Length, Mpi.Float, r, _comm), "all_gather");
    }

    public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine)
    {
        if (all.Length != mine.Length * WorldSize) throw new ArgumentException($"reduce_scatter: {all.Length} values for {WorldSize} ranks x {mine.Length}");
        fixed (float* s = all) fixed (float* r = mine) Wait(Mpi.StartReduceScatterBlock(s, r, mine.Length, Mpi.Float, Mpi.Sum, _comm), "reduce_scatter sum");
    }

    public void Barrier() => Wait(Mpi.StartBarrier(_comm), "barrier");

    public void Barrier(TimeSpan timeout) => Wait(Mpi.StartBarrier(_comm), "barrier", timeout);

    /// <summary>
    /// Polls a started collective to completion: briefly at full speed (a collective between busy ranks ends in
    /// microseconds), then every millisecond, so a rank waiting for a slow one (rank 0 writing a checkpoint, evaluating)
    /// leaves its core to the others; past <see cref="Timeout"/> it ends the job with a message naming the collective.
    /// </summary>
    private void Wait(nint request, string collective, TimeSpan? timeout = null)
    {
        var limit = timeout ?? Timeout;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!Mpi.Test(ref request))
        {
            if (clock.ElapsedMilliseconds < 20) { Thread.Yield(); continue; }
            if (limit != System.Threading.Timeout.InfiniteTimeSpan && clock.Elapsed > limit)
                Abort($"{collective} waited {clock.Elapsed.TotalSeconds:F0} s for the other ranks, past parallel.timeout_s = {limit.TotalSeconds:F0}: a rank is stuck, dead or on another path");
            Thread.Sleep(1);
        }
    }

    public void Abort(string message)
    {
        Console.Error.WriteLine($"rank {Mpi.Rank(Mpi.CommWorld)}: {message}");
        Console.Error.Flush();
        Mpi.Abort(Mpi.CommWorld, 1);
        throw new InvalidOperationException($"MPI_Abort returned: {message}"); // it does not when it works
    }

    public ICollectives Split(int color, int key) => new MpiCollectives(Mpi.Split(_comm, color, key), owned: true, LocalRank) { Timeout = Timeout };

    /// <summary>Frees a communicator made by <see cref="Split"/>.</summary>
    public void Free()
    {
        if (_owned) Mpi.Free(_comm);
    }
}

/// <summary>What the launcher says about this process: whether mpirun or srun started several, and the local rank.</summary>
public static class Launch
{
    /// <summary>The job's process count from the launcher's variables (Open MPI, PMIx, PMI, Slurm), or null when none is set.</summary>
    public static int? WorldSize() =>
        Int("OMPI_COMM_WORLD_SIZE") ?? Int("PMIX_SIZE") ?? Int("PMI_SIZE") ?? (Environment.GetEnvironmentVariable("SLURM_STEP_ID") is not null ? Int("SLURM_NTASKS") : null);

    /// <summary>This process's rank on its node: OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID (MPICH), SLURM_LOCALID.</summary>
    public static int? LocalRank() => Int("OMPI_COMM_WORLD_LOCAL_RANK") ?? Int("MPI_LOCALRANKID") ?? Int("SLURM_LOCALID");

    /// <summary>
    /// The process group of this launch: MPI's world when a launcher started more than one process (or
    /// <c>R1V2_COLLECTIVES=mpi|nccl</c> asks for it in one process, to check the path), else the single process (no MPI
    /// library is needed then).
    /// </summary>
    public static ICollectives Collectives() =>
        Current = WorldSize() is > 1 || Forced is "mpi" or "nccl" ? MpiCollectives.World() : SingleProcessCollectives.Instance;

    /// <summary>
    /// The group that reduces <paramref name="backend"/>'s tensors: NCCL over the MPI group on a CUDA backend (more
    /// than one rank, or <c>R1V2_COLLECTIVES=nccl</c>), else the group itself.
    /// </summary>
    public static ICollectives ForBackend(ICollectives group, Backend backend)
    {
        if (backend is Cuda.CudaBackend cuda && group is MpiCollectives mpi && (mpi.WorldSize > 1 || Forced == "nccl"))
            return Current = new Cuda.NcclCollectives(mpi, cuda);
        return group;
    }

    private static string? Forced => Environment.GetEnvironmentVariable("R1V2_COLLECTIVES")?.Trim().ToLowerInvariant();

    /// <summary>The group <see cref="Collectives"/> last made (a single process until then): what an error ends.</summary>
    public static ICollectives Current { get; private set; } = SingleProcessCollectives.Instance;

    private static int? Int(string name) => int.TryParse(Environment.GetEnvironmentVariable(name), out int v) ? v : null;
}
