using BenchmarkDotNet.Attributes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Perf;

/// <summary>kernels/elementwise.cu, swiglu.cu, gelu.cu, rope.cu, softmax.cu twins on the CPU backend.</summary>
public class ElementwiseBench : OpBench
{
    private const int Rows = 256, Cols = 1024;
    private Tensor _a = null!, _b = null!, _y = null!, _q = null!, _pos = null!;

    protected override void Allocate()
    {
        _a = Random(1, Rows, Cols); _b = Random(2, Rows, Cols); _y = B.Allocate(DType.F32, Rows, Cols);
        _q = Random(3, Rows, 8, 128); _pos = B.FromArray(Enumerable.Range(0, Rows).ToArray(), [Rows]);
    }

    [Benchmark] public void Axpby() { B.Add(_y, _a, _b); B.Synchronize(); }
    [Benchmark] public void SwiGluForward() { B.SwiGluForward(_a, _b, _y); B.Synchronize(); }
    [Benchmark] public void GeluForwardErf() { B.GeluForward(_a, _y, GeluApproximation.Erf); B.Synchronize(); }
    [Benchmark] public void RopeForward() { B.RopeForward(_q, _pos, _q, 1e6f); B.Synchronize(); }
    [Benchmark] public void SoftmaxForward() { B.SoftmaxForward(_a, _y); B.Synchronize(); }
}
