using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/gelu.cu (approximate: 0 erf, 1 tanh), grid-stride over the elements.</summary>
internal static class GeluKernels
{
    private const float Sqrt2OverPi = 0.7978845608028654f, InvSqrt2 = 0.7071067811865476f, InvSqrt2Pi = 0.3989422804014327f;

    public static float Value(float x, int approximate) => approximate != 0
        ? 0.5f * x * (1f + MathF.Tanh(Sqrt2OverPi * (x + 0.044715f * x * x * x)))
        : 0.5f * x * (1f + CpuMath.Erf(x * InvSqrt2));

    public static float Derivative(float x, int approximate)
    {
        if (approximate != 0)
        {
            float t = MathF.Tanh(Sqrt2OverPi * (x + 0.044715f * x * x * x));
            float du = Sqrt2OverPi * (1f + 3f * 0.044715f * x * x);
            return 0.5f * (1f + t) + 0.5f * x * (1f - t * t) * du;
        }
        return 0.5f * (1f + CpuMath.Erf(x * InvSqrt2)) + x * InvSqrt2Pi * MathF.Exp(-0.5f * x * x);
    }

    public static void Forward(Index1D t, ArrayView<float> y, ArrayView<float> x, int approximate, int threads)
    {
        for (long i = t; i < y.Length; i += threads) y[i] = Value(x[i], approximate);
    }

    public static void Backward(Index1D t, ArrayView<float> dx, ArrayView<float> dy, ArrayView<float> x, int approximate, int threads)
    {
        for (long i = t; i < dx.Length; i += threads) dx[i] = dy[i] * Derivative(x[i], approximate);
    }
}
