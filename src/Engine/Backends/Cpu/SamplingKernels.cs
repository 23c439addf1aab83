using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twin of kernels/sampling.cu, one thread per row: the same penalty (once per distinct earlier token), the same
/// bisection thresholds over order-preserving keys (top-k, then top-p over its survivors, min-p), the same RNG and the
/// same inverse-CDF draw in index order.
/// </summary>
/// <summary>Row length of the logits and how many leading ids can be drawn.</summary>
internal readonly record struct SampleShape(int Vocab, int Stride);

internal static class SamplingKernels
{
    public static ulong SplitMix64(ulong x)
    {
        x += 0x9E3779B97F4A7C15ul;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ul;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBul;
        return x ^ (x >> 31);
    }

    /// <summary>The uniform draw in [0, 1) for (seed, step): 24 bits, as the kernel makes it.</summary>
    public static float Uniform(ulong seed, int step) => (SplitMix64(seed ^ SplitMix64((ulong)(long)step)) >> 40) * (1f / 16777216f);

    public static uint OrderKey(float f)
    {
        uint u = ILGPU.Interop.FloatAsInt(f);
        return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
    }

    private static bool Seen(ArrayView<int> prev, int from, int to, int token)
    {
        for (int j = from; j < to; j++) if (prev[j] == token) return true;
        return false;
    }

    private static float Value(ArrayView<float> x, long b, int v, bool seen, float pen, float invT) => Adjust(x[b + v], seen, pen, invT);

    /// <summary>A logit after the repetition penalty (when its token was seen) and the temperature.</summary>
    public static float Adjust(float logit, bool seen, float pen, float invT) => (seen ? logit < 0f ? logit * pen : logit / pen : logit) * invT;

    public static void Sample(Index1D row, ArrayView<int> tokens, ArrayView<float> logprobs, ArrayView<float> logits, ArrayView<int> prev, ArrayView<int> prevOffsets,
        ArrayView<float> temperature, ArrayView<int> topK, ArrayView<float> topP, ArrayView<float> minP, ArrayView<float> repPenalty,
        ArrayView<ulong> seeds, ArrayView<int> steps, ArrayView<byte> seenScratch, SampleShape shape)
    {
        int vocab = shape.Vocab;
        long b = (long)row.X * shape.Stride;
        float temp = temperature[row], pen = repPenalty[row], invT = temp > 0f ? 1f / temp : 1f;
        int from = prevOffsets[row], to = prevOffsets[row + 1];
        // Mark distinct earlier tokens (a row's own scratch of V bytes).
        for (int v = 0; v < vocab; v++) seenScratch[b + v] = 0;
        if (pen != 1f)
            for (int j = from; j < to; j++) if (prev[j] >= 0 && prev[j] < vocab) seenScratch[b + prev[j]] = 1;

        float m0 = float.NegativeInfinity;
        for (int v = 0; v < vocab; v++) m0 = MathF.Max(m0, logits[b + v] * invT);
        float z0 = 0f;
        for (int v = 0; v < vocab; v++) z0 += MathF.Exp(logits[b + v] * invT - m0);

        if (temp <= 0f)
        {
            float best = float.NegativeInfinity;
            int bestI = 0;
            for (int v = 0; v < vocab; v++) { float val = Value(logits, b, v, seenScratch[b + v] != 0, pen, invT); if (val > best) { best = val; bestI = v; } }
            tokens[row] = bestI;
            logprobs[row] = logits[b + bestI] * invT - m0 - MathF.Log(z0);
            return;
        }

        float m = float.NegativeInfinity;
        for (int v = 0; v < vocab; v++) m = MathF.Max(m, Value(logits, b, v, seenScratch[b + v] != 0, pen, invT));

        uint keyK = 0u;
        int k = topK[row];
        if (k > 0 && k < vocab)
            for (int bit = 31; bit >= 0; bit--)
            {
                uint cand = keyK | (1u << bit);
                int c = 0;
                for (int v = 0; v < vocab; v++) if (OrderKey(Value(logits, b, v, seenScratch[b + v] != 0, pen, invT)) >= cand) c++;
                if (c >= k) keyK = cand;
            }

        uint keyP = 0u;
        float p = topP[row];
        if (p > 0f && p < 1f)
        {
            float zk = 0f;
            for (int v = 0; v < vocab; v++) { float val = Value(logits, b, v, seenScratch[b + v] != 0, pen, invT); if (OrderKey(val) >= keyK) zk += MathF.Exp(val - m); }
            for (int bit = 31; bit >= 0; bit--)
            {
                uint cand = keyP | (1u << bit);
                float mass = 0f;
                for (int v = 0; v < vocab; v++)
                {
                    float val = Value(logits, b, v, seenScratch[b + v] != 0, pen, invT);
                    uint kv = OrderKey(val);
                    if (kv >= keyK && kv >= cand) mass += MathF.Exp(val - m);
                }
                if (mass >= p * zk) keyP = cand;
            }
        }
        float mp = minP[row];
        float floorValue = mp > 0f ? m + MathF.Log(mp) : float.NegativeInfinity;
        uint keyMin = keyK > keyP ? keyK : keyP;

        float total = 0f;
        for (int v = 0; v < vocab; v++)
        {
            float val = Value(logits, b, v, seenScratch[b + v] != 0, pen, invT);
            if (OrderKey(val) >= keyMin && val >= floorValue) total += MathF.Exp(val - m);
        }
        float target = Uniform(seeds[row], steps[row]) * total;
        int chosen = -1, lastKept = 0;
        float acc = 0f;
        for (int v = 0; v < vocab; v++)
        {
            float val = Value(logits, b, v, seenScratch[b + v] != 0, pen, invT);
            if (!(OrderKey(val) >= keyMin && val >= floorValue)) continue;
            lastKept = v;
            acc += MathF.Exp(val - m);
            if (chosen < 0 && target < acc) chosen = v;
        }
        if (chosen < 0) chosen = lastKept;
        tokens[row] = chosen;
        logprobs[row] = logits[b + chosen] * invT - m0 - MathF.Log(z0);
    }
}
