using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Backends;

/// <summary>
/// Sequence boundaries of a packed batch: cu_seqlens [S + 1] with cu[0] = 0, non-decreasing, cu[S] = T. Validated
/// once on the host when made, then used by every attention call without a device round trip.
/// </summary>
public sealed class PackedSequences : IDisposable
{
    internal PackedSequences(Backend backend, int[] cuSeqlens)
    {
        if (cuSeqlens.Length < 2 || cuSeqlens[0] != 0) throw new ArgumentException("cu_seqlens must start with 0 and hold at least one sequence");
        for (int s = 1; s < cuSeqlens.Length; s++)
            if (cuSeqlens[s] < cuSeqlens[s - 1]) throw new ArgumentException($"cu_seqlens[{s}] = {cuSeqlens[s]} is below cu_seqlens[{s - 1}] = {cuSeqlens[s - 1]}");
        Host = (int[])cuSeqlens.Clone();
        Device = backend.FromArray(cuSeqlens, [cuSeqlens.Length], "cu_seqlens");
        _backend = backend;
    }

    /// <summary>Boundaries of sequences of the given lengths, packed in order.</summary>
    public static int[] FromLengths(IEnumerable<int> lengths)
    {
        var cu = new List<int> { 0 };
        foreach (var n in lengths) cu.Add(cu[^1] + (n >= 0 ? n : throw new ArgumentException("negative sequence length")));
        return [.. cu];
    }

    public int[] Host { get; }
    public Tensor Device { get; }
    public int Count => Host.Length - 1;
    public int Tokens => Host[^1];

    private readonly Dictionary<int, (int[] Host, Tensor Device)> _tiles = new();
    private Backend? _backend;

    /// <summary>
    /// Query tiles of <paramref name="tileRows"/> rows per sequence as offsets [S + 1]: tiles of sequence s are
    /// offsets[s] .. offsets[s+1]-1 (a tile never spans two sequences). Made once per tile size.
    /// </summary>
    public (int[] Host, Tensor Device) TileOffsets(int tileRows)
    {
        if (_tiles.TryGetValue(tileRows, out var t)) return t;
        var offsets = new int[Host.Length];
        for (int s = 0; s < Count; s++) offsets[s + 1] = offsets[s] + (Host[s + 1] - Host[s] + tileRows - 1) / tileRows;
        t = (offsets, _backend!.FromArray(offsets, [offsets.Length], "tile_offsets"));
        _tiles[tileRows] = t;
        return t;
    }

    /// <summary>Position ids that restart at every sequence start.</summary>
    public int[] Positions()
    {
        var pos = new int[Tokens];
        for (int s = 0; s < Count; s++)
            for (int t = Host[s]; t < Host[s + 1]; t++) pos[t] = t - Host[s];
        return pos;
    }

    public void Dispose()
    {
        Device.Dispose();
        foreach (var (_, d) in _tiles.Values) d.Dispose();
        _tiles.Clear();
    }
}

/// <summary>
/// Row indices validated on the host when made (each in [0, bound), and distinct when they are scatter targets), so
/// kernels that move rows never read or write outside their tensors.
/// </summary>
public sealed class RowIndex : IDisposable
{
    internal RowIndex(Backend backend, int[] rows, int bound, bool distinct, string name)
    {
        var seen = distinct ? new HashSet<int>() : null;
        for (int i = 0; i < rows.Length; i++)
        {
            if (rows[i] < 0 || rows[i] >= bound) throw new ArgumentException($"{name}[{i}] = {rows[i]} is outside [0, {bound})");
            if (seen is not null && !seen.Add(rows[i])) throw new ArgumentException($"{name}[{i}] = {rows[i]} repeats an earlier row; scatter targets must be distinct");
        }
        Host = (int[])rows.Clone();
        Bound = bound;
        Distinct = distinct;
        Device = backend.FromArray(rows, [Math.Max(rows.Length, 0)], name);
    }

    public int[] Host { get; }
    public int Bound { get; }
    public bool Distinct { get; }
    public Tensor Device { get; }
    public int Length => Host.Length;

    public void Dispose() => Device.Dispose();
}

