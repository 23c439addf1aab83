using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twin of kernels/rope.cu: grid-stride over (token, head, pair); direction -1 is the backward rotation; cosines and
/// sines from the table (interleaved pairs) below tableRows, computed past it.
/// </summary>
internal static class RopeKernels
{
    public static void Rotate(Index1D thread, ArrayView<float> y, ArrayView<float> x, ArrayView<int> pos, ArrayView<float> table, int tableRows,
        int heads, int dim, float theta, float direction, int threads)
    {
        for (long idx = thread; idx < x.Length / 2; idx += threads) RotatePair(idx, y, x, pos, table, tableRows, heads, dim, theta, direction);
    }

    /// <summary>The rotation angle of pair i at a position: pos / theta^(2i / dim).</summary>
    public static float Angle(int pos, int i, int dim, float theta)
    {
        float invFreq = 1f / MathF.Pow(theta, (float)(2 * i) / dim);
        return pos * invFreq;
    }

    private static void RotatePair(long idx, ArrayView<float> y, ArrayView<float> x, ArrayView<int> pos, ArrayView<float> table, int tableRows,
        int heads, int dim, float theta, float direction)
    {
        int half = dim / 2;
        int i = (int)(idx % half);
        long th = idx / half;
        int t = (int)(th / heads), p = pos[t];
        float s, c;
        if (p >= 0 && p < tableRows)
        {
            long at = ((long)p * half + i) * 2;
            c = table[at];
            s = table[at + 1] * direction;
        }
        else
        {
            float a = Angle(p, i, dim, theta);
            s = MathF.Sin(a) * direction;
            c = MathF.Cos(a);
        }
        long b = th * dim;
        float x1 = x[b + i], x2 = x[b + i + half];
        y[b + i] = x1 * c - x2 * s;
        y[b + i + half] = x2 * c + x1 * s;
    }
}
