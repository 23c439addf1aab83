using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Trainer.Parallel;

namespace R1V2.Native.Trainer.Optim;

/// <summary>Result of one optimiser step.</summary>
public readonly record struct StepReport(int Step, double GradNorm, double ClipScale, float LearningRate, bool Skipped);

/// <summary>
/// AdamW over the trainable parameters: fp32 moments, the fused update kernel on the fp32 master weights, the bf16
/// working copy refreshed in the same pass, and global-norm clipping folded into the update as a gradient scale.
/// A step whose gradient norm is not finite is skipped (no state changes) and reported.
/// <para>
/// Data parallel: the step first sums the gradients over the ranks (bucketed all-reduce), so every rank takes the same
/// step. Sharded (ZeRO-1, <c>parallel.shard_optimizer</c>): the trainable parameters, laid end to end, are cut into one
/// contiguous shard per rank; each rank keeps the fp32 master copy and the two moments of its shard only. A step
/// reduce-scatters the gradients (each rank receives the sum of its shard), takes the norm over all shards, updates
/// its shard, and all-gathers the updated weights into every rank's parameters.
/// </para>
/// </summary>
public sealed class AdamWOptimizer : IDisposable
{
    private readonly Backend _b;
    private readonly List<(Parameter P, Tensor M, Tensor V)> _state = [];
    private readonly DataParallel _dp;
    private readonly TensorParallel _tp;

    // ZeRO-1: this rank's shard [ShardStart, ShardStart + shard) of the flat parameters, padded to ranks x shard.
    private readonly Tensor? _master, _grad, _m, _v;
    private readonly long _total;
    private readonly int _shard;

    /// <param name="dataParallel">The ranks whose gradients each step sums (one process by default).</param>
    /// <param name="shardState">Keep masters and moments for this rank's shard only (ZeRO-1).</param>
    /// <param name="tensorParallel">Tensor parallel: the gradient norm counts each rank's slices of the cut tensors once
    /// (their squares summed over the group) and the whole tensors once.</param>
    public AdamWOptimizer(Backend backend, IEnumerable<Parameter> parameters, AdamWSettings settings, double maxGradNorm = 1.0,
        DataParallel? dataParallel = null, bool shardState = false, TensorParallel? tensorParallel = null)
    {
        _b = backend;
        _tp = tensorParallel ?? TensorParallel.None;
        Settings = settings;
        MaxGradNorm = maxGradNorm;
        _dp = dataParallel ?? DataParallel.Single;
        var trainable = parameters.Where(p => p.Trainable).ToList();
        Sharded = shardState;
        if (!shardState)
        {
            foreach (var p in trainable)
                _state.Add((p, backend.Allocate(DType.F32, p.Weights.Shape.ToArray(), p.Name + ".exp_avg"), backend.Allocate(DType.F32, p.Weights.Shape.ToArray(), p.Name + ".exp_avg_sq")));
            _dp.PlanBuckets(trainable);
            return;
        }
        foreach (var p in trainable) _state.Add((p, null!, null!));
        _total = trainable.Sum(p => p.Weights.Length);
        long shard = (_total + _dp.Ranks - 1) / _dp.Ranks;
        if (shard * _dp.Ranks > Array.MaxLength)
            throw new NotSupportedException($"parallel.shard_optimizer: {_total} trainable values do not fit the host staging of the MPI path ({Array.MaxLength} at most)");
        _shard = (int)shard;
        _master = backend.FromArray(Flat(p => p.Weights).AsSpan(ShardStart, _shard), DType.F32, [_shard], "optimizer.master_shard");
        // This rank's shard is the only fp32 master it keeps (a bf16 device's whole-parameter masters go).
        foreach (var p in trainable) p.ReleaseMaster();
        _grad = backend.Allocate(DType.F32, [_shard], "optimizer.grad_shard");
        _m = backend.Allocate(DType.F32, [_shard], "optimizer.exp_avg_shard");
        _v = backend.Allocate(DType.F32, [_shard], "optimizer.exp_avg_sq_shard");
    }

