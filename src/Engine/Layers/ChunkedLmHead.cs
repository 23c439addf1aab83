using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Layers;

/// <summary>
/// Pass 1 of a chunked LM head over the rows that have a target: the gathered hidden rows [R, D], their targets, each
/// row's running max and sum of exp(logit / T) over the vocabulary, and its target's scaled logit. What pass 2
/// (<see cref="ChunkedLmHead.Backward"/>) needs to remake each chunk's logits and turn them into their gradient.
/// </summary>
public sealed class ScoredRows : IDisposable
{
    private readonly Activations _held = new();

    internal ScoredRows(int totalRows, int[] rows, int vocabulary, float inverseTemperature, TensorParallel tp, int columnOffset, int localRows) =>
        (TotalRows, Rows, Vocabulary, InverseTemperature, TensorParallel, ColumnOffset, LocalRows) = (totalRows, rows, vocabulary, inverseTemperature, tp, columnOffset, localRows);

    /// <summary>Vocabulary-parallel head: the ranks' group, the first vocabulary id this rank's head rows hold, and how many of them the softmax covers.</summary>
    public TensorParallel TensorParallel { get; }
    public int ColumnOffset { get; }
    public int LocalRows { get; }

    /// <summary>T: the rows of the hidden states the pass was given.</summary>
    public int TotalRows { get; }

    /// <summary>[R]: the positions (among the T) whose target is scored, ascending.</summary>
    public int[] Rows { get; }

    /// <summary>The vocabulary ids the softmax covers (over every rank's head rows).</summary>
    public int Vocabulary { get; }

    public float InverseTemperature { get; }

    /// <summary>[R, D]: the scored rows' hidden states (a gathered copy, or the given tensor when every row is scored).</summary>
    public Tensor Hidden { get; internal set; } = null!;

    /// <summary>[R] target ids; [R] running max, sum of exp and target logit, all scaled by 1 / T, fp32.</summary>
    public Tensor Targets { get; internal set; } = null!;
    public Tensor Max { get; internal set; } = null!;
    public Tensor Sum { get; internal set; } = null!;
    public Tensor TargetLogit { get; internal set; } = null!;

    internal T Keep<T>(T item) where T : IDisposable => _held.Keep(item);

    /// <summary>log softmax(logits / T)[target] of each of the R rows, from the pass's statistics (double on the host).</summary>
    public float[] RowLogProbs()
    {
        float[] m = Max.ToFloatArray(), s = Sum.ToFloatArray(), t = TargetLogit.ToFloatArray();
        var logp = new float[Rows.Length];
        for (int i = 0; i < logp.Length; i++) logp[i] = (float)(t[i] - m[i] - Math.Log(s[i]));
        return logp;
    }

    /// <summary>Values of the R rows placed at their positions among the T (0 elsewhere).</summary>
    public float[] Spread(float[] rowValues)
    {
        if (rowValues.Length != Rows.Length) throw new ArgumentException($"{rowValues.Length} values for {Rows.Length} scored rows");
        var all = new float[TotalRows];
        for (int i = 0; i < Rows.Length; i++) all[Rows[i]] = rowValues[i];
        return all;
    }

    /// <summary>The R scored rows' entries of a per-position array [T].</summary>
    public float[] Pick(float[] values)
    {
        if (values.Length != TotalRows) throw new ArgumentException($"{values.Length} values for {TotalRows} rows");
        var picked = new float[Rows.Length];
        for (int i = 0; i < Rows.Length; i++) picked[i] = values[Rows[i]];
        return picked;
    }

    public void Dispose() => _held.Dispose();
}

/// <summary>
/// The LM head and a log-softmax over the vocabulary without ever holding [T, V] logits: only the rows whose next
/// token is scored enter the head (prompt and image rows do not), and the vocabulary is walked in chunks. Pass 1 makes
/// each chunk's fp32 logits [R, chunk] with a GEMM and folds them into a running log-sum-exp and the target's logit;
/// pass 2 remakes each chunk, turns it into its logit gradient in place (softmax - onehot, times d loss / d log p)
/// and applies it to the hidden-state gradient and the head's weight gradient. Peak memory beyond the hidden states:
/// R x D (the gathered rows and their gradient) + R x chunk fp32. Every stage's log-probs come from here: supervised
/// NLL, the preference stages' sequence log-probs (policy and reference), GRPO's loss and reference, scoring.
/// <para>
/// <c>vocabLimit</c>: the softmax runs over the head's first rows only (the tokenizer's ids, as sampling does); the
/// padding rows of a wider head get no gradient. Null: every row.
/// </para>
/// <para>
/// Vocabulary parallel (<see cref="TensorParallel"/>): each rank's head holds vocabulary rows [r V/tp, (r+1) V/tp).
/// Pass 1 runs over its own rows, then one all-reduce MAX of the row maxima and one all-reduce SUM of the rescaled
/// sums of exp and of the target logit (found on the rank that holds the target) give every rank the whole
/// log-sum-exp; pass 2 makes its own chunks' gradient, and the hidden-state gradient is all-reduced. [T, V] is never
/// gathered.
/// </para>
/// </summary>
public static class ChunkedLmHead
{
    public const int DefaultChunk = 8192;

