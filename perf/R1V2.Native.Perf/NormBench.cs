using BenchmarkDotNet.Attributes;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Perf;

/// <summary>kernels/rmsnorm.cu and kernels/layernorm.cu twins on the CPU backend.</summary>
public class RmsNormBench : OpBench
{
    [Params(64, 512)] public int Rows;
    private const int Cols = 1024;
    private Tensor _x = null!, _w = null!, _y = null!, _r = null!, _m = null!;

    protected override void Allocate()
    {
        _x = Random(1, Rows, Cols); _w = Random(2, Cols); _y = B.Allocate(DType.F32, Rows, Cols);
        _r = B.Allocate(DType.F32, Rows); _m = B.Allocate(DType.F32, Rows);
    }

    [Benchmark] public void RmsNormForward() { B.RmsNormForward(_x, _w, _y, _r, 1e-6f); B.Synchronize(); }
    [Benchmark] public void RmsNormBackward() { B.RmsNormBackward(_y, _x, _w, _r, _y, null, false); B.Synchronize(); }
    [Benchmark] public void LayerNormForward() { B.LayerNormForward(_x, _w, _w, _y, _m, _r, 1e-6f); B.Synchronize(); }
}
