using BenchmarkDotNet.Attributes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Perf;

/// <summary>Shared set-up: one CPU backend per benchmark class, random inputs, synchronise after each op.</summary>
[MemoryDiagnoser]
[WarmupCount(2), IterationCount(10)]
public abstract class OpBench
{
    protected CpuBackend B = null!;

    [GlobalSetup]
    public void Setup()
    {
        B = new CpuBackend();
        Allocate();
    }

    protected abstract void Allocate();

    protected Tensor Random(int seed, params int[] shape)
    {
        var rng = new Random(seed);
        var data = new float[shape.Aggregate(1, (a, d) => a * d)];
        for (int i = 0; i < data.Length; i++) data[i] = (float)(rng.NextDouble() * 2 - 1);
        return B.FromArray(data, DType.F32, shape);
    }

    [GlobalCleanup]
    public void Cleanup() => B.Dispose();
}
