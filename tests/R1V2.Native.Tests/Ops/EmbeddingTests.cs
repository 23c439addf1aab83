namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/embedding.cu through its ILGPU twin: lookup and scatter-add backward.</summary>
[Collection("cpu")]
public sealed class EmbeddingTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void EmbeddingForward_CopiesRows_AndBackwardScatterAddsRepeatedIds()
    {
        const int vocab = 11, dim = 6;
        var table = TestData.Uniform(71, vocab * dim);
        int[] ids = [3, 0, 10, 3, 3, 7];
        var dout = TestData.Uniform(72, ids.Length * dim);
        using var tt = _b.FromArray(table, DType.F32, [vocab, dim]);
        using var ti = _b.FromArray(ids, [ids.Length]);
        using var to = _b.Allocate(DType.F32, ids.Length, dim);
        _b.EmbeddingForward(tt, ti, to);
        var got = to.ToFloatArray();
        for (int t = 0; t < ids.Length; t++)
            for (int c = 0; c < dim; c++)
                Assert.Equal(table[ids[t] * dim + c], got[t * dim + c]);

        var initial = TestData.Uniform(73, vocab * dim);
        using var tdo = _b.FromArray(dout, DType.F32, [ids.Length, dim]);
        using var tdt = _b.FromArray(initial, DType.F32, [vocab, dim]);
        _b.EmbeddingBackward(tdo, ti, tdt);
        var expected = TestData.ToDouble(initial);
        for (int t = 0; t < ids.Length; t++)
            for (int c = 0; c < dim; c++) expected[ids[t] * dim + c] += dout[t * dim + c];
        Check.Close(expected, tdt.ToFloatArray(), 1e-6, 1e-6, "dtable (id 3 appears three times)");
    }

    [Fact]
    public void EmbeddingBackward_AddsRepeatedIdsInPositionOrder_BitForBit()
    {
        const int vocab = 9, dim = 5, tokens = 300;
        var ids = TestData.Ints(74, tokens, 4).Select(i => i * 2).ToArray(); // ids 0, 2, 4, 6, each about 75 times, interleaved
        var dout = TestData.Uniform(75, tokens * dim, 100);
        var initial = TestData.Uniform(76, vocab * dim);
        using var ti = _b.FromArray(ids, [tokens]);
        using var tdo = _b.FromArray(dout, DType.F32, [tokens, dim]);
        using var tdt = _b.FromArray(initial, DType.F32, [vocab, dim]);
        _b.EmbeddingBackward(tdo, ti, tdt);
        var expected = (float[])initial.Clone();
        for (int t = 0; t < tokens; t++)
            for (int c = 0; c < dim; c++) expected[ids[t] * dim + c] += dout[t * dim + c]; // fp32, one by one, in position order
        Assert.Equal(expected, tdt.ToFloatArray());
    }

    [Fact]
    public void EmbeddingBackward_IdOutsideVocabulary_NamesRowAndValue_AndWritesNothing()
    {
        using var ti = _b.FromArray([1, 2, 11, 4], [4]);
        using var tdo = _b.FromArray(TestData.Uniform(77, 16), DType.F32, [4, 4]);
        using var tdt = _b.Allocate(DType.F32, 11, 4);
        var e = Assert.Throws<ArgumentException>(() => _b.EmbeddingBackward(tdo, ti, tdt));
        Assert.Equal("embedding_backward: ids[2] = 11 is outside [0, 11)", e.Message);
        Assert.All(tdt.ToFloatArray(), v => Assert.Equal(0f, v));
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(11)]
    public void EmbeddingForward_IdOutsideVocabulary_NamesRowAndValue(int bad)
    {
        using var tt = _b.Allocate(DType.F32, 11, 4);
        using var ti = _b.FromArray([1, 2, bad, 4], [4]);
        using var to = _b.Allocate(DType.F32, 4, 4);
        var e = Assert.Throws<ArgumentException>(() => _b.EmbeddingForward(tt, ti, to));
        Assert.Equal($"embedding_forward: ids[2] = {bad} is outside [0, 11)", e.Message);
    }
}
