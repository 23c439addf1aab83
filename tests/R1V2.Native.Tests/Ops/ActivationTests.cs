namespace R1V2.Native.Tests.Ops;

/// <summary>kernels/swiglu.cu and kernels/gelu.cu through their ILGPU twins.</summary>
[Collection("cpu")]
public sealed class ActivationTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    private float[] SwiGlu(float[] g, float[] u)
    {
        using var tg = _b.FromArray(g, DType.F32, [g.Length]);
        using var tu = _b.FromArray(u, DType.F32, [u.Length]);
        using var ty = _b.Allocate(DType.F32, g.Length);
        _b.SwiGluForward(tg, tu, ty);
        return ty.ToFloatArray();
    }

    [Fact]
    public void SwiGluForwardAndBackward_MatchDoubleReferenceAndFiniteDifferences()
    {
        const int n = 77;
        var g = TestData.Uniform(31, n, 6f);
        var u = TestData.Uniform(32, n, 2f);
        var r = TestData.Uniform(33, n);
        var y = SwiGlu(g, u);
        Check.Close(Enumerable.Range(0, n).Select(i => Reference.Silu(g[i]) * u[i]).ToArray(), y, 1e-6, 1e-5, "y");

        using var tg = _b.FromArray(g, DType.F32, [n]);
        using var tu = _b.FromArray(u, DType.F32, [n]);
        using var tdy = _b.FromArray(r, DType.F32, [n]);
        using var tdg = _b.Allocate(DType.F32, n);
        using var tdu = _b.Allocate(DType.F32, n);
        _b.SwiGluBackward(tdy, tg, tu, tdg, tdu);

        var gd = TestData.ToDouble(g); var ud = TestData.ToDouble(u); var rd = TestData.ToDouble(r);
        double Loss(double[] gg, double[] uu) => Reference.Dot(rd, gg.Select((v, i) => Reference.Silu(v) * uu[i]).ToArray());
        Check.Close(Reference.Gradient(v => Loss(v, ud), gd), tdg.ToFloatArray(), 1e-5, 1e-4, "dgate");
        Check.Close(Reference.Gradient(v => Loss(gd, v), ud), tdu.ToFloatArray(), 1e-5, 1e-4, "dup");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, SwiGlu(v, u)), g, tdg.ToFloatArray(), "dgate (backend fd)");
    }

    private float[] Gelu(float[] x, GeluApproximation a)
    {
        using var tx = _b.FromArray(x, DType.F32, [x.Length]);
        using var ty = _b.Allocate(DType.F32, x.Length);
        _b.GeluForward(tx, ty, a);
        return ty.ToFloatArray();
    }

    [Theory]
    [InlineData(GeluApproximation.Erf)]
    [InlineData(GeluApproximation.Tanh)]
    public void GeluForwardAndBackward_MatchDoubleReferenceAndFiniteDifferences(GeluApproximation a)
    {
        const int n = 101;
        var x = TestData.Uniform(34, n, 5f);
        var r = TestData.Uniform(35, n);
        Func<double, double> f = a == GeluApproximation.Erf ? Reference.GeluErf : Reference.GeluTanh;
        // erf polynomial error 1.5e-7 absolute, times |x| / 2 <= 2.5: 1e-6 absolute.
        Check.Close(x.Select(v => f(v)).ToArray(), Gelu(x, a), 1e-6, 1e-5, "y");

        using var tx = _b.FromArray(x, DType.F32, [n]);
        using var tdy = _b.FromArray(r, DType.F32, [n]);
        using var tdx = _b.Allocate(DType.F32, n);
        _b.GeluBackward(tdy, tx, tdx, a);
        var expected = Enumerable.Range(0, n).Select(i => r[i] * (f(x[i] + 1e-6) - f(x[i] - 1e-6)) / 2e-6).ToArray();
        Check.Close(expected, tdx.ToFloatArray(), 2e-5, 1e-4, "dx");
        FiniteDifference.CheckGradient(v => FiniteDifference.Dot(r, Gelu(v, a)), x, tdx.ToFloatArray(), "dx (backend fd)");
    }

    [Fact]
    public void GeluErfAndTanh_Differ_SoTheFlagReachesTheKernel()
    {
        var x = new[] { -2f, -0.7f, 1.3f, 3f };
        var erf = Gelu(x, GeluApproximation.Erf);
        var tanh = Gelu(x, GeluApproximation.Tanh);
        Assert.Contains(Enumerable.Range(0, x.Length), i => Math.Abs(erf[i] - tanh[i]) > 1e-4);
    }
}
