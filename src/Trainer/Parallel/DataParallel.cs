using System.Runtime.InteropServices;
using System.Text;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;

namespace R1V2.Native.Trainer.Parallel;

/// <summary>
/// Data parallelism as the trainers see it, in one place: every rank draws the same global batch (same seed, same
/// data position) and trains on its share (examples i with i mod world == rank); loss normalisers are global counts;
/// gradients are summed across ranks before the norm, the clip and AdamW, so every rank takes the same step from the
/// same weights. One writer (rank 0) writes metrics, reports and the shared part of a checkpoint; each rank writes what
/// it alone holds (its sample buffer, its optimiser shard). In one process every call is the identity.
/// </summary>
/// <param name="group">The data-parallel group: the ranks that hold the same slice of the model and split the batch.</param>
/// <param name="tensorParallel">The tensor-parallel group this rank cuts the decoder with (none by default).</param>
/// <param name="world">Every rank of the launch (the data-parallel group when there is no tensor parallelism).</param>
public sealed class DataParallel(ICollectives group, TensorParallel? tensorParallel = null, ICollectives? world = null)
{
    public static readonly DataParallel Single = new(SingleProcessCollectives.Instance);

    public ICollectives Group { get; } = group;
    public ICollectives World { get; } = world ?? group;
    public TensorParallel TensorParallel { get; } = tensorParallel ?? TensorParallel.None;
    public int Ranks => Group.WorldSize;
    public int Rank => Group.Rank;

    /// <summary>Whether this rank writes the run's files (rank 0 of the launch).</summary>
    public bool Writes => World.Rank == 0;

    /// <summary>Gradients are summed in buckets of this many fp32 values (one collective per bucket, not per tensor).</summary>
    public int BucketValues { get; init; } = 1 << 22;

    /// <summary>This rank's share of a global batch; a batch smaller than the group is an error naming the setting.</summary>
    public List<T> Shard<T>(IReadOnlyList<T> global, string setting)
    {
        if (global.Count < Ranks) throw new InvalidDataException($"{setting} is {global.Count}, fewer than the {Ranks} data-parallel ranks: each rank needs at least one example");
        return Mine(global);
    }

    /// <summary>This rank's share of a list (item i with i mod R == rank), possibly empty (an evaluation's last rows).</summary>
    public List<T> Mine<T>(IEnumerable<T> global) => [.. global.Where((_, i) => i % Ranks == Group.Rank)];

    /// <summary>The global index of this rank's <paramref name="local"/>-th element of a sharded list, in blocks of <paramref name="block"/> (a prompt's group).</summary>
    public int GlobalIndex(int local, int block = 1) => (local / block * Ranks + Rank) * block + local % block;

    /// <summary>Sums of per-rank values (token counts, loss sums) over the group.</summary>
    public double[] Sum(params double[] local)
    {
        Group.AllReduceSum(local);
        return local;
    }

    /// <summary>Maxima of per-rank values over the group.</summary>
    public double[] Max(params double[] local)
    {
        Group.AllReduceMax(local);
        return local;
    }

    /// <summary>Whether any rank says yes (a stop request seen by one rank stops all of them at the same step).</summary>
    public bool Any(bool mine)
    {
        if (World.WorldSize == 1) return mine;
        Span<double> flag = [mine ? 1 : 0];
        World.AllReduceMax(flag);
        return flag[0] > 0;
    }

    /// <summary>
    /// Every rank's values of a list sharded by <see cref="Shard{T}"/> (in blocks of <paramref name="block"/>), put back
    /// in the global order: the same list one process would hold. Values travel bit for bit (a gather moves bytes).
    /// </summary>
    public double[] Gather(IReadOnlyList<double> mine, int globalCount, int block = 1)
    {
        if (Ranks == 1) return [.. mine];
        int blocks = (globalCount / block + Ranks - 1) / Ranks, per = blocks * block;
        var send = new double[per];
        Array.Fill(send, double.NaN);
        for (int i = 0; i < mine.Count; i++) send[i] = mine[i];
        var all = new double[per * Ranks];
        Group.AllGather(MemoryMarshal.Cast<double, float>(send), MemoryMarshal.Cast<double, float>(all.AsSpan()));
        var global = new double[globalCount];
        for (int r = 0; r < Ranks; r++)
            for (int i = 0; i < per; i++)
            {
                int g = (i / block * Ranks + r) * block + i % block;
                if (g < globalCount) global[g] = all[r * per + i];
            }
        return global;
    }