    /// <summary>Pass 1 over the rows of <paramref name="hidden"/> [T, D] whose target is not negative.</summary>
    public static ScoredRows Forward(Backend b, Tensor hidden, Parameter head, int[] targets, float temperature = 1f, int vocabChunk = DefaultChunk,
        int? vocabLimit = null, TensorParallel? tensorParallel = null)
    {
        int t = hidden.Rows;
        if (targets.Length != t) throw new ArgumentException($"{targets.Length} targets for {t} hidden rows");
        if (vocabChunk < 1) throw new ArgumentOutOfRangeException(nameof(vocabChunk), $"vocabulary chunk {vocabChunk} must be at least 1");
        if (!(temperature > 0)) throw new ArgumentOutOfRangeException(nameof(temperature), $"temperature {temperature} must be positive");
        var tp = tensorParallel ?? TensorParallel.None;
        int headRows = head.Value.Dim(0), offset = tp.Rank * headRows;
        int v = HeadRows(headRows * tp.Size, vocabLimit);
        int local = Math.Clamp(v - offset, 0, headRows);
        var rows = new List<int>();
        for (int i = 0; i < t; i++)
        {
            if (targets[i] >= v) throw new ArgumentException($"target {i} is token {targets[i]}, outside the {v} vocabulary rows the head covers");
            if (targets[i] >= 0) rows.Add(i);
        }
        var scored = new ScoredRows(t, [.. rows], v, 1f / temperature, tp, offset, local);
        try
        {
            Pass1(b, hidden, head, targets, vocabChunk, scored);
            return scored;
        }
        catch
        {
            scored.Dispose();
            throw;
        }
    }

    private static void Pass1(Backend b, Tensor hidden, Parameter head, int[] targets, int vocabChunk, ScoredRows scored)
    {
        int t = hidden.Rows, r = scored.Rows.Length, v = scored.LocalRows, offset = scored.ColumnOffset;
        float invT = scored.InverseTemperature;
        if (r == t) scored.Hidden = hidden;
        else
        {
            scored.Hidden = scored.Keep(b.Allocate(hidden.DType, [r, hidden.Cols], "scored_hidden"));
            if (r > 0) using (var index = b.Rows(scored.Rows, t, distinct: true, "scored_rows")) b.GatherRows(hidden, index, scored.Hidden);
        }
        scored.Targets = scored.Keep(b.FromArray(scored.Rows.Select(i => targets[i]).ToArray(), [r], "targets"));
        scored.Max = scored.Keep(b.FromArray(Enumerable.Repeat(float.NegativeInfinity, r).ToArray(), DType.F32, [r], "lse_max"));
        scored.Sum = scored.Keep(b.Allocate(DType.F32, [r], "lse_sum"));
        scored.TargetLogit = scored.Keep(b.Allocate(DType.F32, [r], "target_logit"));
        if (r == 0) return;
        var tp = scored.TensorParallel;
        if (tp.Size > 1)
        {
            b.Zero(scored.Sum);
            b.Zero(scored.TargetLogit);   // the ranks that do not hold a row's target add 0 for it
        }
        for (int c0 = 0; c0 < v; c0 += vocabChunk)
        {
            int n = Math.Min(vocabChunk, v - c0);
            using var chunk = Linear.ForwardF32(b, scored.Hidden, head.Value.SliceRows(c0, n));   // fp32 logits [R, chunk]
            b.ChunkLseUpdate(chunk, scored.Targets, offset + c0, invT, scored.Max, scored.Sum, scored.TargetLogit);
        }
        if (tp.Size == 1) return;
        // The whole vocabulary's log-sum-exp: the largest row maximum, every rank's sum rescaled to it, the target's logit.
        float[] max = scored.Max.ToFloatArray(), sum = scored.Sum.ToFloatArray(), target = scored.TargetLogit.ToFloatArray();
        var global = max.Select(x => (double)x).ToArray();
        tp.AllReduceMax(global);
        var sums = new double[2 * r];
        for (int i = 0; i < r; i++)
        {
            sums[i] = float.IsNegativeInfinity(max[i]) ? 0 : sum[i] * Math.Exp(max[i] - global[i]);
            sums[r + i] = target[i];
        }
        tp.AllReduce(sums);
        scored.Max.CopyFrom(global.Select(x => (float)x).ToArray());
        scored.Sum.CopyFrom(sums.Take(r).Select(x => (float)x).ToArray());
        scored.TargetLogit.CopyFrom(sums.Skip(r).Select(x => (float)x).ToArray());
    }

