using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// Attention on host memory for the CPU backend's default path, like <see cref="CpuGemm"/>: the ILGPU twins of
/// kernels/attention.cu run one simulated thread per (row, head) with scalar loads and are 5-10x slower on a CPU.
/// Same layout and contract as the kernels: q [T, H, D], k and v [T, Hkv, D], packed sequences, the log-sum-exp saved
/// per (row, head), and a backward that recomputes p from it.
/// <para>
/// Work is split by (sequence, kv head). A task first copies its keys and values transposed ([D, n]: a row of the
/// copy is one feature over all keys), so a row's scores, and in the backward dp, dk and dv, are SIMD sweeps over the
/// keys, D of them, instead of one short dot product per key (the digit model's heads have D = 16 or 24). Every
/// output row is written by one task in a fixed order: results do not depend on the thread count.
/// </para>
/// </summary>
internal static unsafe class CpuAttention
{
    /// <summary>o = softmax(scale q k^T) v per sequence and head (causal: keys up to the row), lse = log sum exp.</summary>
    public static void Forward(float* q, float* k, float* v, float* o, float* lse, int[] cu, int heads, int kvHeads, int dim, float scale, bool causal)
    {
        int group = heads / kvHeads, maxLen = MaxLength(cu);
        ForEachTask(cu, kvHeads, () => new Scratch(maxLen, dim), (s, g, w) =>
        {
            int start = cu[s], n = cu[s + 1] - start;
            fixed (float* kt = w.Kt, vr = w.Rows, p = w.P)
            {
                Gather(k + (long)start * kvHeads * dim + g * dim, kvHeads * dim, n, dim, kt, vr: null);
                Gather(v + (long)start * kvHeads * dim + g * dim, kvHeads * dim, n, dim, null, vr);
                for (int hh = 0; hh < group; hh++)
                {
                    int h = g * group + hh;
                    for (int i = 0; i < n; i++)
                    {
                        float* qi = q + ((long)(start + i) * heads + h) * dim;
                        float* oi = o + ((long)(start + i) * heads + h) * dim;
                        int count = causal ? i + 1 : n;
                        lse[(long)(start + i) * heads + h] = AttendRow(qi, kt, vr, n, dim, count, scale, p, oi);
                    }
                }
            }
        });
    }

    /// <summary>
    /// dq, dk, dv of the forward above (overwritten). delta_i = dO_i . o_i; p_ij = exp(scale q_i.k_j - lse_i);
    /// dS_ij = p_ij (dO_i.v_j - delta_i); dq_i = scale sum_j dS_ij k_j; dk_j = scale sum_i dS_ij q_i; dv_j = sum_i p_ij dO_i.
    /// dk and dv are summed transposed (one SIMD sweep over the keys per feature) and written back at the end.
    /// </summary>
    public static void Backward(float* dout, float* q, float* k, float* v, float* o, float* lse, float* dq, float* dk, float* dv,
        int[] cu, int heads, int kvHeads, int dim, float scale, bool causal)
    {
        int group = heads / kvHeads, maxLen = MaxLength(cu);
        ForEachTask(cu, kvHeads, () => new Scratch(maxLen, dim, backward: true), (s, g, w) =>
        {
            int start = cu[s], n = cu[s + 1] - start;
            long kvStride = (long)kvHeads * dim;
            fixed (float* kt = w.Kt, kr = w.Rows, vt = w.Vt, dkt = w.DKt, dvt = w.DVt, p = w.P, dp = w.Dp)
            {
                Gather(k + start * kvStride + g * dim, kvHeads * dim, n, dim, kt, kr);
                Gather(v + start * kvStride + g * dim, kvHeads * dim, n, dim, vt, null);
                new Span<float>(dkt, dim * n).Clear();
                new Span<float>(dvt, dim * n).Clear();
                for (int hh = 0; hh < group; hh++)
                {
                    int h = g * group + hh;
                    for (int i = 0; i < n; i++)
                    {
                        long row = (long)(start + i) * heads + h;
                        float* qi = q + row * dim, doi = dout + row * dim, dqi = dq + row * dim;
                        new Span<float>(dqi, dim).Clear();
                        float l = lse[row];
                        if (float.IsNegativeInfinity(l)) continue;
                        float delta = TensorPrimitives.Dot<float>(new ReadOnlySpan<float>(doi, dim), new ReadOnlySpan<float>(o + row * dim, dim));
                        int count = causal ? i + 1 : n;
                        Scores(qi, kt, n, dim, count, scale, p);
                        var ps = new Span<float>(p, count);
                        TensorPrimitives.Subtract(ps, l, ps);
                        TensorPrimitives.Exp(ps, ps);
                        Scores(doi, vt, n, dim, count, 1f, dp);               // dp_j = dO_i . v_j
                        for (int j = 0; j < count; j++) dp[j] = p[j] * (dp[j] - delta); // dS_ij
                        for (int j = 0; j < count; j++) Axpy(dqi, kr + (long)j * dim, dp[j] * scale, dim);
                        for (int d = 0; d < dim; d++)
                        {
                            Axpy(dkt + (long)d * n, dp, qi[d] * scale, count);
                            Axpy(dvt + (long)d * n, p, doi[d], count);
                        }
                    }
                }
                Scatter(dkt, n, dim, dk + start * kvStride + g * dim, kvHeads * dim);
                Scatter(dvt, n, dim, dv + start * kvStride + g * dim, kvHeads * dim);
            }
        });
    }

