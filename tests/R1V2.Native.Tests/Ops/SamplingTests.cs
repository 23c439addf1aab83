namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/sampling.cu through its ILGPU twin.</summary>
[Collection("cpu")]
public sealed class SamplingTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private (int[] Tokens, float[] LogProbs) Sample(float[] logits, int vocab, IReadOnlyList<SampleRow> rows)
    {
        using var t = _b.FromArray(logits, DType.F32, [rows.Count, vocab]);
        return _b.Sample(t, rows);
    }

    /// <summary>HF's warper chain (penalty, temperature, top-k, top-p, min-p) in double, by sorting: the exact distribution.</summary>
    private static double[] FilteredDistribution(float[] logits, SamplingParams p)
    {
        int v = logits.Length;
        var x = logits.Select(l => (double)l / p.Temperature).ToArray();
        var keep = Enumerable.Repeat(true, v).ToArray();
        var order = Enumerable.Range(0, v).OrderByDescending(i => x[i]).ToArray();
        if (p.TopK > 0 && p.TopK < v)
            for (int r = p.TopK; r < v; r++) if (x[order[r]] < x[order[p.TopK - 1]]) keep[order[r]] = false;
        if (p.TopP < 1)
        {
            double z = order.Where(i => keep[i]).Sum(i => Math.Exp(x[i]));
            double above = 0;
            foreach (var i in order.Where(i => keep[i]))
            {
                if (above / z >= p.TopP) keep[i] = false; // kept only while the mass strictly above it is below p
                above += Math.Exp(x[i]);
            }
        }
        double max = x.Max();
        if (p.MinP > 0)
            for (int i = 0; i < v; i++) if (x[i] - max < Math.Log(p.MinP)) keep[i] = false;
        var w = Enumerable.Range(0, v).Select(i => keep[i] ? Math.Exp(x[i] - max) : 0).ToArray();
        double total = w.Sum();
        return w.Select(e => e / total).ToArray();
    }

    [Theory]
    [InlineData(0.8f, 8, 0.9f, 0.05f)]
    [InlineData(1.0f, 0, 1.0f, 0f)]
    [InlineData(1.3f, 5, 1.0f, 0f)]
    [InlineData(0.7f, 0, 0.6f, 0f)]
    public void SampleFrequencies_MatchTheExactFilteredDistribution(float temperature, int topK, float topP, float minP)
    {
        const int vocab = 12, draws = 20000;
        var logits = TestData.Uniform(11, vocab, 2.5f);
        var p = new SamplingParams(temperature, topK, topP, minP);
        var expected = FilteredDistribution(logits, p);
        var rows = Enumerable.Range(0, draws).Select(i => new SampleRow(p, (ulong)i * 7919 + 13, i % 5, [])).ToList();
        var all = new float[draws * vocab];
        for (int i = 0; i < draws; i++) logits.CopyTo(all, i * vocab);
        var (tokens, _) = Sample(all, vocab, rows);
        var counts = new double[vocab];
        foreach (var t in tokens) counts[t]++;
        for (int i = 0; i < vocab; i++)
            if (expected[i] == 0) Assert.True(counts[i] == 0, $"token {i} is filtered out but was drawn {counts[i]} times");
        // Pearson chi-square over the kept tokens against a critical value at false-failure rate 1e-6
        // (Wilson-Hilferty approximation of the chi-square quantile, z = 4.753).
        var kept = Enumerable.Range(0, vocab).Where(i => expected[i] > 0).ToArray();
        double chi2 = kept.Sum(i => Math.Pow(counts[i] - draws * expected[i], 2) / (draws * expected[i]));
        int df = kept.Length - 1;
        double critical = df == 0 ? 0 : df * Math.Pow(1 - 2.0 / (9 * df) + 4.753 * Math.Sqrt(2.0 / (9 * df)), 3);
        Assert.True(chi2 <= critical + 1e-9, $"chi-square {chi2:F1} > {critical:F1} (df {df}): frequencies differ from the filtered distribution");
    }

    [Fact]
    public void Sample_IsReproducibleFromSeedAndStep_AndReturnsTheTemperedLogProb()
    {
        const int vocab = 50;
        var logits = TestData.Uniform(12, vocab, 3f);
        var p = new SamplingParams(0.9f, 20, 0.95f);
        var rows = Enumerable.Range(0, 40).Select(i => new SampleRow(p, 99, i, [])).ToList();
        var all = Enumerable.Repeat(logits, 40).SelectMany(x => x).ToArray();
        var (a, la) = Sample(all, vocab, rows);
        var (b, lb) = Sample(all, vocab, rows);
        Assert.Equal(a, b);
        Assert.Equal(la, lb);
        Assert.True(a.Distinct().Count() > 3, "different steps should give different draws");
        double m = logits.Max() / 0.9, z = logits.Sum(l => Math.Exp(l / 0.9 - m));
        for (int i = 0; i < a.Length; i++) Assert.Equal(logits[a[i]] / 0.9 - m - Math.Log(z), la[i], 4);
    }

    [Fact]
    public void VocabularyLimit_KeepsDrawsAndLogProbsWithinTheTokenizersIds()
    {
        // The padded ids 8..11 carry most of the mass; with a limit of 8 they are never drawn nor counted.
        float[] logits = [0f, 0.5f, 1f, 0.2f, -1f, 0.3f, 0.1f, 0f, 9f, 9f, 9f, 9f];
        var rows = Enumerable.Range(0, 200).Select(i => new SampleRow(new SamplingParams(1f), (ulong)i, 0, [])).ToList();
        using var t = _b.FromArray(Enumerable.Repeat(logits, 200).SelectMany(x => x).ToArray(), DType.F32, [200, 12]);
        var (tokens, logp) = _b.Sample(t, rows, vocabularyLimit: 8);
        Assert.All(tokens, x => Assert.InRange(x, 0, 7));
        double z = logits.Take(8).Sum(x => Math.Exp(x));
        for (int i = 0; i < tokens.Length; i++) Assert.Equal(logits[tokens[i]] - Math.Log(z), logp[i], 4);
        Assert.Throws<ArgumentException>(() => _b.Sample(t, rows, vocabularyLimit: 13));
    }

    [Fact]
    public void Greedy_TakesTheLargest_LowestIndexOnTies()
    {
        float[] logits = [1f, 5f, 2f, 5f, -1f];
        var (t, lp) = Sample(logits, 5, [new SampleRow(SamplingParams.Greedy, 0, 0, [])]);
        Assert.Equal(1, t[0]);
        double z = logits.Sum(l => Math.Exp(l - 5));
        Assert.Equal(-Math.Log(z), lp[0], 5);
    }

    [Fact]
    public void RepetitionPenalty_AppliesOncePerDistinctEarlierToken_DividingPositivesAndMultiplyingNegatives()
    {
        float[] logits = [0f, 0f, 0f, 4f, 0f, 1.5f, -0.5f, -2f];
        var greedy = SamplingParams.Greedy with { RepetitionPenalty = 2f };
        // 4 / 2 = 2 still beats 1.5; applied three times it would not (4 / 8 = 0.5).
        Assert.Equal(3, Sample(logits, 8, [new SampleRow(greedy, 0, 0, [3, 3, 3])]).Tokens[0]);
        Assert.Equal(3, Sample(logits, 8, [new SampleRow(greedy, 0, 0, [3, 5, 3])]).Tokens[0]); // 5 falls to 0.75, 3 to 2
        float[] negatives = [-3f, -1f, -1.5f];
        // -1 * 2 = -2 falls below -1.5: the negative logit is multiplied.
        Assert.Equal(2, Sample(negatives, 3, [new SampleRow(greedy, 0, 0, [1])]).Tokens[0]);
    }
}
