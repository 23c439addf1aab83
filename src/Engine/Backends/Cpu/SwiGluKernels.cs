using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/swiglu.cu: grid-stride over the elements.</summary>
internal static class SwiGluKernels
{
    public static void Forward(Index1D t, ArrayView<float> y, ArrayView<float> g, ArrayView<float> u, int threads)
    {
        for (long i = t; i < y.Length; i += threads)
        {
            float gv = g[i];
            y[i] = gv * CpuMath.Sigmoid(gv) * u[i];
        }
    }

    public static void Backward(Index1D t, ArrayView<float> dg, ArrayView<float> du, ArrayView<float> dy, ArrayView<float> g, ArrayView<float> u, int threads)
    {
        for (long i = t; i < dg.Length; i += threads)
        {
            float gv = g[i], uv = u[i], d = dy[i];
            float s = CpuMath.Sigmoid(gv);
            dg[i] = d * uv * s * (1f + gv * (1f - s));
            du[i] = d * gv * s;
        }
    }
}
