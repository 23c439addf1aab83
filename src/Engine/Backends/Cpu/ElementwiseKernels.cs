using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// ILGPU twins of kernels/elementwise.cu. Like the CUDA kernels' FOR_EACH, each thread walks a grid-stride loop:
/// thread t handles elements t, t + threads, ... (one simulated thread per element costs ~100x more on the CPU).
/// </summary>
internal static class ElementwiseKernels
{
    /// <summary>out = alpha * a + beta * b; hasB = 0 ignores b.</summary>
    public static void Axpby(Index1D t, ArrayView<float> output, ArrayView<float> a, ArrayView<float> b, float alpha, float beta, int hasB, int threads)
    {
        for (long i = t; i < output.Length; i += threads)
        {
            float v = alpha * a[i];
            if (hasB != 0) v += beta * b[i];
            output[i] = v;
        }
    }

    public static void ConvertF32ToBf16(Index1D t, ArrayView<ushort> output, ArrayView<float> x, int threads)
    {
        for (long i = t; i < output.Length; i += threads) output[i] = CpuMath.ToBf16(x[i]);
    }

    public static void ConvertBf16ToF32(Index1D t, ArrayView<float> output, ArrayView<ushort> x, int threads)
    {
        for (long i = t; i < output.Length; i += threads) output[i] = ILGPU.Interop.IntAsFloat((uint)x[i] << 16);
    }
}
