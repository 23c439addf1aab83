using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>Scalars of the per-token GRPO loss.</summary>
internal readonly record struct GrpoArgs(float EpsLow, float EpsHigh, float DualClip, float KlCoef, int KlType, int HasRef);

/// <summary>ILGPU twins of kernels/grpo_loss.cu: one thread per row (the CUDA kernels use a block per row).</summary>
internal static class GrpoLossKernels
{
    public static void ChunkLseUpdate(Index1D row, ArrayView<float> m, ArrayView<float> s, ArrayView<float> targetLogit, ArrayView<float> chunk,
        ArrayView<int> targets, int cols, int colOffset, float invTemp)
    {
        long b = (long)row.X * cols;
        float mx = float.NegativeInfinity;
        for (int c = 0; c < cols; c++) mx = MathF.Max(mx, chunk[b + c] * invTemp);
        float sum = 0f;
        for (int c = 0; c < cols; c++) sum += MathF.Exp(chunk[b + c] * invTemp - mx);
        float mo = m[row], mn = MathF.Max(mo, mx);
        s[row] = (mo == float.NegativeInfinity ? 0f : s[row] * MathF.Exp(mo - mn)) + sum * MathF.Exp(mx - mn);
        m[row] = mn;
        int t = targets[row] - colOffset;
        if (t >= 0 && t < cols) targetLogit[row] = chunk[b + t] * invTemp;
    }

    public static void TokenLoss(Index1D t, ArrayView<float> loss, ArrayView<float> dlogp, ArrayView<float> logpOut, ArrayView<float> m, ArrayView<float> s,
        ArrayView<float> targetLogit, ArrayView<int> targets, ArrayView<float> oldLogp, ArrayView<float> refLogp, ArrayView<float> advantage,
        ArrayView<float> weight, GrpoArgs g)
    {
        if (targets[t] < 0) { loss[t] = 0f; dlogp[t] = 0f; logpOut[t] = 0f; return; }
        float lp = targetLogit[t] - (m[t] + MathF.Log(s[t]));
        float a = advantage[t], w = weight[t];
        float r = MathF.Exp(lp - oldLogp[t]);
        float unclipped = r * a, clipped = MathF.Min(MathF.Max(r, 1f - g.EpsLow), 1f + g.EpsHigh) * a;
        float j = MathF.Min(unclipped, clipped);
        float dj = unclipped <= clipped ? r * a : 0f;
        if (g.DualClip > 1f && a < 0f && g.DualClip * a > j) { j = g.DualClip * a; dj = 0f; }
        float kl = 0f, dkl = 0f;
        if (g.KlType != 0 && g.HasRef != 0)
        {
            float d = refLogp[t] - lp;
            if (g.KlType == 2) { kl = 0.5f * d * d; dkl = -d; }
            else
            {
                kl = MathF.Exp(d) - d - 1f;
                dkl = 1f - MathF.Exp(d);
                if (kl > 10f || kl < -10f) { kl = MathF.Min(MathF.Max(kl, -10f), 10f); dkl = 0f; }
            }
        }
        loss[t] = w * (-j + g.KlCoef * kl);
        dlogp[t] = w * (-dj + g.KlCoef * dkl);
        logpOut[t] = lp;
    }

    public static void ChunkLogitGrad(Index1D row, ArrayView<float> chunk, ArrayView<float> m, ArrayView<float> s, ArrayView<int> targets, ArrayView<float> dlogp,
        int cols, int colOffset, float invTemp)
    {
        long b = (long)row.X * cols;
        float g = targets[row] < 0 ? 0f : dlogp[row] * invTemp, lse = m[row] + MathF.Log(s[row]);
        int t = targets[row] - colOffset;
        for (int c = 0; c < cols; c++) chunk[b + c] = g * ((c == t ? 1f : 0f) - MathF.Exp(chunk[b + c] * invTemp - lse));
    }
}
