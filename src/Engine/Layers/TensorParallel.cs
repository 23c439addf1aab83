using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Layers;

/// <summary>
/// Megatron-style tensor parallelism of the decoder over a group of ranks, in one place: which weights each rank
/// holds a slice of, the slice, and the collectives the layers call. Column-parallel (rows of W [out, in] cut): q, k,
/// v (by head: rank r holds query heads [r H/tp, (r+1) H/tp) and the kv heads they read, so GQA stays local) and their
/// biases, gate and up (by MLP column), the embedding and the LM head (by vocabulary). Row-parallel (columns of W
/// cut): o_proj and down, whose partial outputs are summed by an all-reduce in forward; the inputs of the
/// column-parallel layers get the matching all-reduce of their gradient in backward. Norms, the ViT and the adapter
/// are whole on every rank. Size 1 is the identity everywhere.
/// </summary>
public sealed class TensorParallel(ICollectives group)
{
    public static readonly TensorParallel None = new(SingleProcessCollectives.Instance);

    public ICollectives Group { get; } = group;
    public int Size => Group.WorldSize;
    public int Rank => Group.Rank;

    public enum Cut { Whole, Rows, Columns }

    /// <summary>How a checkpoint tensor is cut across the ranks.</summary>
    public static Cut CutOf(string name)
    {
        if (!name.StartsWith("language_model.", StringComparison.Ordinal)) return Cut.Whole;
        if (name.Contains(".self_attn.o_proj.", StringComparison.Ordinal) || name.Contains(".mlp.down_proj.", StringComparison.Ordinal)) return Cut.Columns;
        if (name.Contains(".self_attn.", StringComparison.Ordinal) || name.Contains(".mlp.", StringComparison.Ordinal)
            || name.EndsWith("embed_tokens.weight", StringComparison.Ordinal) || name.EndsWith("lm_head.weight", StringComparison.Ordinal)) return Cut.Rows;
        return Cut.Whole;
    }

    /// <summary>
    /// Refuses a decoder the size does not cut evenly: each rank needs whole query heads, whole kv heads (GQA), an equal
    /// share of the MLP columns and of the vocabulary. The error names <c>parallel.tp</c> and the dimension.
    /// </summary>
    public void Check(Models.LlmConfig c)
    {
        if (Size == 1) return;
        foreach (var (value, what) in new[] { (c.NumHeads, "attention heads"), (c.NumKvHeads, "key/value heads"), (c.IntermediateSize, "MLP columns"), (c.VocabSize, "vocabulary rows") })
            if (value % Size != 0)
                throw new InvalidDataException($"parallel.tp is {Size}, but the decoder's {value} {what} do not split into {Size} equal parts: choose a tensor-parallel size that divides the heads ({c.NumHeads}), kv heads ({c.NumKvHeads}), MLP ({c.IntermediateSize}) and vocabulary ({c.VocabSize})");
    }

    /// <summary>This rank's shape of a tensor whose whole shape is <paramref name="shape"/>; a dimension the size does not divide is an error naming it.</summary>
    public int[] LocalShape(string name, int[] shape)
    {
        var cut = CutOf(name);
        if (Size == 1 || cut == Cut.Whole) return shape;
        int dim = cut == Cut.Rows ? 0 : 1;
        if (shape[dim] % Size != 0)
            throw new ArgumentException($"{name} {string.Join('x', shape)}: dimension {dim} ({shape[dim]}) is not divisible by the tensor-parallel size {Size}");
        var local = (int[])shape.Clone();
        local[dim] /= Size;
        return local;
    }

    /// <summary>This rank's slice of a whole tensor's values (row-major, <paramref name="shape"/>).</summary>
    public float[] Slice(string name, int[] shape, float[] whole)
    {
        var cut = CutOf(name);
        if (Size == 1 || cut == Cut.Whole) return whole;
        var local = LocalShape(name, shape);
        long inner = shape.Skip(1).Aggregate(1L, (a, b) => a * b);
        if (cut == Cut.Rows) return whole.AsSpan((int)(Rank * local[0] * inner), (int)(local[0] * inner)).ToArray();
        int rows = shape[0], cols = shape[1], part = local[1];
        var slice = new float[(long)rows * part];
        for (int r = 0; r < rows; r++) Array.Copy(whole, (long)r * cols + Rank * part, slice, (long)r * part, part);
        return slice;
    }

    /// <summary>The vocabulary rows [Start, Start + Count) of a vocabulary-parallel embedding or head on this rank.</summary>
    public (int Start, int Count) VocabularyRange(int vocabulary) => (Rank * (vocabulary / Size), vocabulary / Size);

    /// <summary>Sums a tensor over the group in place: a row-parallel output in forward, a column-parallel input's gradient in backward.</summary>
    public void AllReduce(Tensor t)
    {
        if (Size > 1) Group.AllReduceSum(t);
    }

    /// <summary>Sums host values over the group (the LM head's per-row statistics).</summary>
    public void AllReduce(Span<double> values)
    {
        if (Size > 1) Group.AllReduceSum(values);
    }

    public void AllReduceMax(Span<double> values)
    {
        if (Size > 1) Group.AllReduceMax(values);
    }

    /// <summary>A cut tensor whole again from every rank's slice (rank order: rows stacked, or each row's column blocks side by side); a whole one as it is.</summary>
    public float[] Gather(string name, int[] shape, float[] local)
    {
        var cut = CutOf(name);
        if (Size == 1 || cut == Cut.Whole) return local;
        var all = new float[local.Length * Size];
        Group.AllGather(local, all);
        if (cut == Cut.Rows) return all;
        int rows = shape[0], part = shape[1] / Size;
        var whole = new float[all.Length];
        for (int r = 0; r < Size; r++)
            for (int i = 0; i < rows; i++) Array.Copy(all, (long)r * local.Length + (long)i * part, whole, (long)i * shape[1] + r * part, part);
        return whole;
    }

    /// <summary>Whether a parameter's values are distinct on each rank (a slice) rather than a replica: its squares count on every rank in a norm.</summary>
    public static bool IsSharded(string name) => CutOf(name) != Cut.Whole;
}
