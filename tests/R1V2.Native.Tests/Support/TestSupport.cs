using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Backends.Cuda;

namespace R1V2.Native.Tests.Support;

/// <summary>One CPU backend shared by the tests of a collection (creating an ILGPU context and its kernels costs seconds).</summary>
public sealed class CpuFixture : IDisposable
{
    public CpuBackend Backend { get; } = new();
    public void Dispose() => Backend.Dispose();

    /// <summary>Runs body with the backend's attention through the ILGPU twins (true) or the SIMD host path (false), then restores it.</summary>
    public T WithAttentionTwins<T>(bool twins, Func<T> body)
    {
        bool before = Backend.AttentionTwins;
        Backend.AttentionTwins = twins;
        try { return body(); }
        finally { Backend.AttentionTwins = before; }
    }
}

[CollectionDefinition("cpu")]
public sealed class CpuCollection : ICollectionFixture<CpuFixture>;

/// <summary>Whether this machine can run the CUDA backend, and why not.</summary>
public static class Gpu
{
    private static readonly Lazy<(bool Ok, string Reason)> State = new(() =>
    {
        var ok = CudaBackend.IsAvailable(out var reason);
        return (ok, ok ? "" : $"no usable CUDA GPU here ({reason})");
    });

    public static bool Available => State.Value.Ok;
    public static string Reason => State.Value.Reason;
}

public static class TestData
{
    /// <summary>Uniform values in [-scale, scale), reproducible from the seed.</summary>
    public static float[] Uniform(int seed, int n, float scale = 1f)
    {
        var rng = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = (float)((rng.NextDouble() * 2 - 1) * scale);
        return a;
    }

    public static int[] Ints(int seed, int n, int max)
    {
        var rng = new Random(seed);
        var a = new int[n];
        for (int i = 0; i < n; i++) a[i] = rng.Next(max);
        return a;
    }

    public static double[] ToDouble(float[] a) => Array.ConvertAll(a, x => (double)x);
}

public static class Check
{
    /// <summary>Asserts |actual - expected| <= atol + rtol * |expected| elementwise, reporting the worst element.</summary>
    public static void Close(ReadOnlySpan<double> expected, ReadOnlySpan<float> actual, double atol, double rtol, string what)
    {
        Assert.True(expected.Length == actual.Length, $"{what}: length {actual.Length}, expected {expected.Length}");
        int worst = -1;
        double worstExcess = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            double err = Math.Abs(actual[i] - expected[i]);
            double excess = err - (atol + rtol * Math.Abs(expected[i]));
            if (double.IsNaN(actual[i]) || excess > worstExcess) { worst = i; worstExcess = double.IsNaN(actual[i]) ? double.PositiveInfinity : excess; }
        }
        if (worst >= 0)
            Assert.Fail($"{what}: element {worst} is {actual[worst]:R}, expected {expected[worst]:R} (atol {atol}, rtol {rtol})");
    }

    public static void Close(float[] expected, float[] actual, double atol, double rtol, string what) =>
        Close(TestData.ToDouble(expected), actual, atol, rtol, what);

    /// <summary>Relative error in the 2-norm: |a - e| / |e|.</summary>
    public static double RelativeL2(ReadOnlySpan<double> expected, ReadOnlySpan<float> actual)
    {
        double num = 0, den = 0;
        for (int i = 0; i < expected.Length; i++) { num += Math.Pow(actual[i] - expected[i], 2); den += expected[i] * expected[i]; }
        return Math.Sqrt(num / Math.Max(den, 1e-300));
    }
}

/// <summary>
/// Central finite differences of a scalar loss through the backend's own fp32 forward. The loss is summed in double
/// on the host so that rounding stays near fp32 output precision; with h = 1e-2 the truncation error is O(h^2).
/// </summary>
public static class FiniteDifference
{
    /// <param name="loss">Loss of the input values (runs the forward on the backend).</param>
    /// <param name="input">The point; perturbed in place and restored.</param>
    /// <param name="analytic">The backward's gradient at the point.</param>
    /// <param name="tolerance">Allowed |fd - analytic| / max(1, |analytic|).</param>
    public static void CheckGradient(Func<float[], double> loss, float[] input, float[] analytic, string what, int samples = 12, float h = 1e-2f, double tolerance = 5e-3, int seed = 7)
    {
        var rng = new Random(seed);
        for (int s = 0; s < Math.Min(samples, input.Length); s++)
        {
            int i = samples >= input.Length ? s : rng.Next(input.Length);
            float x = input[i];
            input[i] = x + h;
            double up = loss(input);
            input[i] = x - h;
            double down = loss(input);
            input[i] = x;
            double fd = (up - down) / (2 * h);
            double err = Math.Abs(fd - analytic[i]) / Math.Max(1, Math.Abs(analytic[i]));
            Assert.True(err <= tolerance, $"{what}: d/dx[{i}] finite difference {fd:R}, backward {analytic[i]:R} (relative error {err:E2} > {tolerance})");
        }
    }

    /// <summary>Sum of r[i] * y[i] in double: a loss whose gradient with respect to y is r.</summary>
    public static double Dot(float[] r, float[] y)
    {
        double s = 0;
        for (int i = 0; i < y.Length; i++) s += (double)r[i] * y[i];
        return s;
    }
}