    /// <summary>
    /// log softmax(logits / temperature)[target] at each of the T positions (0 where the target is ignored).
    /// </summary>
    public static float[] LogProbs(Backend b, Tensor hidden, Parameter head, int[] targets, float temperature = 1f, int vocabChunk = DefaultChunk,
        int? vocabLimit = null, TensorParallel? tensorParallel = null)
    {
        using var scored = Forward(b, hidden, head, targets, temperature, vocabChunk, vocabLimit, tensorParallel);
        return scored.Spread(scored.RowLogProbs());
    }

    /// <summary>
    /// Pass 2: from d loss / d log p of the R scored rows ([R] fp32 on the device), accumulates the head's weight
    /// gradient (when it has one) and returns d loss / d hidden [T, D] of <paramref name="gradType"/>, zero in the rows
    /// that were not scored.
    /// </summary>
    public static Tensor Backward(Backend b, ScoredRows scored, Parameter head, Tensor dLogProb, DType gradType, int vocabChunk = DefaultChunk)
    {
        int r = scored.Rows.Length, d = scored.Hidden.Cols;
        if (dLogProb.Length != r) throw new ArgumentException($"{dLogProb.Length} log-prob gradients for {r} scored rows");
        var w = head.Value;
        var dRows = b.Allocate(DType.F32, r, d);   // d hidden of the scored rows, fp32 while the chunks add into it
        try
        {
            if (r > 0) b.Zero(dRows);
            for (int c0 = 0; c0 < scored.LocalRows && r > 0; c0 += vocabChunk)
            {
                int n = Math.Min(vocabChunk, scored.LocalRows - c0);
                var wc = w.SliceRows(c0, n);
                using var chunk = Linear.ForwardF32(b, scored.Hidden, wc);
                b.ChunkLogitGrad(chunk, scored.Max, scored.Sum, scored.Targets, dLogProb, scored.ColumnOffset + c0, scored.InverseTemperature);
                // The GEMMs take dlogits in the storage type (bf16 on CUDA: gradients tolerate its rounding, log-probs do not).
                using var stored = wc.DType == DType.F32 ? null : b.Allocate(wc.DType, r, n);
                if (stored is not null) b.Convert(chunk, stored);
                var dlogits = stored ?? chunk;
                b.Gemm(dlogits, false, wc, false, dRows, beta: 1f);                                                  // dH += dlogits W_chunk
                if (head.Grad is not null) b.Gemm(dlogits, true, scored.Hidden, false, head.Grad.SliceRows(c0, n), beta: 1f); // dW_chunk += dlogits^T H
            }
            if (r > 0) scored.TensorParallel.AllReduce(dRows);   // every rank's vocabulary rows contribute to d hidden
        }
        catch
        {
            dRows.Dispose();
            throw;
        }
        var typed = dRows;
        if (gradType != DType.F32)
            using (dRows)
            {
                typed = b.Allocate(gradType, r, d);
                b.Convert(dRows, typed);
            }
        if (r == scored.TotalRows) return typed;
        using (typed)
        {
            var dHidden = b.Allocate(gradType, scored.TotalRows, d);
            b.Zero(dHidden);
            if (r > 0) using (var index = b.Rows(scored.Rows, scored.TotalRows, distinct: true, "scored_rows")) b.ScatterRows(typed, index, dHidden);
            return dHidden;
        }
    }

    /// <summary>The head rows the softmax covers: all, or the first <paramref name="vocabLimit"/>.</summary>
    public static int HeadRows(Parameter head, int? vocabLimit) => HeadRows(head.Value.Dim(0), vocabLimit);

    private static int HeadRows(int v, int? vocabLimit)
    {
        if (vocabLimit is { } limit && (limit < 1 || limit > v)) throw new ArgumentOutOfRangeException(nameof(vocabLimit), $"vocabulary limit {limit} outside [1, {v}] head rows");
        return vocabLimit ?? v;
    }
}