/// <summary>
/// The block tables and context lengths of a decode batch over a paged KV cache, validated on the host: every block
/// id inside the cache, every length within the sequence's blocks. Uploaded once per decode step, used by every layer.
/// </summary>
public sealed class PagedBatch : IDisposable
{
    internal PagedBatch(Backend backend, IReadOnlyList<IReadOnlyList<int>> blockTables, int[] contextLengths, int blockSize, int numBlocks)
    {
        if (blockTables.Count != contextLengths.Length) throw new ArgumentException($"{blockTables.Count} block tables but {contextLengths.Length} context lengths");
        if (blockTables.Count == 0) throw new ArgumentException("a paged batch needs at least one sequence");
        MaxBlocks = Math.Max(1, blockTables.Max(t => t.Count));
        var flat = new int[blockTables.Count * MaxBlocks];
        for (int b = 0; b < blockTables.Count; b++)
        {
            var t = blockTables[b];
            if (contextLengths[b] < 1 || contextLengths[b] > t.Count * blockSize)
                throw new ArgumentException($"sequence {b}: context length {contextLengths[b]} does not fit its {t.Count} blocks of {blockSize}");
            for (int i = 0; i < t.Count; i++)
            {
                if (t[i] < 0 || t[i] >= numBlocks) throw new ArgumentException($"sequence {b}: block {t[i]} is outside the cache's {numBlocks} blocks");
                flat[b * MaxBlocks + i] = t[i];
            }
        }
        Batch = blockTables.Count;
        BlockSize = blockSize;
        ContextLengths = (int[])contextLengths.Clone();
        Tables = backend.FromArray(flat, [flat.Length], "block_tables");
        Lengths = backend.FromArray(contextLengths, [contextLengths.Length], "context_lens");
    }

    public int Batch { get; }
    public int MaxBlocks { get; }
    public int BlockSize { get; }
    public int[] ContextLengths { get; }
    public Tensor Tables { get; }
    public Tensor Lengths { get; }

    public void Dispose()
    {
        Tables.Dispose();
        Lengths.Dispose();
    }
}

/// <summary>Sampling settings of one sequence. Temperature 0 is greedy; TopK 0 and TopP 1 disable those filters.</summary>
public sealed record SamplingParams(float Temperature = 1f, int TopK = 0, float TopP = 1f, float MinP = 0f, float RepetitionPenalty = 1f)
{
    public static SamplingParams Greedy { get; } = new(Temperature: 0f);

    public void Validate()
    {
        if (!float.IsFinite(Temperature) || Temperature < 0) throw new ArgumentException($"temperature must be >= 0, got {Temperature}");
        if (TopK < 0) throw new ArgumentException($"top-k must be >= 0, got {TopK}");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException($"top-p must be in (0, 1], got {TopP}");
        if (!(MinP >= 0 && MinP < 1)) throw new ArgumentException($"min-p must be in [0, 1), got {MinP}");
        if (!(RepetitionPenalty > 0) || !float.IsFinite(RepetitionPenalty)) throw new ArgumentException($"repetition penalty must be > 0, got {RepetitionPenalty}");
    }
}

/// <summary>One row of a sampling call: its settings, RNG seed and step, and the tokens the penalty looks at.</summary>
public readonly record struct SampleRow(SamplingParams Params, ulong Seed, int Step, IReadOnlyList<int> Previous);

/// <summary>
/// The row layout of a packed batch whose sequences share prefixes (a GRPO group's prompt, its samples differing only
/// in their responses): token-wise layers run on each distinct row once (T' rows), attention on the per-sequence
/// layout (T rows, the batch's cu_seqlens). <see cref="Expand"/> [T] names the distinct row each attention row reads;
/// <see cref="Output"/> [T'] names the attention row whose output each distinct row takes (a shared prefix row takes
/// the first sequence's: every copy computes the same attention there, since a row attends only to rows before it).
/// </summary>
public sealed class SharedRows : IDisposable
{
    private readonly Backend _b;

