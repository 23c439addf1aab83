using BenchmarkDotNet.Attributes;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Perf;

/// <summary>SIMD C# GEMM of the CPU backend in the three shapes a linear layer's forward and backward use.</summary>
public class GemmBench : OpBench
{
    [Params(128, 512)] public int N;
    private Tensor _x = null!, _w = null!, _y = null!, _dw = null!, _dx = null!;

    protected override void Allocate()
    {
        _x = Random(1, N, N); _w = Random(2, N, N); _y = B.Allocate(DType.F32, N, N);
        _dw = B.Allocate(DType.F32, N, N); _dx = B.Allocate(DType.F32, N, N);
    }

    [Benchmark] public void ForwardXWt() => B.Gemm(_x, false, _w, true, _y);
    [Benchmark] public void BackwardDx() => B.Gemm(_y, false, _w, false, _dx);
    [Benchmark] public void BackwardDw() => B.Gemm(_y, true, _x, false, _dw);
}
