using R1V2.Native.Engine.Models;

namespace R1V2.Native.Trainer.Ssb;

/// <summary>
/// One sampled response with what a policy update needs: the prompt (and its image tiles), the response tokens, the
/// log-probs they were sampled with (old log-probs), the reward, the group advantage, and the step it was born in.
/// </summary>
public sealed record Rollout(int Prompt, int[] PromptIds, float[]? Pixels, int Tiles, int[] Response, float[] OldLogProbs, double Reward, double Advantage, int Born)
{
    /// <summary>Rollouts packed for teacher forcing (<see cref="VlmBatch.Pack"/>): the responses are the targets.</summary>
    public static (VlmBatch Batch, int[] ResponseStarts) Pack(IReadOnlyList<Rollout> rollouts, int imageContextId) =>
        VlmBatch.Pack(rollouts.Select(r => (r.PromptIds, r.Response, r.Pixels, r.Tiles)).ToList(), imageContextId);

    /// <summary>Rollouts packed with each prompt's rows computed once for the rollouts that share it (<see cref="VlmBatch.PackShared"/>).</summary>
    public static (VlmBatch Batch, int[] ResponseStarts) PackShared(IReadOnlyList<Rollout> rollouts, int imageContextId) =>
        VlmBatch.PackShared(rollouts.Select(r => (r.PromptIds, r.Response, r.Pixels, r.Tiles)).ToList(), imageContextId);
}

/// <summary>An update batch and how much of it carries signal.</summary>
public sealed record UpdateBatch(IReadOnlyList<Rollout> Samples, int Fresh, int Replayed, int TargetSize)
{
    /// <summary>Share of the intended batch with non-zero advantage (the paper's effective-sample ratio).</summary>
    public double EffectiveRatio => TargetSize == 0 ? 0 : Samples.Count(s => Math.Abs(s.Advantage) > SelectiveSampleBuffer.ZeroAdvantage) / (double)TargetSize;
}

/// <summary>
/// The Selective Sample Buffer of R1V2: groups whose samples all got the same reward have zero advantage and are
/// dropped; samples with non-zero advantage are kept (up to <c>capacity</c>, oldest evicted first, none older than
/// <c>maxAge</c> steps); each update batch is this step's informative samples topped up to the target size with buffer
/// samples drawn without replacement with probability proportional to |A| (Efraimidis-Spirakis keys u^(1/|A|)).
/// Replayed samples keep the old log-probs they were generated with, so their PPO ratios stay well defined.
/// </summary>
public sealed class SelectiveSampleBuffer(int capacity, int maxAge, ulong seed)
{
    public const double ZeroAdvantage = 1e-8;

    private readonly LinkedList<Rollout> _items = new();
    private ulong _state = seed;

    public int Capacity { get; } = capacity > 0 ? capacity : throw new ArgumentOutOfRangeException(nameof(capacity));
    public int MaxAge { get; } = maxAge > 0 ? maxAge : throw new ArgumentOutOfRangeException(nameof(maxAge));
    public int Count => _items.Count;
    public IEnumerable<Rollout> Items => _items;

    /// <summary>RNG state and contents, for checkpoints.</summary>
    public (ulong Rng, IReadOnlyList<Rollout> Items) Snapshot() => (_state, _items.ToList());

    public void Restore(ulong rng, IEnumerable<Rollout> items)
    {
        _state = rng;
        _items.Clear();
        foreach (var r in items) _items.AddLast(r);
    }

    /// <summary>
    /// Builds this step's update batch from the fresh rollouts, then keeps their informative ones. <paramref name="informative"/>:
    /// which rollouts carry the task's signal (default: a non-zero advantage; with a KL penalty in the advantages, a
    /// non-zero advantage of the task rewards).
    /// </summary>
    public UpdateBatch Build(IReadOnlyList<Rollout> fresh, int targetSize, int step, Func<Rollout, bool>? informative = null)
    {
        while (_items.First is { } oldest && oldest.Value.Born < step - MaxAge) _items.RemoveFirst();
        var kept = fresh.Where(informative ?? IsInformative).ToList();
        int room = Math.Max(0, targetSize - kept.Count);
        var replay = Draw(room);
        foreach (var r in kept)
        {
            _items.AddLast(r);
            if (_items.Count > Capacity) _items.RemoveFirst();
        }
        return new UpdateBatch([.. kept, .. replay], kept.Count, replay.Count, targetSize);
    }

    /// <summary>A rollout with a non-zero advantage.</summary>
    public static bool IsInformative(Rollout r) => Math.Abs(r.Advantage) > ZeroAdvantage;

    /// <summary>Up to <paramref name="count"/> buffered samples, without replacement, with probability proportional to |A|.</summary>
    public List<Rollout> Draw(int count)
    {
        if (count <= 0 || _items.Count == 0) return [];
        return _items.Select(r => (Key: Math.Log(NextUniform()) / Math.Abs(r.Advantage), Item: r))
            .OrderByDescending(x => x.Key).Take(count).Select(x => x.Item).ToList();
    }

    /// <summary>A uniform in (0, 1) from the buffer's own splitmix64 stream (reproducible and checkpointable).</summary>
    private double NextUniform()
    {
        _state += 0x9E3779B97F4A7C15ul;
        ulong z = _state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ul;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBul;
        z ^= z >> 31;
        return ((z >> 11) + 0.5) / (1ul << 53);
    }
}

/// <summary>
/// DAPO-style dynamic sampling, the alternative to the buffer: sample more groups until the batch holds the target
/// number of informative groups (some sample differs in reward from the others), within a bounded number of rounds.
/// </summary>
public static class DynamicSampling
{
    /// <param name="sampleRound">Samples round r: this rank's groups (data parallel: prompt i of the round on rank i mod R).</param>
    /// <param name="dataParallel">Data parallel: which groups are kept, and whether another round is needed, are decided on
    /// every rank's groups in the global order (the groups one process would have); each rank returns its own kept ones.</param>
    public static (List<IReadOnlyList<Rollout>> Groups, int Rounds) Fill(Func<int, IReadOnlyList<IReadOnlyList<Rollout>>> sampleRound, int targetGroups, int maxRounds,
        Func<Rollout, bool>? informative = null, Parallel.DataParallel? dataParallel = null)
    {
        var dp = dataParallel ?? Parallel.DataParallel.Single;
        var kept = new List<IReadOnlyList<Rollout>>();
        int keptAnywhere = 0, round = 0;
        while (keptAnywhere < targetGroups && round < maxRounds)
        {
            var groups = sampleRound(round);
            var flags = groups.Select(g => g.Any(informative ?? SelectiveSampleBuffer.IsInformative) ? 1.0 : 0.0).ToList();
            var global = dp.Gather(flags, (int)dp.Sum(flags.Count)[0]);
            for (int i = 0; i < global.Length && keptAnywhere < targetGroups; i++)
            {
                if (global[i] == 0) continue;
                keptAnywhere++;
                if (i % dp.Ranks == dp.Rank) kept.Add(groups[i / dp.Ranks]);
            }
            round++;
        }
        return (kept, round);
    }

    /// <summary>Offline pre-filter: keep a prompt only when its G samples do not all get the same reward.</summary>
    public static bool Informative(IReadOnlyList<double> groupRewards) => groupRewards.Count > 1 && groupRewards.Max() - groupRewards.Min() > SelectiveSampleBuffer.ZeroAdvantage;
}
