using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;

namespace R1V2.Native.Trainer.Parallel;

/// <summary>
/// Data parallelism as the trainers see it, in one place: every rank draws the same global batch (same seed, same
/// data position) and trains on its share (examples i with i mod world == rank); loss normalisers are global counts;
/// gradients are summed across ranks before the norm, the clip and AdamW, so every rank takes the same step from the
/// same weights. One writer (rank 0) writes metrics, checkpoints and reports. In one process every call is the identity.
/// </summary>
public sealed class DataParallel(ICollectives group)
{
    public static readonly DataParallel Single = new(SingleProcessCollectives.Instance);

    public ICollectives Group { get; } = group;
    public int Ranks => Group.WorldSize;

    /// <summary>Whether this rank writes the run's files.</summary>
    public bool Writes => Group.Rank == 0;

    /// <summary>This rank's share of a global batch; a batch smaller than the group is an error naming the setting.</summary>
    public List<T> Shard<T>(IReadOnlyList<T> global, string setting)
    {
        if (global.Count < Ranks) throw new InvalidDataException($"{setting} is {global.Count}, fewer than the {Ranks} data-parallel ranks: each rank needs at least one example");
        return [.. global.Where((_, i) => i % Ranks == Group.Rank)];
    }

    /// <summary>Sums of per-rank values (token counts, loss sums) over the group.</summary>
    public double[] Sum(params double[] local)
    {
        Group.AllReduceSum(local);
        return local;
    }

    /// <summary>Sums every trainable parameter's gradient over the group (in place).</summary>
    public void ReduceGradients(IEnumerable<Parameter> parameters)
    {
        if (Ranks == 1) return;
        foreach (var p in parameters)
            if (p.Grad is not null) Group.AllReduceSum(p.Grad);
    }
}