    /// <summary>
    /// Decode attention over a paged KV cache: one query row per sequence, q [B, H, D], cache [slots, Hkv, D], the
    /// sequence's keys at slots table[b][t / blockSize] * blockSize + t % blockSize for t &lt; length[b]. The result
    /// is what kernels/paged_attention.cu computes; its split of the keys over thread blocks is a GPU work division
    /// with no counterpart here: a task per (sequence, kv head) gathers that head's keys once, transposed, for the
    /// group's query heads.
    /// </summary>
    public static void PagedDecode(float* q, float* kCache, float* vCache, int* tables, int* lengths, float* output,
        int batch, int maxBlocks, int blockSize, int heads, int kvHeads, int dim, float scale)
    {
        int group = heads / kvHeads, maxLen = 0;
        long work = 0;
        for (int b = 0; b < batch; b++) { maxLen = Math.Max(maxLen, lengths[b]); work += (long)lengths[b] * dim * heads; }
        var options = new ParallelOptions { MaxDegreeOfParallelism = work < HostOps.ParallelFrom ? 1 : Environment.ProcessorCount };
        Parallel.For(0, batch * kvHeads, options, () => new Scratch(maxLen, dim), (task, _, w) =>
        {
            int b = task / kvHeads, g = task % kvHeads, n = lengths[b];
            fixed (float* kt = w.Kt, vr = w.Rows, p = w.P)
            {
                for (int j = 0; j < n; j++)
                {
                    long slot = (long)tables[(long)b * maxBlocks + j / blockSize] * blockSize + j % blockSize;
                    float* kj = kCache + (slot * kvHeads + g) * dim, vj = vCache + (slot * kvHeads + g) * dim;
                    for (int d = 0; d < dim; d++) kt[(long)d * n + j] = kj[d];
                    new ReadOnlySpan<float>(vj, dim).CopyTo(new Span<float>(vr + (long)j * dim, dim));
                }
                for (int hh = 0; hh < group; hh++)
                {
                    int h = g * group + hh;
                    float* qi = q + ((long)b * heads + h) * dim, oi = output + ((long)b * heads + h) * dim;
                    if (n == 0) new Span<float>(oi, dim).Clear();
                    else AttendRow(qi, kt, vr, n, dim, n, scale, p, oi);
                }
            }
            return w;
        }, _ => { });
    }

    /// <summary>
    /// One query row against the first <paramref name="count"/> of n keys (kt [D, n] transposed, v [n, D] rows):
    /// o = softmax(scale q k^T) v into <paramref name="o"/>, p as scratch; returns the log-sum-exp.
    /// </summary>
    private static float AttendRow(float* q, float* kt, float* v, int n, int dim, int count, float scale, float* p, float* o)
    {
        Scores(q, kt, n, dim, count, scale, p);
        var scores = new Span<float>(p, count);
        float m = TensorPrimitives.Max<float>(scores);
        TensorPrimitives.Subtract(scores, m, scores);
        TensorPrimitives.Exp(scores, scores);
        float l = TensorPrimitives.Sum<float>(scores);
        new Span<float>(o, dim).Clear();
        for (int j = 0; j < count; j++) Axpy(o, v + (long)j * dim, p[j], dim);
        Scale(o, 1f / l, dim);
        return m + MathF.Log(l);
    }

