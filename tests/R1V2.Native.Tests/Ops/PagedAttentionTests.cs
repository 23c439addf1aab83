using R1V2.Native.Engine.Backends.Cpu;

namespace R1V2.Native.Tests.Ops;

/// <summary>
/// Paged KV append and decode attention against dense attention: kernels/paged_attention.cu through its ILGPU twins
/// (split-KV partials and their combine) and the CPU backend's SIMD host path (<see cref="CpuAttention"/>).
/// </summary>
[Collection("cpu")]
public sealed class PagedAttentionTests(CpuFixture fx)
{
    private readonly CpuBackend _b = fx.Backend;

    private T With<T>(bool twins, Func<T> body) => fx.WithAttentionTwins(twins, body);

    [Theory]
    [InlineData(1, true)]
    [InlineData(2, true)]
    [InlineData(64, true)]
    [InlineData(1, false)]
    public void PagedDecode_EqualsDenseAttention_RaggedLengthsAndSharedPrefixes(int splitBlocks, bool twins) => With(twins, () =>
    {
        const int blockSize = 4, numBlocks = 24, heads = 4, kv = 2, dim = 16;
        int slots = numBlocks * blockSize;
        var kData = TestData.Uniform(1, slots * kv * dim, 2f);
        var vData = TestData.Uniform(2, slots * kv * dim);
        using var kCache = _b.FromArray(kData, DType.F32, [slots, kv, dim]);
        using var vCache = _b.FromArray(vData, DType.F32, [slots, kv, dim]);
        // Sequences 0 and 1 share their first two blocks (a prompt prefix); lengths are ragged and not block multiples.
        IReadOnlyList<int>[] tables = [[5, 9, 2], [5, 9, 17, 3, 11], [20], [7, 8, 13, 0, 1, 4, 6, 10]];
        int[] lengths = [10, 19, 1, 29];
        using var batch = _b.Paged(tables, lengths, blockSize, numBlocks);
        var q = TestData.Uniform(3, tables.Length * heads * dim, 2f);
        using var tq = _b.FromArray(q, DType.F32, [tables.Length, heads, dim]);
        using var o = _b.Allocate(DType.F32, tables.Length, heads, dim);
        float scale = 1f / MathF.Sqrt(dim);
        _b.PagedAttentionDecode(tq, kCache, vCache, batch, o, scale, splitBlocks);
        var got = o.ToFloatArray();

        for (int b = 0; b < tables.Length; b++)
        {
            // Dense reference: gather the sequence's keys and values in order, one query attending to all of them.
            int n = lengths[b];
            var keys = new double[n * kv * dim];
            var values = new double[n * kv * dim];
            for (int t = 0; t < n; t++)
            {
                int slot = tables[b][t / blockSize] * blockSize + t % blockSize;
                for (int e = 0; e < kv * dim; e++) { keys[t * kv * dim + e] = kData[slot * kv * dim + e]; values[t * kv * dim + e] = vData[slot * kv * dim + e]; }
            }
            var query = new double[n * heads * dim];
            for (int e = 0; e < heads * dim; e++) query[(n - 1) * heads * dim + e] = q[b * heads * dim + e];
            var dense = Reference.Attention(query, keys, values, [0, n], heads, kv, dim, scale, causal: true); // the last row sees every key
            var expected = dense[((n - 1) * heads * dim)..(n * heads * dim)];
            Check.Close(expected, got[(b * heads * dim)..((b + 1) * heads * dim)], 1e-6, 1e-5, $"sequence {b} (split {splitBlocks} blocks)");
        }
        return 0;
    });

    [Fact]
    public void HostPath_EqualsTheTwin_OnABatchLargeEnoughToSplitOverTheCores()
    {
        // 96 sequences of up to 64 keys over shared and private blocks, 8 heads over 2 kv heads, D = 24.
        const int blockSize = 16, numBlocks = 64, heads = 8, kv = 2, dim = 24, batchSize = 96;
        var tables = Enumerable.Range(0, batchSize).Select(i => (IReadOnlyList<int>)Enumerable.Range(0, 1 + i % 4)
            .Select(j => (i * 5 + j * 11) % numBlocks).Distinct().ToList()).ToList();
        var lengths = tables.Select((t, i) => Math.Max(1, t.Count * blockSize - i % 7)).ToArray();
        Assert.True(lengths.Sum() * (long)dim * heads >= HostOps.ParallelFrom);
        float[] Run(bool twins) => With(twins, () =>
        {
            using var kc = _b.FromArray(TestData.Uniform(38, numBlocks * blockSize * kv * dim, 2), DType.F32, [numBlocks * blockSize, kv, dim]);
            using var vc = _b.FromArray(TestData.Uniform(39, numBlocks * blockSize * kv * dim), DType.F32, [numBlocks * blockSize, kv, dim]);
            using var batch = _b.Paged(tables, lengths, blockSize, numBlocks);
            using var q = _b.FromArray(TestData.Uniform(40, batchSize * heads * dim, 2), DType.F32, [batchSize, heads, dim]);
            using var o = _b.Allocate(DType.F32, batchSize, heads, dim);
            _b.PagedAttentionDecode(q, kc, vc, batch, o, 0.2f, splitBlocks: 2);
            return o.ToFloatArray();
        });
        Check.Close(Run(true), Run(false), 1e-5, 1e-4, "o");
    }

    [Fact]
    public void KvAppend_WritesEachTokenToItsSlot()
    {
        using var kCache = _b.Allocate(DType.F32, 8, 2, 3);
        using var vCache = _b.Allocate(DType.F32, 8, 2, 3);
        var k = TestData.Uniform(4, 3 * 2 * 3);
        var v = TestData.Uniform(5, 3 * 2 * 3);
        using var tk = _b.FromArray(k, DType.F32, [3, 2, 3]);
        using var tv = _b.FromArray(v, DType.F32, [3, 2, 3]);
        using var slots = _b.Rows([6, 1, 4], 8, distinct: true, "slots");
        _b.KvAppend(tk, tv, slots, kCache, vCache);
        var kc = kCache.ToFloatArray();
        var vc = vCache.ToFloatArray();
        int[] target = [6, 1, 4];
        for (int t = 0; t < 3; t++)
            for (int e = 0; e < 6; e++)
            {
                Assert.Equal(k[t * 6 + e], kc[target[t] * 6 + e]);
                Assert.Equal(v[t * 6 + e], vc[target[t] * 6 + e]);
            }
        Assert.Equal(0f, kc[0]);
    }

    [Fact]
    public void PagedBatch_RejectsBlocksOutsideTheCache_AndLengthsBeyondTheBlocks()
    {
        Assert.Contains("block 9 is outside", Assert.Throws<ArgumentException>(() => _b.Paged([[1, 9]], [5], 4, 8)).Message);
        Assert.Contains("context length 9 does not fit its 2 blocks", Assert.Throws<ArgumentException>(() => _b.Paged([[1, 2]], [9], 4, 8)).Message);
    }
}