    public AdamWSettings Settings { get; }
    public double MaxGradNorm { get; }
    public int StepCount { get; private set; }

    /// <summary>Whether masters and moments are sharded over the data-parallel ranks (ZeRO-1).</summary>
    public bool Sharded { get; }

    /// <summary>Where this rank's shard starts in the flat parameters.</summary>
    private int ShardStart => _shard * _dp.Rank;

    /// <summary>The bytes of optimiser state this rank holds: moments, and the fp32 master shard when sharded.</summary>
    public long StateBytes => Sharded ? 4L * 4 * _shard : _state.Sum(s => 2 * s.M.Bytes);

    /// <summary>
    /// Whether each rank keeps its optimiser state in a file of its own: a ZeRO-1 shard, or with tensor parallelism the
    /// moments of its slices (different on every rank of a tensor-parallel group).
    /// </summary>
    public bool KeepsOwnFile => Sharded || _tp.Size > 1;

    /// <summary>This rank's optimiser file in a checkpoint: optimizer.rank-NNNNN.safetensors, by its rank in the launch.</summary>
    public string OwnFile => $"optimizer.rank-{_dp.World.Rank:D5}.safetensors";

    /// <summary>The parameters' tensors (weights or gradients) end to end, zero-padded to ranks x shard.</summary>
    private float[] Flat(Func<Parameter, Tensor> of)
    {
        var flat = new float[(long)_shard * _dp.Ranks];
        long at = 0;
        foreach (var (p, _, _) in _state)
        {
            var t = of(p);
            t.ToFloatArray().CopyTo(flat, at);
            at += t.Length;
        }
        return flat;
    }

    /// <summary>This rank's shard state (step, master, moments) for its checkpoint file.</summary>
    public (int Step, float[] Master, float[] M, float[] V) ExportShard() =>
        Sharded ? (StepCount, _master!.ToFloatArray(), _m!.ToFloatArray(), _v!.ToFloatArray()) : throw new InvalidOperationException("the optimiser state is not sharded");

    public void ImportShard(int step, float[] master, float[] m, float[] v)
    {
        if (!Sharded) throw new InvalidOperationException("the optimiser state is not sharded");
        if (master.Length != _shard || m.Length != _shard || v.Length != _shard)
            throw new InvalidDataException($"{OwnFile} holds a shard of {m.Length} values; this launch's shard is {_shard} ({_total} trainable values over {_dp.Ranks} ranks): resume on the world size that wrote it");
        _master!.CopyFrom(master);
        _m!.CopyFrom(m);
        _v!.CopyFrom(v);
        StepCount = step;
    }

    /// <summary>The moments of every trainable parameter by name, and the step count (for checkpoints).</summary>
    public (int Step, IReadOnlyList<(string Name, int[] Shape, float[] M, float[] V)> Moments) Export() => Sharded
        ? throw new InvalidOperationException("the optimiser state is sharded: each rank exports its own (ExportShard)")
        : (StepCount, _state.Select(s => (s.P.Name, s.M.Shape.ToArray(), s.M.ToFloatArray(), s.V.ToFloatArray())).ToList());

    /// <summary>The names of the parameters this optimiser updates, in order.</summary>
    public IEnumerable<string> ParameterNames => _state.Select(s => s.P.Name);

    public void Import(int step, IReadOnlyDictionary<string, (float[] M, float[] V)> moments)
    {
        if (Sharded) throw new InvalidOperationException("the optimiser state is sharded: each rank imports its own (ImportShard)");
        foreach (var (p, m, _) in _state)
            if (moments.TryGetValue(p.Name, out var mv) && mv.M.Length != m.Length)
                throw new InvalidDataException($"optimiser state for '{p.Name}' holds {mv.M.Length} values, the parameter here {m.Length}: it was written with another tensor-parallel size; resume it as it was written");
        foreach (var (p, m, v) in _state)
        {
            if (!moments.TryGetValue(p.Name, out var mv)) throw new InvalidDataException($"optimiser state has no moments for '{p.Name}'");
            m.CopyFrom(mv.M);
            v.CopyFrom(mv.V);
        }
        StepCount = step;
    }