    /// <summary>Per-task buffers: keys and values transposed ([D, n]) or as rows ([n, D]), dk and dv transposed, p and dp.</summary>
    private sealed class Scratch(int maxLen, int dim, bool backward = false)
    {
        public readonly float[] Kt = new float[Math.Max(1, maxLen * dim)];
        public readonly float[] Rows = new float[Math.Max(1, maxLen * dim)];
        public readonly float[] Vt = new float[backward ? Math.Max(1, maxLen * dim) : 1];
        public readonly float[] DKt = new float[backward ? Math.Max(1, maxLen * dim) : 1];
        public readonly float[] DVt = new float[backward ? Math.Max(1, maxLen * dim) : 1];
        public readonly float[] P = new float[Math.Max(1, maxLen)];
        public readonly float[] Dp = new float[Math.Max(1, maxLen)];
    }

    /// <summary>Copies n strided rows of D values: transposed into t ([D, n]) and/or contiguous into r ([n, D]).</summary>
    private static void Gather(float* x, long stride, int n, int dim, float* t, float* vr)
    {
        for (int j = 0; j < n; j++)
        {
            float* xj = x + j * stride;
            if (t != null) for (int d = 0; d < dim; d++) t[(long)d * n + j] = xj[d];
            if (vr != null) new ReadOnlySpan<float>(xj, dim).CopyTo(new Span<float>(vr + (long)j * dim, dim));
        }
    }

    /// <summary>Writes a transposed [D, n] sum back to n strided rows.</summary>
    private static void Scatter(float* t, int n, int dim, float* x, long stride)
    {
        for (int j = 0; j < n; j++)
        {
            float* xj = x + j * stride;
            for (int d = 0; d < dim; d++) xj[d] = t[(long)d * n + j];
        }
    }

    /// <summary>out[j] = scale * sum_d a[d] * bt[d, j] for j &lt; count (bt is [D, n]): D SIMD sweeps over the keys.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Scores(float* a, float* bt, int n, int dim, int count, float scale, float* output)
    {
        new Span<float>(output, count).Clear();
        for (int d = 0; d < dim; d++) Axpy(output, bt + (long)d * n, a[d], count);
        if (scale != 1f) Scale(output, scale, count);
    }

    /// <summary>y[0..n) += a * x[0..n).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Axpy(float* y, float* x, float a, int n)
    {
        int w = Vector<float>.Count, i = 0;
        var av = new Vector<float>(a);
        for (; i + w <= n; i += w)
            Unsafe.WriteUnaligned(y + i, Vector.FusedMultiplyAdd(av, Unsafe.ReadUnaligned<Vector<float>>(x + i), Unsafe.ReadUnaligned<Vector<float>>(y + i)));
        for (; i < n; i++) y[i] = MathF.FusedMultiplyAdd(a, x[i], y[i]);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Scale(float* y, float a, int n)
    {
        int w = Vector<float>.Count, i = 0;
        var av = new Vector<float>(a);
        for (; i + w <= n; i += w) Unsafe.WriteUnaligned(y + i, av * Unsafe.ReadUnaligned<Vector<float>>(y + i));
        for (; i < n; i++) y[i] *= a;
    }

    private static int MaxLength(int[] cu)
    {
        int max = 0;
        for (int s = 0; s + 1 < cu.Length; s++) max = Math.Max(max, cu[s + 1] - cu[s]);
        return max;
    }

    /// <summary>Runs body(sequence, kv head, scratch) for every non-empty pair, in parallel when there is enough work.</summary>
    private static void ForEachTask<TScratch>(int[] cu, int kvHeads, Func<TScratch> scratch, Action<int, int, TScratch> body)
    {
        int seqs = cu.Length - 1;
        long work = 0;
        for (int s = 0; s < seqs; s++) work += (long)(cu[s + 1] - cu[s]) * (cu[s + 1] - cu[s]);
        var options = new ParallelOptions { MaxDegreeOfParallelism = work * kvHeads < 4096 ? 1 : Environment.ProcessorCount };
        Parallel.For(0, seqs * kvHeads, options, scratch, (task, _, local) =>
        {
            int s = task / kvHeads, g = task % kvHeads;
            if (cu[s + 1] > cu[s]) body(s, g, local);
            return local;
        }, _ => { });
    }
}
