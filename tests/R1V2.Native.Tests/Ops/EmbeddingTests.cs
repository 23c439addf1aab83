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