    /// <summary>Rank 0's string on every rank (a temporary directory's path, a model path decided by rank 0).</summary>
    public string Broadcast(string? mine)
    {
        if (World.WorldSize == 1) return mine ?? throw new ArgumentNullException(nameof(mine));
        var bytes = Writes ? Encoding.UTF8.GetBytes(mine ?? throw new ArgumentNullException(nameof(mine))) : [];
        var length = BitConverter.GetBytes(bytes.Length);
        World.Broadcast(length, 0);
        if (!Writes) bytes = new byte[BitConverter.ToInt32(length)];
        World.Broadcast(bytes, 0);
        return Encoding.UTF8.GetString(bytes);
    }

    // Gradient buckets: the trainable parameters in reverse order (about the order backward finishes them), cut into
    // runs of at most BucketValues; the same on every rank, started in that order on every rank.
    private List<List<Parameter>>? _buckets;
    private readonly HashSet<Parameter> _ready = new(ReferenceEqualityComparer.Instance);
    private readonly List<(List<Parameter> Bucket, float[] Host, Action Wait)> _inFlight = [];
    private int _started;

    /// <summary>
    /// Whether the backward now running is the last before the optimiser step (its gradients are final): only then do
    /// <see cref="GradientReady"/> calls start reductions. A micro-batch whose gradient more micro-batches will add to
    /// leaves it false.
    /// </summary>
    public bool FinalBackward { get; set; }

    /// <summary>Fixes the buckets the gradients of <paramref name="parameters"/> (the optimiser's) are summed in.</summary>
    public void PlanBuckets(IEnumerable<Parameter> parameters)
    {
        if (Ranks == 1 || Group.TensorsOnDevice) return;
        _buckets = [];
        var bucket = new List<Parameter>();
        long values = 0;
        foreach (var p in parameters.Where(p => p.Grad is not null).Reverse())
        {
            if (bucket.Count > 0 && values + p.Grad!.Length > BucketValues)
            {
                _buckets.Add(bucket);
                (bucket, values) = ([], 0);
            }
            bucket.Add(p);
            values += p.Grad!.Length;
        }
        if (bucket.Count > 0) _buckets.Add(bucket);
    }

    /// <summary>
    /// A parameter's gradient is final (the model's backward says so): every bucket whose parameters are all final, in
    /// order, starts its sum while backward goes on.
    /// </summary>
    public void GradientReady(Parameter p)
    {
        if (_buckets is null || !FinalBackward) return;
        _ready.Add(p);
        while (_started < _buckets.Count && _buckets[_started].All(_ready.Contains))
        {
            Start(_buckets[_started++]);
            BucketsStartedInBackward++;
        }
    }

    /// <summary>How many gradient buckets began their sum while backward was still running (over the run so far).</summary>
    public int BucketsStartedInBackward { get; private set; }

    private void Start(List<Parameter> bucket)
    {
        var host = new float[bucket.Sum(p => p.Grad!.Length)];
        long at = 0;
        foreach (var p in bucket)
        {
            p.Grad!.ToFloatArray().CopyTo(host, at);
            at += p.Grad.Length;
        }
        _inFlight.Add((bucket, host, Group.StartAllReduceSum(host)));
    }

    /// <summary>
    /// Sums every trainable parameter's gradient over the group (in place) before the optimiser step: the buckets not
    /// started during backward start now, in order, then every bucket is waited for and copied back. Small tensors
    /// (norms, biases) travel together instead of one collective each.
    /// </summary>
    public void ReduceGradients(IEnumerable<Parameter> parameters)
    {
        if (Ranks == 1) return;
        if (Group.TensorsOnDevice)
        {
            // NCCL: each gradient in place on the device, no host staging.
            foreach (var p in parameters.Where(p => p.Grad is not null)) Group.AllReduceSum(p.Grad!);
            return;
        }
        if (_buckets is null) PlanBuckets(parameters);
        try
        {
            while (_started < _buckets!.Count) Start(_buckets[_started++]);
            foreach (var (bucket, host, wait) in _inFlight)
            {
                wait();
                long at = 0;
                foreach (var p in bucket)
                {
                    p.Grad!.CopyFrom(host.AsSpan((int)at, (int)p.Grad.Length));
                    at += p.Grad.Length;
                }
            }
        }
        finally
        {
            _inFlight.Clear();
            _ready.Clear();
            _started = 0;
            FinalBackward = false;
        }
    }

