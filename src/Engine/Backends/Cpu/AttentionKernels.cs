using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>Scalars of an attention launch.</summary>
internal readonly record struct AttentionArgs(int NumSeqs, int Tokens, int Heads, int KvHeads, int Dim, float Scale, int Causal);

/// <summary>
/// ILGPU twins of kernels/attention.cu: the same online softmax over the keys with the log-sum-exp saved, and the
/// same backward that recomputes p from it: dq per (row, head), dk and dv per (key row, kv head), no atomics.
/// One thread per (row, head) where the CUDA kernels use one warp.
/// </summary>
internal static class AttentionKernels
{
    private static int SequenceOf(ArrayView<int> cu, int numSeqs, int t)
    {
        int lo = 0, hi = numSeqs;
        while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (cu[mid] <= t) lo = mid; else hi = mid; }
        return lo;
    }

    public static void Forward(Index1D w, ArrayView<float> o, ArrayView<float> lse, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<int> cu, AttentionArgs a)
    {
        int i = w / a.Heads, h = w % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int s = SequenceOf(cu, a.NumSeqs, i);
        int start = cu[s], end = a.Causal != 0 ? i + 1 : cu[s + 1];
        long qb = ((long)i * a.Heads + h) * a.Dim;
        for (int d = 0; d < a.Dim; d++) o[qb + d] = 0f;
        float m = float.NegativeInfinity, l = 0f;
        for (int j = start; j < end; j++)
        {
            long kb = ((long)j * a.KvHeads + kvh) * a.Dim;
            float sc = 0f;
            for (int d = 0; d < a.Dim; d++) sc += q[qb + d] * a.Scale * k[kb + d];
            float mNew = MathF.Max(m, sc);
            float correction = MathF.Exp(m - mNew), p = MathF.Exp(sc - mNew);
            l = l * correction + p;
            for (int d = 0; d < a.Dim; d++) o[qb + d] = o[qb + d] * correction + p * v[kb + d];
            m = mNew;
        }
        float inv = l > 0f ? 1f / l : 0f;
        for (int d = 0; d < a.Dim; d++) o[qb + d] *= inv;
        lse[w] = l > 0f ? m + MathF.Log(l) : float.NegativeInfinity;
    }

    /// <summary>
    /// Twin of kernels/attention_mma.cu: the same FlashAttention-2 tile schedule per (row, head): keys in tiles of
    /// <paramref name="blockN"/> from the sequence start, masked scores in the exp2 domain, one rescale per tile, p
    /// summed in fp32 but rounded to bf16 before it multiplies V (as the tensor-core P V does).
    /// </summary>
    public static void ForwardTiled(Index1D w, ArrayView<float> o, ArrayView<float> lse, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<int> cu, AttentionArgs a, int blockN)
    {
        int i = w / a.Heads, h = w % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int s = SequenceOf(cu, a.NumSeqs, i);
        int start = cu[s], end = cu[s + 1];
        int keyEnd = a.Causal != 0 ? i + 1 : end;
        long qb = ((long)i * a.Heads + h) * a.Dim;
        float scaleLog2 = a.Scale * 1.4426950408889634f;
        for (int d = 0; d < a.Dim; d++) o[qb + d] = 0f;
        float m = float.NegativeInfinity, l = 0f;
        for (int kb = start; kb < keyEnd; kb += blockN)
        {
            float tileMax = float.NegativeInfinity;
            for (int j = kb; j < kb + blockN; j++)
                if (j < end && (a.Causal == 0 || j <= i)) tileMax = MathF.Max(tileMax, Score(q, k, qb, j, kvh, a) * scaleLog2);
            float mNew = MathF.Max(m, tileMax);
            float b = mNew == float.NegativeInfinity ? 0f : mNew;
            float corr = MathF.Pow(2f, m - b);
            m = mNew;
            l *= corr;
            for (int d = 0; d < a.Dim; d++) o[qb + d] *= corr;
            for (int j = kb; j < kb + blockN; j++)
            {
                if (j >= end || (a.Causal != 0 && j > i)) continue;
                float p = MathF.Pow(2f, Score(q, k, qb, j, kvh, a) * scaleLog2 - b);
                l += p;
                float pb = ILGPU.Interop.IntAsFloat((uint)CpuMath.ToBf16(p) << 16);
                long kb2 = ((long)j * a.KvHeads + kvh) * a.Dim;
                for (int d = 0; d < a.Dim; d++) o[qb + d] += pb * v[kb2 + d];
            }
        }
        float inv = l > 0f ? 1f / l : 0f;
        for (int d = 0; d < a.Dim; d++) o[qb + d] *= inv;
        lse[w] = l > 0f ? (m + MathF.Log2(l)) * 0.6931471805599453f : float.NegativeInfinity;
    }

    private static float Score(ArrayView<float> q, ArrayView<float> k, long qb, int j, int kvh, AttentionArgs a)
    {
        long kb = ((long)j * a.KvHeads + kvh) * a.Dim;
        float sc = 0f;
        for (int d = 0; d < a.Dim; d++) sc += q[qb + d] * k[kb + d];
        return sc;
    }

    private static float Bf16(float x) => ILGPU.Interop.IntAsFloat((uint)CpuMath.ToBf16(x) << 16);

    /// <summary>Twin of attention_mma_backward_dq: p in the exp2 domain from the saved lse, dS rounded to bf16 before dS K.</summary>
    public static void BackwardDqTiled(Index1D w, ArrayView<float> dq, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> dout,
        ArrayView<float> lse, ArrayView<float> delta, ArrayView<int> cu, AttentionArgs a)
    {
        const float log2e = 1.4426950408889634f;
        int i = w / a.Heads, h = w % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int s = SequenceOf(cu, a.NumSeqs, i);
        int start = cu[s], end = a.Causal != 0 ? i + 1 : cu[s + 1];
        long qb = ((long)i * a.Heads + h) * a.Dim;
        for (int d = 0; d < a.Dim; d++) dq[qb + d] = 0f;
        float l2 = lse[w] * log2e, dl = delta[w];
        for (int j = start; j < end; j++)
        {
            long kb = ((long)j * a.KvHeads + kvh) * a.Dim;
            float sc = 0f, dp = 0f;
            for (int d = 0; d < a.Dim; d++) { sc += q[qb + d] * k[kb + d]; dp += dout[qb + d] * v[kb + d]; }
            float ds = Bf16(MathF.Pow(2f, sc * a.Scale * log2e - l2) * (dp - dl));
            for (int d = 0; d < a.Dim; d++) dq[qb + d] += ds * k[kb + d];
        }
        for (int d = 0; d < a.Dim; d++) dq[qb + d] *= a.Scale;
    }

    /// <summary>
    /// The unscaled dk and dv of key row kb from query head h's rows first .. end-1, in order, added at <paramref name="at"/>:
    /// P and dS rounded to bf16 where the tensor cores take them as operands.
    /// </summary>
    private static void AddKeyGradients(ArrayView<float> dk, ArrayView<float> dv, long at, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dout, ArrayView<float> lse, ArrayView<float> delta, long kb, int h, int first, int end, AttentionArgs a)
    {
        const float log2e = 1.4426950408889634f;
        for (int i = first; i < end; i++)
        {
            long qb = ((long)i * a.Heads + h) * a.Dim;
            float sc = 0f, dp = 0f;
            for (int d = 0; d < a.Dim; d++) { sc += k[kb + d] * q[qb + d]; dp += v[kb + d] * dout[qb + d]; }
            long r = (long)i * a.Heads + h;
            float p = MathF.Pow(2f, sc * a.Scale * log2e - lse[r] * log2e);
            float pb = Bf16(p), ds = Bf16(p * (dp - delta[r]));
            for (int d = 0; d < a.Dim; d++) { dv[at + d] += pb * dout[qb + d]; dk[at + d] += ds * q[qb + d]; }
        }
    }

    /// <summary>Twin of attention_mma_backward_dkdv: P and dS rounded to bf16 before they multiply dO and q.</summary>
    public static void BackwardDkDvTiled(Index1D w, ArrayView<float> dk, ArrayView<float> dv, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dout, ArrayView<float> lse, ArrayView<float> delta, ArrayView<int> cu, AttentionArgs a)
    {
        int j = w / a.KvHeads, g = w % a.KvHeads, group = a.Heads / a.KvHeads;
        int s = SequenceOf(cu, a.NumSeqs, j);
        int first = a.Causal != 0 ? j : cu[s], end = cu[s + 1];
        long kb = ((long)j * a.KvHeads + g) * a.Dim;
        for (int d = 0; d < a.Dim; d++) { dk[kb + d] = 0f; dv[kb + d] = 0f; }
        for (int hh = 0; hh < group; hh++) AddKeyGradients(dk, dv, kb, q, k, v, dout, lse, delta, kb, g * group + hh, first, end, a);
        for (int d = 0; d < a.Dim; d++) dk[kb + d] *= a.Scale;
    }

    /// <summary>
    /// Twin of attention_flash_backward's dq: split sp of <paramref name="splits"/> owns the 128-key tiles t with
    /// t % splits == sp (global tile numbers from <paramref name="tiles"/>) and adds dS (rounded to bf16) times k into its
    /// own fp32 partial [splits, T, H, D], tiles in ascending order; <see cref="FlashDqReduce"/> adds the partials in split order.
    /// </summary>
    public static void BackwardDqFlash(Index1D w, ArrayView<float> partial, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dout, ArrayView<float> lse, ArrayView<float> delta, ArrayView<int> cu, ArrayView<int> tiles, AttentionArgs a, int splits)
    {
        const float log2e = 1.4426950408889634f;
        int i = w / a.Heads, h = w % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int s = SequenceOf(cu, a.NumSeqs, i);
        int start = cu[s], end = a.Causal != 0 ? i + 1 : cu[s + 1];
        long n = (long)a.Tokens * a.Heads * a.Dim, qb = ((long)i * a.Heads + h) * a.Dim;
        for (int sp = 0; sp < splits; sp++)
            for (int d = 0; d < a.Dim; d++) partial[sp * n + qb + d] = 0f;
        float l2 = lse[w] * log2e, dl = delta[w];
        for (int j = start; j < end; j++)
        {
            long kb = ((long)j * a.KvHeads + kvh) * a.Dim;
            float sc = 0f, dp = 0f;
            for (int d = 0; d < a.Dim; d++) { sc += q[qb + d] * k[kb + d]; dp += dout[qb + d] * v[kb + d]; }
            float ds = Bf16(MathF.Pow(2f, sc * a.Scale * log2e - l2) * (dp - dl));
            long at = (tiles[s] + (j - cu[s]) / Backend.FlashTileRows) % splits * n + qb;
            for (int d = 0; d < a.Dim; d++) partial[at + d] += ds * k[kb + d];
        }
    }

    /// <summary>Twin of attention_flash_dq_reduce: dq = scale * (partial 0 + partial 1 + ...), in split order.</summary>
    public static void FlashDqReduce(Index1D e, ArrayView<float> dq, ArrayView<float> partial, int splits, float scale)
    {
        long n = dq.Length;
        float sum = 0f;
        for (int sp = 0; sp < splits; sp++) sum += partial[sp * n + e];
        dq[e] = sum * scale;
    }

    /// <summary>
    /// Twin of attention_flash_backward's dk and dv per (key row, query head): P and dS rounded to bf16, queries in
    /// ascending order, unscaled, into fp32 [T, H, D]; <see cref="FlashHeadsReduce"/> adds each kv head's query heads in order.
    /// </summary>
    public static void BackwardDkDvFlash(Index1D w, ArrayView<float> dkHeads, ArrayView<float> dvHeads, ArrayView<float> q, ArrayView<float> k,
        ArrayView<float> v, ArrayView<float> dout, ArrayView<float> lse, ArrayView<float> delta, ArrayView<int> cu, AttentionArgs a)
    {
        int j = w / a.Heads, h = w % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int s = SequenceOf(cu, a.NumSeqs, j);
        int first = a.Causal != 0 ? j : cu[s], end = cu[s + 1];
        long kb = ((long)j * a.KvHeads + kvh) * a.Dim, ob = ((long)j * a.Heads + h) * a.Dim;
        for (int d = 0; d < a.Dim; d++) { dkHeads[ob + d] = 0f; dvHeads[ob + d] = 0f; }
        AddKeyGradients(dkHeads, dvHeads, ob, q, k, v, dout, lse, delta, kb, h, first, end, a);
    }

    /// <summary>Twin of attention_flash_dkdv_reduce per (key row, kv head): the group's query heads added in order; dk times scale.</summary>
    public static void FlashHeadsReduce(Index1D w, ArrayView<float> dk, ArrayView<float> dv, ArrayView<float> dkHeads, ArrayView<float> dvHeads, AttentionArgs a)
    {
        int j = w / a.KvHeads, g = w % a.KvHeads, group = a.Heads / a.KvHeads;
        long ob = ((long)j * a.KvHeads + g) * a.Dim, first = ((long)j * a.Heads + (long)g * group) * a.Dim;
        for (int d = 0; d < a.Dim; d++)
        {
            float sk = 0f, sv = 0f;
            for (int hh = 0; hh < group; hh++) { sk += dkHeads[first + (long)hh * a.Dim + d]; sv += dvHeads[first + (long)hh * a.Dim + d]; }
            dk[ob + d] = sk * a.Scale;
            dv[ob + d] = sv;
        }
    }

    public static void Delta(Index1D w, ArrayView<float> delta, ArrayView<float> o, ArrayView<float> dout, int dim)
    {
        long b = (long)w.X * dim;
        float s = 0f;
        for (int d = 0; d < dim; d++) s += dout[b + d] * o[b + d];
        delta[w] = s;
    }

    public static void BackwardDq(Index1D w, ArrayView<float> dq, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<float> dout,
        ArrayView<float> lse, ArrayView<float> delta, ArrayView<int> cu, AttentionArgs a)
    {
        int i = w / a.Heads, h = w % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int s = SequenceOf(cu, a.NumSeqs, i);
        int start = cu[s], end = a.Causal != 0 ? i + 1 : cu[s + 1];
        long qb = ((long)i * a.Heads + h) * a.Dim;
        for (int d = 0; d < a.Dim; d++) dq[qb + d] = 0f;
        float l = lse[w], dl = delta[w];
        for (int j = start; j < end; j++)
        {
            long kb = ((long)j * a.KvHeads + kvh) * a.Dim;
            float sc = 0f, dp = 0f;
            for (int d = 0; d < a.Dim; d++) { sc += q[qb + d] * a.Scale * k[kb + d]; dp += dout[qb + d] * v[kb + d]; }
            float ds = MathF.Exp(sc - l) * (dp - dl);
            for (int d = 0; d < a.Dim; d++) dq[qb + d] += ds * k[kb + d];
        }
        for (int d = 0; d < a.Dim; d++) dq[qb + d] *= a.Scale;
    }

    public static void BackwardDkDv(Index1D w, ArrayView<float> dk, ArrayView<float> dv, ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dout, ArrayView<float> lse, ArrayView<float> delta, ArrayView<int> cu, AttentionArgs a)
    {
        int j = w / a.KvHeads, g = w % a.KvHeads, group = a.Heads / a.KvHeads;
        int s = SequenceOf(cu, a.NumSeqs, j);
        int first = a.Causal != 0 ? j : cu[s], end = cu[s + 1];
        long kb = ((long)j * a.KvHeads + g) * a.Dim;
        for (int d = 0; d < a.Dim; d++) { dk[kb + d] = 0f; dv[kb + d] = 0f; }
        for (int hh = 0; hh < group; hh++)
        {
            int h = g * group + hh;
            for (int i = first; i < end; i++)
            {
                long qb = ((long)i * a.Heads + h) * a.Dim;
                float sc = 0f, dp = 0f;
                for (int d = 0; d < a.Dim; d++) { sc += q[qb + d] * k[kb + d]; dp += dout[qb + d] * v[kb + d]; }
                long r = (long)i * a.Heads + h;
                float p = MathF.Exp(sc * a.Scale - lse[r]);
                float ds = p * (dp - delta[r]);
                for (int d = 0; d < a.Dim; d++) { dv[kb + d] += p * dout[qb + d]; dk[kb + d] += ds * q[qb + d]; }
            }
        }
        for (int d = 0; d < a.Dim; d++) dk[kb + d] *= a.Scale;
    }
}
