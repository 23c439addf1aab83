using BenchmarkDotNet.Attributes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Perf;

/// <summary>kernels/cross_entropy.cu, embedding.cu, adamw.cu, grad_norm.cu twins on the CPU backend.</summary>
public class LossBench : OpBench
{
    private const int Rows = 64, Vocab = 32768, Dim = 512, Params = 1 << 20;
    private Tensor _logits = null!, _targets = null!, _lp = null!, _lse = null!, _table = null!, _out = null!;
    private Tensor _p = null!, _g = null!, _m = null!, _v = null!;

    protected override void Allocate()
    {
        _logits = Random(1, Rows, Vocab);
        _targets = B.FromArray(Enumerable.Range(0, Rows).Select(i => i * 31 % Vocab).ToArray(), [Rows]);
        _lp = B.Allocate(DType.F32, Rows); _lse = B.Allocate(DType.F32, Rows);
        _table = Random(2, 4096, Dim); _out = B.Allocate(DType.F32, Rows, Dim);
        _p = Random(3, Params); _g = Random(4, Params); _m = B.Allocate(DType.F32, Params); _v = B.Allocate(DType.F32, Params);
    }

    [Benchmark] public void CrossEntropyForward() { B.CrossEntropyForward(_logits, _targets, _lp, _lse); B.Synchronize(); }
    [Benchmark] public void CrossEntropyBackward() { B.CrossEntropyBackward(_logits, _targets, _lse, _lp, _logits); B.Synchronize(); }
    [Benchmark] public void EmbeddingForward() { B.EmbeddingForward(_table, _targets, _out); B.Synchronize(); }
    [Benchmark] public void AdamW() { B.AdamW(_p, _g, _m, _v, null, new AdamWSettings(1e-4f), 1); B.Synchronize(); }
    [Benchmark] public double GlobalNorm() => B.GlobalNorm([_g]);
}