    /// <summary>
    /// Identical starting weights: rank 0's trainable parameters (fp32 masters and the working copy) sent to every
    /// rank, then checked by hash. Frozen parameters come from the same files on every rank and are checked by hash too.
    /// </summary>
    public void SyncWeights(IReadOnlyList<Parameter> parameters)
    {
        if (Ranks == 1) return;
        foreach (var p in parameters.Where(p => p.Trainable))
        {
            var values = p.Weights.ToFloatArray();
            for (int at = 0; at < values.Length; at += Slice)   // byte spans of at most 1 GiB (a 2^29-value tensor overflows one)
                Group.Broadcast(MemoryMarshal.AsBytes(values.AsSpan(at, Math.Min(Slice, values.Length - at))), 0);
            p.Weights.CopyFrom(values);
            if (p.Master is not null) p.Value.CopyFrom(values);
        }
        CheckSameWeights(parameters, "after loading");
    }

    /// <summary>An xxHash128 of the parameters' fp32 weights, in order.</summary>
    public static UInt128 WeightsHash(IEnumerable<Parameter> parameters)
    {
        var hash = new System.IO.Hashing.XxHash128();
        foreach (var p in parameters)
        {
            var values = p.Weights.ToFloatArray();
            for (int at = 0; at < values.Length; at += Slice) hash.Append(MemoryMarshal.AsBytes(values.AsSpan(at, Math.Min(Slice, values.Length - at))));
        }
        return hash.GetCurrentHashAsUInt128();
    }

    /// <summary>Values per byte span handed to MPI or the hash (2^28 floats, 1 GiB).</summary>
    private const int Slice = 1 << 28;

    /// <summary>Throws, naming the ranks, when any rank's weights hash differently from rank 0's (replicas that drifted apart).</summary>
    public void CheckSameWeights(IEnumerable<Parameter> parameters, string when)
    {
        if (Ranks == 1) return;
        var mine = new[] { WeightsHash(parameters) };
        var all = new UInt128[Ranks];
        Group.AllGather(MemoryMarshal.Cast<UInt128, float>(mine.AsSpan()), MemoryMarshal.Cast<UInt128, float>(all.AsSpan()));
        var differ = Enumerable.Range(1, Ranks - 1).Where(r => all[r] != all[0]).ToList();
        if (differ.Count > 0)
            throw new InvalidOperationException($"the weights of rank(s) {string.Join(", ", differ)} differ from rank 0's {when}: the data-parallel replicas are no longer one model");
    }

    /// <summary>The name of a file only this rank holds (one process: the name itself; else name.rank-NNNNN.ext).</summary>
    public string OwnFile(string name) =>
        Ranks == 1 ? name : $"{Path.GetFileNameWithoutExtension(name)}.rank-{Rank:D5}{Path.GetExtension(name)}";

    /// <summary>
    /// A checkpoint written by every rank: rank 0 makes the temporary directory and tells the others; each rank writes
    /// its own files into it (<paramref name="own"/>); after a barrier rank 0 writes the shared files
    /// (<paramref name="shared"/>), the manifest, and renames it; a second barrier lets no rank run ahead of the rename.
    /// </summary>
    /// <param name="optimizer">Its shard goes into this rank's own file when its state is sharded (ZeRO-1).</param>
    public void SaveCheckpoint(string output, int step, int keep, Optim.AdamWOptimizer optimizer, Action<string> shared, Action<string>? own = null)
    {
        // Every rank's optimiser file (a ZeRO-1 shard, or its slices' moments); a data-parallel rank's own files once, by
        // rank 0 of its tensor-parallel group (the others hold the same buffer).
        var writeOwnOnce = own;
        own = tmp =>
        {
            if (optimizer.KeepsOwnFile) RunCheckpoints.SaveOwnOptimizer(tmp, optimizer);
            if (TensorParallel.Rank == 0) writeOwnOnce?.Invoke(tmp);
        };
        if (World.WorldSize == 1)
        {
            RunCheckpoints.Save(output, step, keep, tmp => { shared(tmp); own(tmp); });
            return;
        }
        // The barriers wait on disk writes (a large checkpoint can take longer than parallel.timeout_s): no time limit.
        if (Writes)
        {
            RunCheckpoints.Save(output, step, keep, tmp =>
            {
                Broadcast(tmp);
                own(tmp);
                WaitForWriter();
                shared(tmp);
            });
        }
        else
        {
            var tmp = Broadcast(null);
            own(tmp);
            WaitForWriter();
        }
        WaitForWriter();
    }

    /// <summary>
    /// Waits, without a time limit, for rank 0 to finish work it does alone (data, earlier stages, evaluation): not a
    /// hang but a stage of the run. A rank 0 that fails ends the whole job, so this never waits for a dead rank.
    /// </summary>
    public void WaitForWriter() => World.Barrier(Timeout.InfiniteTimeSpan);
}
