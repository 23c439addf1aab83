using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// Scalars of one AdamW launch, the bias corrections folded in on the host as for the CUDA kernel: StepSize =
/// lr / (1 - beta1^t), InvSqrtBc2 = 1 / sqrt(1 - beta2^t), Decay = lr x weight decay.
/// </summary>
internal readonly record struct AdamWArgs(float Beta1, float Beta2, float Eps, float StepSize, float InvSqrtBc2, float Decay, float GradScale, int HasCopy)
{
    public static AdamWArgs Of(AdamWSettings s, int step, float gradScale, bool hasCopy)
    {
        var (stepSize, invSqrtBc2, decay) = Scalars(s, step);
        return new AdamWArgs(s.Beta1, s.Beta2, s.Epsilon, stepSize, invSqrtBc2, decay, gradScale, hasCopy ? 1 : 0);
    }

    /// <summary>The host's scalars of a step, in double then rounded once (the CUDA backend passes the same floats).</summary>
    public static (float StepSize, float InvSqrtBc2, float Decay) Scalars(AdamWSettings s, int step) =>
        ((float)(s.LearningRate / (1 - Math.Pow(s.Beta1, step))), (float)(1 / Math.Sqrt(1 - Math.Pow(s.Beta2, step))), (float)((double)s.LearningRate * s.WeightDecay));
}

/// <summary>
/// ILGPU twin of kernels/adamw.cu (grid-stride), including the bf16 working copy (stored as bf16 bits). Its vector
/// kernel (adamw_update4, four elements a thread) computes each element with the same arithmetic, so one twin serves both.
/// </summary>
internal static class AdamWKernels
{
    public static void Update(Index1D t, ArrayView<float> p, ArrayView<ushort> copy, ArrayView<float> g, ArrayView<float> m, ArrayView<float> v, AdamWArgs a, int threads)
    {
        for (long i = t; i < p.Length; i += threads) UpdateOne(i, p, copy, g, m, v, a);
    }

    public static float FirstMoment(float m, float g, AdamWArgs a) => a.Beta1 * m + (1f - a.Beta1) * g;

    public static float SecondMoment(float v, float g, AdamWArgs a) => a.Beta2 * v + (1f - a.Beta2) * g * g;

    /// <summary>The weight after the step, from the new moments (bias-corrected through the host's scalars) and decoupled weight decay.</summary>
    public static float Weight(float p, float m, float v, AdamWArgs a) => p - a.StepSize * m / (MathF.Sqrt(v) * a.InvSqrtBc2 + a.Eps) - a.Decay * p;

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
