namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>Scalar math shared by the ILGPU twins (fp32, as the CUDA kernels compute).</summary>
internal static class CpuMath
{
    /// <summary>erf to about 1.5e-7 absolute (Abramowitz and Stegun 7.1.26); .NET has no MathF.Erf.</summary>
    public static float Erf(float x)
    {
        float s = x < 0f ? -1f : 1f;
        float a = MathF.Abs(x);
        float t = 1f / (1f + 0.3275911f * a);
        float y = 1f - (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t * MathF.Exp(-a * a);
        return s * y;
    }

    public static float Sigmoid(float x) => 1f / (1f + MathF.Exp(-x));

    /// <summary>bf16 bits of <paramref name="f"/>, rounded to nearest even (the kernels' cvt.rn.bf16.f32).</summary>
    public static ushort ToBf16(float f)
    {
        uint u = ILGPU.Interop.FloatAsInt(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
        u += 0x7fffu + ((u >> 16) & 1u);
        return (ushort)(u >> 16);
    }
}
