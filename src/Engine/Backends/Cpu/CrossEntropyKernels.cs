using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twins of kernels/cross_entropy.cu: the same online (max, sum) log-sum-exp in one pass over the vocabulary,
/// one thread per row; backward recomputes p = exp(x - lse). Targets are range-checked on the host before launch.
/// </summary>
internal static class CrossEntropyKernels
{
    public static void Forward(Index1D row, ArrayView<float> logprob, ArrayView<float> lse, ArrayView<float> logits, ArrayView<int> targets, int vocab, int ignoreIndex)
    {
        long b = (long)row.X * vocab;
        float m = float.NegativeInfinity, s = 0f;
        for (int v = 0; v < vocab; v++)
        {
            float x = logits[b + v];
            if (x > m) { s = s * MathF.Exp(m - x) + 1f; m = x; }
            else if (x > float.NegativeInfinity) s += MathF.Exp(x - m);
        }
        float l = m + MathF.Log(s);
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
        for (int v = 0; v < vocab; v++)
        {
            float p = MathF.Exp(logits[b + v] - l);
            dlogits[b + v] = g * ((v == target ? 1f : 0f) - p);
        }
    }
}
