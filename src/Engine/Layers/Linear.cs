using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Layers;

/// <summary>
/// y = x W^T + b with W: [out, in] (the Hugging Face layout), b: [out] or none. Backward accumulates
/// dW (+)= dy^T x and db (+)= colsum(dy) in fp32 (frozen parameters get nothing) and returns dx = dy W when asked.
/// The static pair works on any weight view, such as the q, k and v row slices of a fused qkv weight.
/// </summary>
public sealed class Linear : IDisposable
{
    private readonly Backend _b;

    public Linear(Backend backend, string name, int inFeatures, int outFeatures, bool bias, Random init, bool trainable = true)
        : this(backend,
            Parameter.Create(backend, name + ".weight", [outFeatures, inFeatures], Uniform(init, outFeatures * inFeatures, 1f / MathF.Sqrt(inFeatures)), trainable),
            bias ? Parameter.Create(backend, name + ".bias", [outFeatures], Uniform(init, outFeatures, 1f / MathF.Sqrt(inFeatures)), trainable) : null)
    {
    }

    /// <summary>A linear layer over existing parameters (weights loaded from a checkpoint, or tied).</summary>
    public Linear(Backend backend, Parameter weight, Parameter? bias)
    {
        _b = backend;
        Weight = weight;
        Bias = bias;
        Out = weight.Value.Dim(0);
        In = weight.Value.Dim(1);
    }

    public int In { get; }
    public int Out { get; }
    public Parameter Weight { get; }
    public Parameter? Bias { get; }
    public IEnumerable<Parameter> Parameters => Bias is null ? [Weight] : [Weight, Bias];

    /// <summary>x: [T, in] -> y: [T, out].</summary>
    public Tensor Forward(Tensor x) => Forward(_b, x, Weight.Value, Bias?.Value);

    /// <summary>dy: [T, out], x: the forward input [T, in] -> dx: [T, in] (or null when not wanted).</summary>
    public Tensor? Backward(Tensor dy, Tensor x, bool inputGradient = true) =>
        Backward(_b, dy, x, Weight.Value, Weight.Grad, Bias?.Grad, inputGradient);

    /// <summary>y [T, out] = x [T, in] w [out, in]^T (+ bias [out]).</summary>
    public static Tensor Forward(Backend b, Tensor x, Tensor w, Tensor? bias)
    {
        var y = b.Activations(x.Rows, w.Dim(0));
        b.Gemm(x.Rank == 2 ? x : x.Reshape(x.Rows, x.Cols), false, w, true, y, bias);
        return y;
    }

    /// <summary>
    /// y = x w^T in fp32 whatever the storage type (logits: in bf16, a logit near 24 rounds by up to 0.06, 0.1 nat at
    /// temperature 0.6, the size of a PPO clip band). x: [T, in], w: [out, in]; y: [T, out] fp32, a new tensor.
    /// </summary>
    public static Tensor ForwardF32(Backend b, Tensor x, Tensor w)
    {
        var y = b.Allocate(DType.F32, x.Rows, w.Dim(0));
        b.Gemm(x.Rank == 2 ? x : x.Reshape(x.Rows, x.Cols), false, w, true, y);
        return y;
    }

    /// <summary>Accumulates dw (+)= dy^T x and dbias (+)= colsum(dy) where given; returns dx = dy w when asked.</summary>
    public static Tensor? Backward(Backend b, Tensor dy, Tensor x, Tensor w, Tensor? dw, Tensor? dbias, bool inputGradient)
    {
        var x2 = x.Rank == 2 ? x : x.Reshape(x.Rows, x.Cols);
        var dy2 = dy.Rank == 2 ? dy : dy.Reshape(dy.Rows, dy.Cols);
        if (dw is not null) b.Gemm(dy2, true, x2, false, dw, beta: 1f);
        if (dbias is not null) b.BiasBackward(dy2, dbias, accumulate: true);
        if (!inputGradient) return null;
        var dx = b.Activations(x2.Rows, w.Dim(1));
        b.Gemm(dy2, false, w, false, dx);
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