    public void ZeroGrad()
    {
        foreach (var (p, _, _) in _state) p.ZeroGrad();
    }

    public StepReport Step(float learningRate)
    {
        if (Sharded) return ShardedStep(learningRate);
        _dp.ReduceGradients(_state.Select(s => s.P));
        var grads = _state.Select(s => s.P.Grad!).ToList();
        double norm = _b.GlobalNorm(grads);
        if (_tp.Size > 1)
        {
            double sliced = _b.GlobalNorm([.. _state.Where(s => TensorParallel.IsSharded(s.P.Name)).Select(s => s.P.Grad!)], shardedOver: _tp.Group);
            double whole = _b.GlobalNorm([.. _state.Where(s => !TensorParallel.IsSharded(s.P.Name)).Select(s => s.P.Grad!)]);
            norm = Math.Sqrt(sliced * sliced + whole * whole);
        }
        if (!double.IsFinite(norm)) return new StepReport(StepCount, norm, 0, learningRate, Skipped: true);
        double scale = MaxGradNorm > 0 ? Backend.ClipScale(norm, MaxGradNorm) : 1.0;
        StepCount++;
        var s = Settings with { LearningRate = learningRate };
        _b.AdamW([.. _state.Select(x => new AdamWTensors(x.P.Weights, x.P.Grad!, x.M, x.V, x.P.Master is null ? null : x.P.Value))], s, StepCount, (float)scale);
        return new StepReport(StepCount, norm, scale, learningRate, Skipped: false);
    }

    private StepReport ShardedStep(float learningRate)
    {
        var mine = new float[_shard];
        _dp.Group.ReduceScatterSum(Flat(p => p.Grad!), mine);
        _grad!.CopyFrom(mine);
        double norm;
        if (_tp.Size == 1) norm = _b.GlobalNorm([_grad], shardedOver: _dp.Group);   // each shard's squares once, summed over the ranks
        else
        {
            // With tensor parallelism the shard spans slices (distinct on each tensor-parallel rank: summed over that group
            // too) and whole tensors (the same on each: counted once).
            var squares = new double[2];
            long offset = 0, start = ShardStart, end = ShardStart + (long)_shard;
            foreach (var (p, _, _) in _state)
            {
                long from = Math.Max(offset, start), to = Math.Min(offset + p.Weights.Length, end);
                int k = TensorParallel.IsSharded(p.Name) ? 0 : 1;
                for (long i = from; i < to; i++) squares[k] += (double)mine[i - start] * mine[i - start];
                offset += p.Weights.Length;
            }
            _dp.Group.AllReduceSum(squares);
            Span<double> sliced = [squares[0]];
            _tp.Group.AllReduceSum(sliced);
            norm = Math.Sqrt(sliced[0] + squares[1]);
        }
        if (!double.IsFinite(norm)) return new StepReport(StepCount, norm, 0, learningRate, Skipped: true);
        double scale = MaxGradNorm > 0 ? Backend.ClipScale(norm, MaxGradNorm) : 1.0;
        StepCount++;
        _b.AdamW(_master!, _grad, _m!, _v!, null, Settings with { LearningRate = learningRate }, StepCount, (float)scale);
        var all = new float[(long)_shard * _dp.Ranks];
        _dp.Group.AllGather(_master!.ToFloatArray(), all);
        long at = 0;
        foreach (var (p, _, _) in _state)
        {
            var values = all.AsSpan((int)at, (int)p.Weights.Length);
            p.Weights.CopyFrom(values);
            if (p.Master is not null) p.Value.CopyFrom(values);
            at += p.Weights.Length;
        }
        return new StepReport(StepCount, norm, scale, learningRate, Skipped: false);
    }

    public void Dispose()
    {
        if (Sharded)
        {
            _master!.Dispose(); _grad!.Dispose(); _m!.Dispose(); _v!.Dispose();
            return;
        }
        foreach (var (_, m, v) in _state) { m.Dispose(); v.Dispose(); }
    }
}
