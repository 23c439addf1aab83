using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Layers;

/// <summary>Saved statistics of one norm forward (mean is null for RMSNorm).</summary>
public sealed class NormCache(Tensor? mean, Tensor rstd) : IDisposable
{
    public Tensor? Mean { get; } = mean;
    public Tensor Rstd { get; } = rstd;

    public void Dispose()
    {
        Mean?.Dispose();
        Rstd.Dispose();
    }
}

/// <summary>RMSNorm (weight only) or LayerNorm (weight and optional bias) over the last dimension.</summary>
public sealed class Norm(Backend backend, Parameter weight, Parameter? bias, bool layerNorm, float eps)
{
    public Parameter Weight { get; } = weight;
    public Parameter? Bias { get; } = bias;
    public bool IsLayerNorm { get; } = layerNorm;
    public float Eps { get; } = eps;
    public IEnumerable<Parameter> Parameters => Bias is null ? [Weight] : [Weight, Bias];

    /// <summary>x: [T, C] -> y: [T, C], with the statistics backward needs.</summary>
    public Tensor Forward(Tensor x, out NormCache cache)
    {
        var b = backend;
        var y = b.Activations(x.Rows, x.Cols);
        var rstd = b.Allocate(DType.F32, x.Rows);
        if (IsLayerNorm)
        {
            var mean = b.Allocate(DType.F32, x.Rows);
            b.LayerNormForward(x, Weight.Value, Bias?.Value, y, mean, rstd, Eps);
            cache = new NormCache(mean, rstd);
        }
        else
        {
            b.RmsNormForward(x, Weight.Value, y, rstd, Eps);
            cache = new NormCache(null, rstd);
        }
        return y;
    }

    /// <summary>dx from dy; accumulates the weight (and bias) gradients when trainable.</summary>
    public Tensor Backward(Tensor dy, Tensor x, NormCache cache)
    {
        var b = backend;
        var dx = b.Activations(x.Rows, x.Cols);
        if (IsLayerNorm)
            b.LayerNormBackward(dy, x, Weight.Value, cache.Mean!, cache.Rstd, dx, Weight.Grad, Weight.Grad is null ? null : Bias?.Grad, accumulate: true);
        else
            b.RmsNormBackward(dy, x, Weight.Value, cache.Rstd, dx, Weight.Grad, accumulate: true);
        return dx;
    }
}
