using System.CommandLine;
using R1V2.Native.Engine.Backends.Cuda;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine bench kernels`: times every CUDA kernel with CUDA events and writes JSON under perf/results/.</summary>
public static class BenchCommand
{
    public static Command Create()
    {
        var output = new Option<string>("--out") { Description = "Directory for the JSON results", DefaultValueFactory = _ => Path.Combine("perf", "results") };
        var repeats = new Option<int>("--repeats") { Description = "Timed repeats per kernel (at least 20)", DefaultValueFactory = _ => 25 };
        var kernels = new Command("kernels", "Time each CUDA kernel (warm-up, L2 flushed, median) and report GB/s or TFLOP/s and % of peak") { output, repeats };
        kernels.SetAction(r => RunKernels(r.GetValue(output)!, r.GetValue(repeats)));
        return new Command("bench", "Benchmarks") { kernels };
    }

    public static int RunKernels(string outDir, int repeats)
    {
        if (!CudaBackend.IsAvailable(out var reason))
        {
            AnsiConsole.MarkupLineInterpolated($"No CUDA GPU here, so there is nothing to time: {reason}");
            AnsiConsole.MarkupLine("The CPU ops are benchmarked with BenchmarkDotNet: dotnet run -c Release --project perf/R1V2.Native.Perf");
            return 0;
        }
        using var backend = new CudaBackend();
        var d = backend.Device;
        AnsiConsole.MarkupLineInterpolated($"{d.Name} ({d.Arch}, {d.MultiprocessorCount} SMs, {d.PeakBandwidthBytesPerSecond / 1e9:F0} GB/s, {KernelBenchmark.PeakBf16Flops(d) / 1e12:F0} bf16 TFLOP/s peak)");
        var bench = new KernelBenchmark(backend, repeats);
        IReadOnlyList<KernelTiming> timings = [];
        AnsiConsole.Status().Start("timing kernels", _ => timings = bench.RunAll());
        var table = new Table().AddColumns("op", "shape", "dtype", "median (us)", "GB/s", "TFLOP/s", "% of peak", "bound");
        foreach (var t in timings)
            table.AddRow(t.Op, t.Shape, t.DType, t.MedianMicroseconds.ToString("F1"), t.GigabytesPerSecond.ToString("F0"),
                t.Flops > 0 ? t.TeraflopsPerSecond.ToString("F1") : "-", t.PercentOfPeak.ToString("F1"), t.Bound);
        AnsiConsole.Write(table);
        var path = KernelBenchmark.WriteJson(outDir, d, timings);
        AnsiConsole.MarkupLineInterpolated($"wrote {path}");
        return 0;
    }
}
