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
