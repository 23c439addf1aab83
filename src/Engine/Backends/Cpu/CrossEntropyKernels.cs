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
        var acc = new RunningLse(float.NegativeInfinity, 0f);
        for (int v = 0; v < vocab; v++) acc = acc.Add(logits[b + v]);
        float l = acc.Log;
        lse[row] = l;
        int target = targets[row];
        logprob[row] = target == ignoreIndex ? 0f : logits[b + target] - l;
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
