using BenchmarkDotNet.Running;

namespace R1V2.Native.Perf;

/// <summary>
/// CPU-backend op benchmarks (BenchmarkDotNet). `dotnet run -c Release --project perf/R1V2.Native.Perf -- --filter '*'`.
/// CUDA kernels are timed by `engine bench kernels` with CUDA events instead.
/// </summary>
public static class Program
{
    public static void Main(string[] args) => BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
}
