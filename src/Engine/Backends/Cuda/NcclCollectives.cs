using System.Diagnostics;
using System.Runtime.InteropServices;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Backends.Cuda;

/// <summary>
/// Collectives of CUDA tensors over NCCL, with MPI underneath for everything on the host (counts, flags, strings,
/// barriers) and for the set-up: rank 0 makes the NCCL unique id and broadcasts it over MPI, every rank then joins
/// the communicator on its own device. A collective runs on a stream of its own, ordered with the backend's stream
/// by events (it starts after the work that produced the tensor; later work waits for it). The host then polls for
/// its end together with <c>ncclCommGetAsyncError</c>: a failed peer or a collective past <see cref="Timeout"/> aborts
/// the communicator and ends the job with a message naming the collective, instead of a hang.
/// </summary>
public sealed class NcclCollectives : ICollectives, IDisposable
{
    private readonly MpiCollectives _host;
    private readonly CudaBackend _backend;
    private readonly nint _comm;
    private readonly CudaStream _stream = new();
    private readonly CudaEvent _ready = new(), _done = new();

    public unsafe NcclCollectives(MpiCollectives host, CudaBackend backend)
    {
        _host = host;
        _backend = backend;
        var id = host.Rank == 0 ? Nccl.UniqueId() : default;
        host.Broadcast(new Span<byte>(&id, Nccl.UniqueIdBytes), 0);
        _comm = Nccl.InitRank(host.WorldSize, id, host.Rank);
    }

    public int Rank => _host.Rank;
    public int WorldSize => _host.WorldSize;
    public int LocalRank => _host.LocalRank;
    public bool TensorsOnDevice => true;

    /// <summary>How long one collective may run (<c>parallel.timeout_s</c>); the host collectives share it.</summary>
    public TimeSpan Timeout
    {
        get => _host.Timeout;
        set => _host.Timeout = value;
    }

    public void AllReduceSum(Span<double> values) => _host.AllReduceSum(values);
    public void AllReduceMax(Span<double> values) => _host.AllReduceMax(values);
    public void AllReduceSum(Span<float> values) => _host.AllReduceSum(values);

    public void AllReduceSum(Tensor tensor)
    {
        var type = tensor.DType switch
        {
            DType.F32 => NcclDataType.Float32,
            DType.BF16 => NcclDataType.Bfloat16,
            _ => throw new ArgumentException($"all_reduce: {tensor} must be fp32 or bf16"),
        };
        ulong p = CudaBackend.DevicePointer(tensor);
        Run($"all_reduce sum of {tensor.Name}", stream => Nccl.AllReduce(p, p, tensor.Length, type, NcclRedOp.Sum, _comm, stream));
    }

    public void Broadcast(Span<byte> data, int root) => _host.Broadcast(data, root);
    public void AllGather(ReadOnlySpan<float> mine, Span<float> all) => _host.AllGather(mine, all);
    public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine) => _host.ReduceScatterSum(all, mine);
    public void Barrier() => _host.Barrier();
    public void Barrier(TimeSpan timeout) => _host.Barrier(timeout);

    public void Abort(string message)
    {
        Nccl.Abort(_comm);
        _host.Abort(message);
    }

    /// <summary>A sub-group (tensor- or data-parallel) with a communicator of its own.</summary>
    public ICollectives Split(int color, int key) => new NcclCollectives((MpiCollectives)_host.Split(color, key), _backend);

    /// <summary>
    /// Enqueues <paramref name="collective"/> on the communication stream after the backend stream's work so far, makes
    /// the backend stream wait for it, and watches it to its end.
    /// </summary>
    private void Run(string name, Action<nint> collective)
    {
        _ready.Record(_backend.Stream);
        _ready.MakeWait(_stream);
        collective(_stream.Handle);
        _done.Record(_stream);
        _done.MakeWait(_backend.Stream);
        var clock = Stopwatch.StartNew();
        while (!_done.Done)
        {
            int error = Nccl.AsyncError(_comm);
            if (error != Nccl.Success && error != Nccl.InProgress)
                Abort($"{name}: NCCL reports {Nccl.ErrorString(error)} (a peer failed or the network did)");
            if (clock.Elapsed > Timeout)
                Abort($"{name} ran {clock.Elapsed.TotalSeconds:F0} s, past parallel.timeout_s = {Timeout.TotalSeconds:F0}: a rank is stuck, dead or on another path");
            if (clock.ElapsedMilliseconds < 20) Thread.Yield(); else Thread.Sleep(1);
        }
    }

    public void Dispose()
    {
        Nccl.Destroy(_comm);
        _ready.Dispose();
        _done.Dispose();
        _stream.Dispose();
    }
}
