using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>Scalars of a paged decode launch.</summary>
internal readonly record struct PagedArgs(int Batch, int MaxBlocks, int BlockSize, int Heads, int KvHeads, int Dim, int Splits, int SplitBlocks, float Scale);

/// <summary>ILGPU twins of kernels/paged_attention.cu: the same split-KV partials (online softmax) and the same combine.</summary>
internal static class PagedAttentionKernels
{
    public static void KvAppend(Index1D thread, ArrayView<float> kCache, ArrayView<float> vCache, ArrayView<float> k, ArrayView<float> v, ArrayView<int> slots, int rowLength, int threads)
    {
        for (long i = thread; i < k.Length; i += threads)
        {
            long dst = (long)slots[i / rowLength] * rowLength + i % rowLength;
            kCache[dst] = k[i];
            vCache[dst] = v[i];
        }
    }

    /// <summary>One thread per (sequence, head, split), as one warp on the GPU.</summary>
    public static void DecodePartial(Index1D w, ArrayView<float> partialO, ArrayView<float> partialLse, ArrayView<float> q, ArrayView<float> kCache, ArrayView<float> vCache,
        ArrayView<int> blockTables, ArrayView<int> contextLens, PagedArgs a)
    {
        int split = w % a.Splits, bh = w / a.Splits, b = bh / a.Heads, h = bh % a.Heads, kvh = h / (a.Heads / a.KvHeads);
        int len = contextLens[b];
        int first = split * a.SplitBlocks * a.BlockSize, last = Math.Min(len, first + a.SplitBlocks * a.BlockSize);
        long ob = (long)w.X * a.Dim, qb = (long)bh * a.Dim;
        for (int d = 0; d < a.Dim; d++) partialO[ob + d] = 0f;
        float m = float.NegativeInfinity, l = 0f;
        for (int t = first; t < last; t++)
        {
            int slot = blockTables[(long)b * a.MaxBlocks + t / a.BlockSize] * a.BlockSize + t % a.BlockSize;
            long kb = ((long)slot * a.KvHeads + kvh) * a.Dim;
            float s = 0f;
            for (int d = 0; d < a.Dim; d++) s += q[qb + d] * a.Scale * kCache[kb + d];
            float mn = MathF.Max(m, s), corr = MathF.Exp(m - mn), p = MathF.Exp(s - mn);
            l = l * corr + p;
            for (int d = 0; d < a.Dim; d++) partialO[ob + d] = partialO[ob + d] * corr + p * vCache[kb + d];
            m = mn;
        }
        float inv = l > 0f ? 1f / l : 0f;
        for (int d = 0; d < a.Dim; d++) partialO[ob + d] *= inv;
        partialLse[w] = l > 0f ? m + MathF.Log(l) : float.NegativeInfinity;
    }

    public static void Combine(Index1D r, ArrayView<float> output, ArrayView<float> partialO, ArrayView<float> partialLse, int splits, int dim)
    {
        float mx = float.NegativeInfinity;
        for (int s = 0; s < splits; s++) mx = MathF.Max(mx, partialLse[(long)r.X * splits + s]);
        float total = 0f;
        for (int s = 0; s < splits; s++) { float l = partialLse[(long)r.X * splits + s]; total += l == float.NegativeInfinity ? 0f : MathF.Exp(l - mx); }
        for (int d = 0; d < dim; d++)
        {
            float o = 0f;
            for (int s = 0; s < splits; s++)
            {
                float l = partialLse[(long)r.X * splits + s];
                if (l != float.NegativeInfinity) o += MathF.Exp(l - mx) * partialO[((long)r.X * splits + s) * dim + d];
            }
            output[(long)r.X * dim + d] = total > 0f ? o / total : 0f;
        }
    }
}
