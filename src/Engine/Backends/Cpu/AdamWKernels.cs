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

    public static float FirstMoment(float m, float g, AdamWArgs a) => a.Beta1 * m + (1f - a.Beta1) * g;

    public static float SecondMoment(float v, float g, AdamWArgs a) => a.Beta2 * v + (1f - a.Beta2) * g * g;

    /// <summary>The weight after the step, from the new moments (bias-corrected) and decoupled weight decay.</summary>
    public static float Weight(float p, float m, float v, AdamWArgs a)
    {
        float mhat = m / a.Bc1, vhat = v / a.Bc2;
        return p - a.Lr * (mhat / (MathF.Sqrt(vhat) + a.Eps) + a.WeightDecay * p);
    }

    private static void UpdateOne(long i, ArrayView<float> p, ArrayView<ushort> copy, ArrayView<float> g, ArrayView<float> m, ArrayView<float> v, AdamWArgs a)
    {
        float gi = g[i] * a.GradScale;
        float mi = FirstMoment(m[i], gi, a), vi = SecondMoment(v[i], gi, a);
        m[i] = mi;
        v[i] = vi;
        float pi = Weight(p[i], mi, vi, a);
        p[i] = pi;
        if (a.HasCopy != 0) copy[i] = CpuMath.ToBf16(pi);
    }
}
