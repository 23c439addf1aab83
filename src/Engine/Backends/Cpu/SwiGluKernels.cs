using ILGPU;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>ILGPU twins of kernels/swiglu.cu: one thread per element.</summary>
internal static class SwiGluKernels
{
    public static void Forward(Index1D i, ArrayView<float> y, ArrayView<float> g, ArrayView<float> u)
    {
        float gv = g[i];
        y[i] = gv * CpuMath.Sigmoid(gv) * u[i];
    }

    public static void Backward(Index1D i, ArrayView<float> dg, ArrayView<float> du, ArrayView<float> dy, ArrayView<float> g, ArrayView<float> u)
    {
        float gv = g[i], uv = u[i], d = dy[i];
        float s = CpuMath.Sigmoid(gv);
        dg[i] = d * uv * s * (1f + gv * (1f - s));
        du[i] = d * gv * s;
    }
}
