using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Layers;

/// <summary>
/// y = x W^T + b with W: [out, in] (the Hugging Face layout), b: [out] or none. Forward keeps x for backward;
/// backward accumulates dW (+)= dy^T x and db (+)= colsum(dy) in fp32 and returns dx = dy W.
/// </summary>
public sealed class Linear : IDisposable
{
    private readonly Backend _b;

    public Linear(Backend backend, string name, int inFeatures, int outFeatures, bool bias, Random init)
    {
        _b = backend;
        In = inFeatures;
        Out = outFeatures;
        // Uniform(-1/sqrt(in), 1/sqrt(in)), as torch.nn.Linear.
        float bound = 1f / MathF.Sqrt(inFeatures);
        Weight = Parameter.Create(backend, name + ".weight", [outFeatures, inFeatures], Uniform(init, outFeatures * inFeatures, bound));
        Bias = bias ? Parameter.Create(backend, name + ".bias", [outFeatures], Uniform(init, outFeatures, bound)) : null;
    }

    public int In { get; }
    public int Out { get; }
    public Parameter Weight { get; }
    public Parameter? Bias { get; }
    public IEnumerable<Parameter> Parameters => Bias is null ? [Weight] : [Weight, Bias];

    /// <summary>x: [T, in] -> y: [T, out].</summary>
    public Tensor Forward(Tensor x)
    {
        var y = _b.Activations(x.Rows, Out);
        _b.Gemm(x, false, Weight.Value, true, y, Bias?.Value);
        return y;
    }

    /// <summary>dy: [T, out], x: the forward input [T, in] -> dx: [T, in]; accumulates the parameter gradients.</summary>
    public Tensor Backward(Tensor dy, Tensor x)
    {
        if (Weight.Grad is not null) _b.Gemm(dy, true, x, false, Weight.Grad, beta: 1f);
        if (Bias?.Grad is not null) _b.BiasBackward(dy, Bias.Grad, accumulate: true);
        var dx = _b.Activations(x.Rows, In);
        _b.Gemm(dy, false, Weight.Value, false, dx);
        return dx;
    }

    internal static float[] Uniform(Random rng, int n, float bound)
    {
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = (float)((rng.NextDouble() * 2 - 1) * bound);
        return a;
    }

    public void Dispose()
    {
        Weight.Dispose();
        Bias?.Dispose();
    }
}
