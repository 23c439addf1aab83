using System.Numerics.Tensors;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// Attention on host memory for the CPU backend's default path, like <see cref="CpuGemm"/>: the ILGPU twins of
/// kernels/attention.cu run one simulated thread per (row, head) with scalar loads and are 5-10x slower on a CPU.
/// Same layout and contract as the kernels: q [T, H, D], k and v [T, Hkv, D], packed sequences, the log-sum-exp saved
/// per (row, head), and a backward that recomputes p from it. Work is split by (sequence, kv head), so every output
/// row (dq, and dk/dv of the group's keys) is written by one task, in a fixed order: results do not depend on the
/// thread count.
/// </summary>
internal static unsafe class CpuAttention
{
    /// <summary>o = softmax(scale q k^T) v per sequence and head (causal: keys up to the row), lse = log sum exp.</summary>
    public static void Forward(float* q, float* k, float* v, float* o, float* lse, int[] cu, int heads, int kvHeads, int dim, float scale, bool causal)
    {
        int group = heads / kvHeads, maxLen = MaxLength(cu);
        ForEachTask(cu, kvHeads, () => new float[maxLen], (s, g, p) =>
        {
            int start = cu[s], end = cu[s + 1];
            for (int hh = 0; hh < group; hh++)
            {
                int h = g * group + hh;
                for (int i = start; i < end; i++)
                {
                    var qi = Row(q, i, heads, h, dim);
                    var oi = Row(o, i, heads, h, dim);
                    int last = causal ? i + 1 : end, n = last - start;
                    float m = float.NegativeInfinity;
                    for (int j = start; j < last; j++)
                        m = MathF.Max(m, p[j - start] = scale * TensorPrimitives.Dot<float>(qi, Row(k, j, kvHeads, g, dim)));
                    oi.Clear();
                    if (n == 0) { lse[(long)i * heads + h] = float.NegativeInfinity; continue; }
                    var scores = p.AsSpan(0, n);
                    TensorPrimitives.Subtract(scores, m, scores);
                    TensorPrimitives.Exp(scores, scores);
                    float l = TensorPrimitives.Sum<float>(scores);
                    for (int j = start; j < last; j++) TensorPrimitives.MultiplyAdd(Row(v, j, kvHeads, g, dim), p[j - start], oi, oi);
                    TensorPrimitives.Multiply(oi, 1f / l, oi);
                    lse[(long)i * heads + h] = m + MathF.Log(l);
                }
            }
        });
    }

    /// <summary>
    /// dq, dk, dv of the forward above (overwritten). delta_i = dO_i . o_i; p_ij = exp(scale q_i.k_j - lse_i);
    /// dS_ij = p_ij (dO_i.v_j - delta_i); dq_i = scale sum_j dS_ij k_j; dk_j = scale sum_i dS_ij q_i; dv_j = sum_i p_ij dO_i.
    /// </summary>
    public static void Backward(float* dout, float* q, float* k, float* v, float* o, float* lse, float* dq, float* dk, float* dv,
        int[] cu, int heads, int kvHeads, int dim, float scale, bool causal)
    {
        int group = heads / kvHeads;
        ForEachTask(cu, kvHeads, () => 0, (s, g, _) =>
        {
            int start = cu[s], end = cu[s + 1];
            for (int j = start; j < end; j++) { Row(dk, j, kvHeads, g, dim).Clear(); Row(dv, j, kvHeads, g, dim).Clear(); }
            for (int hh = 0; hh < group; hh++)
            {
                int h = g * group + hh;
                for (int i = start; i < end; i++)
                {
                    var qi = Row(q, i, heads, h, dim);
                    var doi = Row(dout, i, heads, h, dim);
                    var dqi = Row(dq, i, heads, h, dim);
                    dqi.Clear();
                    float l = lse[(long)i * heads + h];
                    if (float.IsNegativeInfinity(l)) continue;
                    float delta = TensorPrimitives.Dot<float>(doi, Row(o, i, heads, h, dim));
                    int last = causal ? i + 1 : end;
                    for (int j = start; j < last; j++)
                    {
                        var kj = Row(k, j, kvHeads, g, dim);
                        var vj = Row(v, j, kvHeads, g, dim);
                        float p = MathF.Exp(scale * TensorPrimitives.Dot<float>(qi, kj) - l);
                        float ds = p * (TensorPrimitives.Dot<float>(doi, vj) - delta);
                        TensorPrimitives.MultiplyAdd(kj, ds * scale, dqi, dqi);
                        var dkj = Row(dk, j, kvHeads, g, dim);
                        TensorPrimitives.MultiplyAdd(qi, ds * scale, dkj, dkj);
                        var dvj = Row(dv, j, kvHeads, g, dim);
                        TensorPrimitives.MultiplyAdd(doi, p, dvj, dvj);
                    }
                }
            }
        });
    }

    private static Span<float> Row(float* x, int t, int heads, int h, int dim) => new(x + ((long)t * heads + h) * dim, dim);

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
