using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/elementwise.cu: one thread per element.</summary>
internal static class ElementwiseKernels
{
    /// <summary>out = alpha * a + beta * b; hasB = 0 ignores b.</summary>
    public static void Axpby(Index1D i, ArrayView<float> output, ArrayView<float> a, ArrayView<float> b, float alpha, float beta, int hasB)
    {
        float v = alpha * a[i];
        if (hasB != 0) v += beta * b[i];
        output[i] = v;
    }

    public static void ConvertF32ToBf16(Index1D i, ArrayView<ushort> output, ArrayView<float> x) => output[i] = CpuMath.ToBf16(x[i]);

    public static void ConvertBf16ToF32(Index1D i, ArrayView<float> output, ArrayView<ushort> x) =>
        output[i] = ILGPU.Interop.IntAsFloat((uint)x[i] << 16);
}
