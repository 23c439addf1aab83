using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>Scalars of one AdamW launch (bias corrections computed on the host, as for the CUDA kernel).</summary>
internal readonly record struct AdamWArgs(float Lr, float Beta1, float Beta2, float Eps, float WeightDecay, float Bc1, float Bc2, float GradScale, int HasCopy);

/// <summary>ILGPU twin of kernels/adamw.cu (grid-stride), including the bf16 working copy (stored as bf16 bits).</summary>
internal static class AdamWKernels
{
    public static void Update(Index1D t, ArrayView<float> p, ArrayView<ushort> copy, ArrayView<float> g, ArrayView<float> m, ArrayView<float> v, AdamWArgs a, int threads)
    {
        for (long i = t; i < p.Length; i += threads) UpdateOne(i, p, copy, g, m, v, a);
    }

    private static void UpdateOne(long i, ArrayView<float> p, ArrayView<ushort> copy, ArrayView<float> g, ArrayView<float> m, ArrayView<float> v, AdamWArgs a)
    {
        float gi = g[i] * a.GradScale;
        float mi = a.Beta1 * m[i] + (1f - a.Beta1) * gi;
        float vi = a.Beta2 * v[i] + (1f - a.Beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / a.Bc1, vhat = vi / a.Bc2;
        float pi = p[i] - a.Lr * (mhat / (MathF.Sqrt(vhat) + a.Eps) + a.WeightDecay * p[i]);
        p[i] = pi;
        if (a.HasCopy != 0) copy[i] = CpuMath.ToBf16(pi);
    }
}
