namespace R1V2.Native.Tests.Ops;

public sealed class MemoryPoolTests
{
    private sealed class FakeBlock(long bytes) : DeviceBlock(bytes);

    [Fact]
    public void MemoryPool_ReusesFreedBlocks_AndTracksInUseAndPeak()
    {
        int allocations = 0, frees = 0;
        using var pool = new MemoryPool<FakeBlock>(b => { allocations++; return new FakeBlock(b); }, _ => frees++);
        var a = pool.Rent(1000);   // rounds to 1024
        var b = pool.Rent(3 << 20); // 3 MiB
        Assert.Equal(1024 + (3L << 20), pool.Stats.BytesInUse);
        pool.Return(a);
        var c = pool.Rent(700);    // same size class as a: reused
        Assert.Same(a, c);
        Assert.Equal(2, allocations);
        Assert.Equal(1, pool.Stats.Reuses);
        pool.Return(b);
        pool.Return(c);
        Assert.Equal(0, pool.Stats.BytesInUse);
        Assert.Equal(1024 + (3L << 20), pool.Stats.PeakBytesInUse);
        pool.Trim();
        Assert.Equal(2, frees);
        Assert.Equal(0, pool.Stats.BytesReserved);
    }

    [Theory]
    [InlineData(1, 512)]
    [InlineData(513, 1024)]
    [InlineData(4096, 4096)]
    [InlineData(4097, 4608)]                   // 8 classes per power of two above 4 KiB: 4096 + 512
    [InlineData(3 << 20, 3 << 20)]
    [InlineData((1 << 20) + 1, (1 << 20) + (1 << 17))]
    public void MemoryPool_RoundsToSizeClasses(long request, long expected) => Assert.Equal(expected, MemoryPool<FakeBlock>.RoundUp(request));
}

[Collection("cpu")]
public sealed class TensorTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    [Fact]
    public void Allocate_IsZeroFilled_EvenWhenTheBlockIsReused()
    {
        using (var t = _b.FromArray(Enumerable.Repeat(7f, 64).ToArray(), DType.F32, [64])) { }
        using var u = _b.Allocate(DType.F32, 64);
        Assert.All(u.ToFloatArray(), v => Assert.Equal(0f, v));
    }

    [Fact]
    public void SliceRows_SharesMemory_AndOpsSeeTheOffset()
    {
        using var t = _b.FromArray(Enumerable.Range(0, 12).Select(i => (float)i).ToArray(), DType.F32, [4, 3]);
        using var s = t.SliceRows(1, 2);
        Assert.Equal([3f, 4f, 5f, 6f, 7f, 8f], s.ToFloatArray());
        _b.Scale(s, s, 10f);
        Assert.Equal([0f, 1f, 2f, 30f, 40f, 50f, 60f, 70f, 80f, 9f, 10f, 11f], t.ToFloatArray());
    }

    [Fact]
    public void Pool_StatsFollowTensorLifetimes()
    {
        long before = _b.Memory.BytesInUse;
        var t = _b.Allocate(DType.F32, 1000);
        Assert.Equal(before + 4096, _b.Memory.BytesInUse);
        t.Dispose();
        Assert.Equal(before, _b.Memory.BytesInUse);
        Assert.True(_b.Memory.PeakBytesInUse >= before + 4096);
    }

    [Fact]
    public void Reshape_ToAnotherLength_IsAClearError()
    {
        using var t = _b.Allocate(DType.F32, 2, 3);
        var e = Assert.Throws<ArgumentException>(() => t.Reshape(4, 2));
        Assert.Contains("cannot reshape", e.Message);
    }

    [Fact]
    public void Ops_OnAnotherBackendsTensor_AreRejected()
    {
        using var other = new Engine.Backends.Cpu.CpuBackend();
        using var mine = _b.Allocate(DType.F32, 4);
        using var theirs = other.Allocate(DType.F32, 4);
        var e = Assert.Throws<ArgumentException>(() => _b.Add(mine, mine, theirs));
        Assert.Contains("lives on", e.Message);
    }
}
