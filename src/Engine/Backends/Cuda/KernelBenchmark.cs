using System.Text.Json;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Backends.Cuda;

/// <summary>One timed kernel: median time and what it achieved against the device's peak.</summary>
public sealed record KernelTiming(string Op, string Shape, string DType, double MedianMicroseconds, double MinMicroseconds, int Repeats,
    double Bytes, double Flops, double GigabytesPerSecond, double TeraflopsPerSecond, double PercentOfPeak, string Bound)
{
    /// <summary>The op's peak device memory above what was in use before it (the loss ops), or null.</summary>
    public long? PeakBytes { get; init; }

    /// <summary>The kernels the op launched: block size, registers, spilled bytes and occupancy of each.</summary>
    public IReadOnlyList<KernelUse> Kernels { get; init; } = [];
}

/// <summary>One kernel an op launched, as compiled and as resident on the GPU.</summary>
public sealed record KernelUse(string Kernel, int Block, int Registers, int SpillBytes, double Occupancy);

/// <summary>
/// Times each op of the CUDA backend with CUDA events on its stream: warm-up launches, then repeats each preceded by
/// a write over a buffer twice the L2 size (so every repeat reads from DRAM), median of the repeats. Memory-bound ops
/// report GB/s against the DRAM peak; GEMMs report TFLOP/s against the dense bf16 tensor-core peak.
/// </summary>
public sealed class KernelBenchmark(CudaBackend backend, int repeats = 25, int warmup = 3)
{
    public int Repeats { get; } = Math.Max(20, repeats);

    /// <summary>
    /// Dense bf16 tensor-core peak: FLOP per clock per SM (4096 on sm_90, 2048 on sm_80, 1024 on sm_86/89) x SMs x the
    /// reported max clock. The max clock is above the sustained tensor clock, so the % is conservative.
    /// </summary>
    public static double PeakBf16Flops(CudaDeviceInfo d)
    {
        double perClockPerSm = d.Major >= 9 ? 4096 : d.Major == 8 && d.Minor == 0 ? 2048 : 1024;
        return perClockPerSm * d.MultiprocessorCount * d.ClockRateKHz * 1e3;
    }

    public IReadOnlyList<KernelTiming> RunAll() => RunAll(BenchShapes.Model38B);

    /// <summary>Times every op of <see cref="KernelOps"/> at <paramref name="shapes"/> in bf16.</summary>
    public IReadOnlyList<KernelTiming> RunAll(BenchShapes shapes)
    {
        var results = new List<KernelTiming>();
        foreach (var op in KernelOps.All(backend, shapes, DType.BF16))
            using (op)
            {
                var timing = Time(op.Name, op.Shape, op.DType, op.Bytes, op.Flops, op.Launch) with { Kernels = KernelsOf(op) };
                results.Add(op.ReportsPeak ? timing with { PeakBytes = KernelOps.PeakBytes(backend, op) } : timing);
            }
        return results;
    }

    /// <summary>The distinct kernels one launch of <paramref name="op"/> runs (cuBLAS GEMMs are not ours: none listed).</summary>
    private IReadOnlyList<KernelUse> KernelsOf(KernelOp op)
    {
        backend.LaunchLog = [];
        try
        {
            op.Launch();
            backend.Synchronize();
            return [.. backend.LaunchLog.Distinct().Select(k => backend.Use(k.Family, k.Kernel))];
        }
        finally { backend.LaunchLog = null; }
    }

    private KernelTiming Time(string op, string shape, DType dtype, double bytes, double flops, Action launch)
    {
        var b = backend;
        var dev = b.Device;
        long flushBytes = Math.Max(2L * dev.L2CacheBytes, 8L << 20);
        using var flush = b.Allocate(DType.F32, (int)(flushBytes / 4));
        for (int i = 0; i < warmup; i++) launch();
        b.Synchronize();
        var times = new double[Repeats];
        using var start = new CudaEvent();
        using var end = new CudaEvent();
        for (int i = 0; i < Repeats; i++)
        {
            b.Zero(flush); // evicts the operands from L2
            start.Record(b.Stream);
            launch();
            end.Record(b.Stream);
            end.Synchronize();
            times[i] = CudaEvent.Elapsed(start, end) * 1000.0;
        }
        Array.Sort(times);
        double median = times[Repeats / 2], seconds = median * 1e-6;
        double gbps = bytes / seconds / 1e9, tflops = flops / seconds / 1e12;
        bool compute = flops > 0;
        double pct = compute ? 100 * flops / seconds / PeakBf16Flops(dev) : 100 * bytes / seconds / dev.PeakBandwidthBytesPerSecond;
        return new KernelTiming(op, shape, dtype.Name(), median, times[0], Repeats, bytes, flops, gbps, tflops, pct, compute ? "compute" : "memory");
    }

    /// <summary>Writes the timings with the device description as JSON; returns the path.</summary>
    public static string WriteJson(string directory, CudaDeviceInfo device, IReadOnlyList<KernelTiming> timings)
    {
        Directory.CreateDirectory(directory);
        var name = new string(device.Name.Select(ch => char.IsLetterOrDigit(ch) ? char.ToLowerInvariant(ch) : '-').ToArray()).Trim('-');
        var path = Path.Combine(directory, $"kernels-{name}-{DateTime.UtcNow:yyyyMMdd-HHmmss}.json");
        var doc = new
        {
            device = new { device.Name, device.Arch, device.MultiprocessorCount, device.TotalMemoryBytes, device.ClockRateKHz,
                PeakBandwidthGBs = device.PeakBandwidthBytesPerSecond / 1e9, PeakBf16Tflops = PeakBf16Flops(device) / 1e12 },
            driver = CudaDriver.DriverVersion(),
            nvrtc = Nvrtc.Version().ToString(),
            utc = DateTime.UtcNow,
            timings,
        };
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
        return path;
    }
}
