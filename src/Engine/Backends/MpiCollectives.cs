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
        return new MpiCollectives(Mpi.CommWorld, owned: false, Launch.LocalRank() ?? 0);
    }

    public int Rank { get; }
    public int WorldSize { get; }
    public int LocalRank { get; }

    public void AllReduceSum(Span<double> values)
    {
        fixed (double* p = values) Mpi.AllReduceInPlace(p, values.Length, Mpi.Double, Mpi.Sum, _comm);
    }

    public void AllReduceMax(Span<double> values)
    {
        fixed (double* p = values) Mpi.AllReduceInPlace(p, values.Length, Mpi.Double, Mpi.Max, _comm);
    }

    public void AllReduceSum(Tensor tensor)
    {
        if (tensor.DType != DType.F32) throw new ArgumentException($"all_reduce: {tensor} must be fp32 (gradients are)");
        var host = tensor.ToFloatArray();
        const int slice = 1 << 28;
        fixed (float* p = host)
            for (long at = 0; at < host.LongLength; at += slice)
                Mpi.AllReduceInPlace(p + at, (int)Math.Min(slice, host.LongLength - at), Mpi.Float, Mpi.Sum, _comm);
        tensor.CopyFrom(host);
    }

    public void Broadcast(Span<byte> data, int root)
    {
        if (root < 0 || root >= WorldSize) throw new ArgumentOutOfRangeException(nameof(root), $"root {root} outside the group of {WorldSize}");
        fixed (byte* p = data) Mpi.Broadcast(p, data.Length, Mpi.Byte, root, _comm);
    }

    public void AllGather(ReadOnlySpan<float> mine, Span<float> all)
    {
        if (all.Length != mine.Length * WorldSize) throw new ArgumentException($"all_gather: {all.Length} values for {WorldSize} ranks x {mine.Length}");
        fixed (float* s = mine) fixed (float* r = all) Mpi.AllGather(s, mine.Length, Mpi.Float, r, _comm);
    }

    public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine)
    {
        if (all.Length != mine.Length * WorldSize) throw new ArgumentException($"reduce_scatter: {all.Length} values for {WorldSize} ranks x {mine.Length}");
        fixed (float* s = all) fixed (float* r = mine) Mpi.ReduceScatterBlock(s, r, mine.Length, Mpi.Float, Mpi.Sum, _comm);
    }

    public void Barrier() => Mpi.Barrier(_comm);

    public void Abort(string message)
    {
        Console.Error.WriteLine($"rank {Mpi.Rank(Mpi.CommWorld)}: {message}");
        Console.Error.Flush();
        Mpi.Abort(Mpi.CommWorld, 1);
        throw new InvalidOperationException($"MPI_Abort returned: {message}"); // it does not when it works
    }

    public ICollectives Split(int color, int key) => new MpiCollectives(Mpi.Split(_comm, color, key), owned: true, LocalRank);

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
    /// The process group of this launch: MPI's world when a launcher started more than one process, else the single
    /// process (no MPI library is needed then).
    /// </summary>
    public static ICollectives Collectives() => Current = WorldSize() is > 1 ? MpiCollectives.World() : SingleProcessCollectives.Instance;

    /// <summary>The group <see cref="Collectives"/> last made (a single process until then): what an error ends.</summary>
    public static ICollectives Current { get; private set; } = SingleProcessCollectives.Instance;

    private static int? Int(string name) => int.TryParse(Environment.GetEnvironmentVariable(name), out int v) ? v : null;
}
