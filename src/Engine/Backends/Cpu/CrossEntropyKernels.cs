using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>A running maximum and sum of exp(x - maximum) over the values added so far, one pass (online log-sum-exp).</summary>
internal readonly record struct RunningLse(float Max, float Sum)
{
    public RunningLse Add(float x) =>
        x > Max ? new RunningLse(x, Sum * MathF.Exp(Max - x) + 1f)
        : x > float.NegativeInfinity ? new RunningLse(Max, Sum + MathF.Exp(x - Max))
        : this;

    public float Log => Max + MathF.Log(Sum);

    /// <summary>Before a vector whose largest value is <paramref name="vectorMax"/>: one rescale to the new maximum.</summary>
    public RunningLse Rescale(float vectorMax) => vectorMax > Max ? new RunningLse(vectorMax, Sum * MathF.Exp(Max - vectorMax)) : this;

    /// <summary>One value of a vector after <see cref="Rescale"/>: no new maximum, no rescale.</summary>
    public RunningLse AddBelow(float x) => new(Max, Sum + MathF.Exp(x - Max));

    /// <summary>
    /// Values a thread of the CUDA kernel reads as one vector (its packed path): fp32 storage reads 4 a vector where the
    /// vocabulary is a multiple of 4 (the CPU stores fp32, so its twins and host loops mirror that path), else one.
    /// </summary>
    public static int Vector(int vocab) => vocab % 4 == 0 ? 4 : 1;
}

/// <summary>
/// ILGPU twins of kernels/cross_entropy.cu: the same online (max, sum) log-sum-exp in one pass over the vocabulary,
/// one thread per row; backward recomputes p = exp(x - lse). Targets are range-checked on the host before launch.
/// </summary>
internal static class CrossEntropyKernels
{
    public static void Forward(Index1D row, ArrayView<float> logprob, ArrayView<float> lse, ArrayView<float> logits, ArrayView<int> targets, int vocab, int ignoreIndex)
    {
        long b = (long)row.X * vocab;
        float l = LogSumExp(logits, b, vocab);
        lse[row] = l;
        int target = targets[row];
        logprob[row] = target == ignoreIndex ? 0f : logits[b + target] - l;
    }

    /// <summary>
    /// The kernel's online log-sum-exp of one row: value by value, or by vectors of <see cref="RunningLse.Vector"/>
    /// (one rescale per vector, by its max) where the kernel reads the row in 16-byte vectors.
    /// </summary>
    public static float LogSumExp(ArrayView<float> x, long b, int vocab)
    {
        var acc = new RunningLse(float.NegativeInfinity, 0f);
        int n = RunningLse.Vector(vocab);
        if (n == 1)
        {
            for (int v = 0; v < vocab; v++) acc = acc.Add(x[b + v]);
            return acc.Log;
        }
        for (int v0 = 0; v0 < vocab; v0 += n)
        {
            float vm = x[b + v0];
            for (int k = 1; k < n; k++) vm = MathF.Max(vm, x[b + v0 + k]);
            if (!(vm > float.NegativeInfinity)) continue;
            acc = acc.Rescale(vm);
            for (int k = 0; k < n; k++) acc = acc.AddBelow(x[b + v0 + k]);
        }
        return acc.Log;
    }

    public static void Backward(Index1D row, ArrayView<float> dlogits, ArrayView<float> logits, ArrayView<float> lse, ArrayView<int> targets,
        ArrayView<float> dlogprob, int vocab, int ignoreIndex)
    {
        long b = (long)row.X * vocab;
        int target = targets[row];
        float g = target == ignoreIndex ? 0f : dlogprob[row];
        float l = lse[row];
        for (int v = 0; v < vocab; v++) dlogits[b + v] = Gradient(logits[b + v], l, g, v == target);
    }

    /// <summary>d loss / d logit of one logit: g (onehot - exp(logit - lse)); the twin and the host loop both call it.</summary>
    public static float Gradient(float logit, float lse, float g, bool isTarget) => g * ((isTarget ? 1f : 0f) - MathF.Exp(logit - lse));
}