    public SharedRows(Backend backend, int[] expand, int[] output)
    {
        _b = backend;
        if (expand.Length < output.Length) throw new ArgumentException($"shared rows: {expand.Length} attention rows cannot hold {output.Length} distinct rows");
        Expand = backend.Rows(expand, output.Length, distinct: false, "expand_rows");
        try
        {
            Output = backend.Rows(output, expand.Length, distinct: true, "output_rows");
            for (int r = 0; r < output.Length; r++)
                if (expand[output[r]] != r) throw new ArgumentException($"shared rows: distinct row {r} takes attention row {output[r]}, which reads distinct row {expand[output[r]]}");
        }
        catch
        {
            Expand.Dispose();
            Output?.Dispose();
            throw;
        }
    }

    public RowIndex Expand { get; }
    public RowIndex Output { get; }

    /// <summary>T' distinct rows.</summary>
    public int DistinctRows => Output.Length;

    /// <summary>T attention rows.</summary>
    public int AttentionRows => Expand.Length;

    /// <summary>[T', C] -> [T, C]: each attention row a copy of the distinct row it reads.</summary>
    public Tensor Gather(Tensor distinct) => GatherBy(distinct, Expand);

    /// <summary>[T, C] -> [T', C]: each distinct row's own attention row.</summary>
    public Tensor Select(Tensor attention) => GatherBy(attention, Output);

    private Tensor GatherBy(Tensor source, RowIndex index)
    {
        var rows = _b.Allocate(source.DType, index.Length, source.Cols);
        _b.GatherRows(source, index, rows);
        return rows;
    }

    /// <summary>The backward of <see cref="Select"/>: [T', C] -> [T, C], zero in the rows no distinct row takes.</summary>
    public Tensor SelectBackward(Tensor dDistinct)
    {
        var all = _b.Allocate(dDistinct.DType, AttentionRows, dDistinct.Cols);
        _b.ScatterRows(dDistinct, Output, all);
        return all;
    }

    /// <summary>
    /// The backward of <see cref="Gather"/>: [T, C] -> [T', C], each distinct row the sum of the attention rows that
    /// read it, added in row order in fp32 (deterministic), in <paramref name="dAttention"/>'s type.
    /// </summary>
    public Tensor GatherBackward(Tensor dAttention)
    {
        var sum = _b.Allocate(DType.F32, DistinctRows, dAttention.Cols);
        _b.EmbeddingBackward(dAttention, Expand.Device, sum);
        if (dAttention.DType == DType.F32) return sum;
        using (sum)
        {
            var typed = _b.Allocate(dAttention.DType, DistinctRows, dAttention.Cols);
            _b.Convert(sum, typed);
            return typed;
        }
    }

    public void Dispose()
    {
        Expand.Dispose();
        Output.Dispose();
    }
}

/// <summary>
/// RoPE's cosines and sines per (position, pair): [positions, D/2, 2] fp32, the exactly rounded cosine and sine of the
/// fp32 angle pos * theta^(-2i/D) (the angle HF forms), made on the host so every backend reads the same values.
/// Owned by its backend (<see cref="Backend.RopeTable(float, int, int)"/>).
/// </summary>
public sealed class RopeTable
{
    internal RopeTable(Backend backend, float theta, int dim, int positions, Tensor values) => (Backend, Theta, Dim, Positions, Values) = (backend, theta, dim, positions, values);

    public Backend Backend { get; }
    public float Theta { get; }
    public int Dim { get; }
    public int Positions { get; }
    public Tensor Values { get; }

    public static float[] Build(float theta, int dim, int positions)
    {
        int half = dim / 2;
        var v = new float[Math.Max(1, positions) * (long)half * 2];
        var invFreq = new float[half];
        for (int i = 0; i < half; i++) invFreq[i] = 1f / MathF.Pow(theta, (float)(2 * i) / dim);
        Parallel.For(0, positions, p =>
        {
            for (int i = 0; i < half; i++)
            {
                double a = (float)p * invFreq[i]; // the fp32 angle
                v[((long)p * half + i) * 2] = (float)Math.Cos(a);
                v[((long)p * half + i) * 2 + 1] = (float)Math.Sin(a);
            }
        });
        return v;
    }
}
