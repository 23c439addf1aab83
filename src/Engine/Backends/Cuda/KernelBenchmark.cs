using System.Text.Json;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Backends.Cuda;

/// <summary>One timed kernel: median time and what it achieved against the device's peak.</summary>
public sealed record KernelTiming(string Op, string Shape, string DType, double MedianMicroseconds, double MinMicroseconds, int Repeats,
    double Bytes, double Flops, double GigabytesPerSecond, double TeraflopsPerSecond, double PercentOfPeak, string Bound);

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

    public IReadOnlyList<KernelTiming> RunAll()
    {
        var b = backend;
        var bf = DType.BF16;
        var results = new List<KernelTiming>();
        const int T = 8192, C = 4096, F = 11008, V = 32768, H = 32, D = 128;

        using (var x = b.Allocate(bf, T, C)) using (var w = b.Allocate(bf, C)) using (var y = b.Allocate(bf, T, C)) using (var r = b.Allocate(DType.F32, T))
        using (var m = b.Allocate(DType.F32, T))
        {
            results.Add(Time("rmsnorm_forward", $"[{T}, {C}]", bf, 2.0 * T * C * 2, 0, () => b.RmsNormForward(x, w, y, r, 1e-6f)));
            results.Add(Time("rmsnorm_backward", $"[{T}, {C}]", bf, 3.0 * T * C * 2, 0, () => b.RmsNormBackward(y, x, w, r, y, null, false)));
            results.Add(Time("layernorm_forward", $"[{T}, {C}]", bf, 2.0 * T * C * 2, 0, () => b.LayerNormForward(x, w, w, y, m, r, 1e-6f)));
            results.Add(Time("axpby (residual add)", $"[{T}, {C}]", bf, 3.0 * T * C * 2, 0, () => b.Add(y, x, y)));
            results.Add(Time("gelu_forward", $"[{T}, {C}]", bf, 2.0 * T * C * 2, 0, () => b.GeluForward(x, y, GeluApproximation.Erf)));
            results.Add(Time("softmax_forward", $"[{T}, {C}]", bf, 2.0 * T * C * 2, 0, () => b.SoftmaxForward(x, y)));
        }
        using (var g = b.Allocate(bf, T, F)) using (var u = b.Allocate(bf, T, F)) using (var y = b.Allocate(bf, T, F))
        {
            results.Add(Time("swiglu_forward", $"[{T}, {F}]", bf, 3.0 * T * F * 2, 0, () => b.SwiGluForward(g, u, y)));
            results.Add(Time("swiglu_backward", $"[{T}, {F}]", bf, 5.0 * T * F * 2, 0, () => b.SwiGluBackward(y, g, u, g, u)));
        }
        using (var q = b.Allocate(bf, T, H, D)) using (var pos = b.Allocate(DType.I32, T))
            results.Add(Time("rope_forward", $"[{T}, {H}, {D}]", bf, 2.0 * T * H * D * 2, 0, () => b.RopeForward(q, pos, q, 1e6f)));
        using (var logits = b.Allocate(bf, 2048, V)) using (var tgt = b.Allocate(DType.I32, 2048)) using (var lp = b.Allocate(DType.F32, 2048))
        using (var lse = b.Allocate(DType.F32, 2048))
        {
            results.Add(Time("cross_entropy_forward", $"[2048, {V}]", bf, 2048.0 * V * 2, 0, () => b.CrossEntropyForward(logits, tgt, lp, lse)));
            results.Add(Time("cross_entropy_backward", $"[2048, {V}]", bf, 2.0 * 2048 * V * 2, 0, () => b.CrossEntropyBackward(logits, tgt, lse, lp, logits)));
        }
        using (var table = b.Allocate(bf, V, C)) using (var ids = b.Allocate(DType.I32, T)) using (var o = b.Allocate(bf, T, C))
            results.Add(Time("embedding_forward", $"[{T}] x [{V}, {C}]", bf, 2.0 * T * C * 2, 0, () => b.EmbeddingForward(table, ids, o)));
        {
            // Attention forward, two packed causal sequences of 4096 tokens, 32 query / 8 kv heads of 128: both schedules.
            const int L = 4096, AH = 32, AKV = 8, AD = 128;
            using var seq = b.Sequences([0, L, 2 * L]);
            using var q = b.Allocate(bf, 2 * L, AH, AD);
            using var k = b.Allocate(bf, 2 * L, AKV, AD);
            using var v = b.Allocate(bf, 2 * L, AKV, AD);
            using var o = b.Allocate(bf, 2 * L, AH, AD);
            using var lse = b.Allocate(DType.F32, 2 * L, AH);
            double flops = 2 * 4.0 * L * (double)L / 2 * AD * AH; // QK^T and PV, causal half
            double bytes = 2.0 * 2 * L * (AH + 2 * AKV + AH) * AD;
            var before = b.Attention;
            foreach (var variant in new[] { AttentionVariant.RowWise, AttentionVariant.Tiled })
            {
                b.Attention = variant;
                results.Add(Time($"attention_forward ({variant})", $"2 x {L} causal, H {AH}/{AKV}, D {AD}", bf, bytes, flops,
                    () => b.AttentionForward(q, k, v, seq, o, lse, 1f / MathF.Sqrt(AD), true)));
            }
            using var dq = b.Allocate(bf, 2 * L, AH, AD);
            using var dk = b.Allocate(bf, 2 * L, AKV, AD);
            using var dv = b.Allocate(bf, 2 * L, AKV, AD);
            foreach (var variant in new[] { AttentionVariant.RowWise, AttentionVariant.Tiled })
            {
                b.Attention = variant;
                results.Add(Time($"attention_backward ({variant})", $"2 x {L} causal, H {AH}/{AKV}, D {AD}", bf, 2 * bytes, 2.5 * flops,
                    () => b.AttentionBackward(o, q, k, v, o, lse, seq, dq, dk, dv, 1f / MathF.Sqrt(AD), true)));
            }
            b.Attention = before;
        }
        const long N = 64L << 20;
        using (var p = b.Allocate(DType.F32, (int)N)) using (var g = b.Allocate(DType.F32, (int)N)) using (var m1 = b.Allocate(DType.F32, (int)N))
        using (var v1 = b.Allocate(DType.F32, (int)N)) using (var c = b.Allocate(bf, (int)N))
        {
            results.Add(Time("adamw_update", $"[{N}]", DType.F32, N * (4.0 * 4 + 3 * 4 + 2), 0, () => b.AdamW(p, g, m1, v1, c, new AdamWSettings(1e-4f), 1)));
            results.Add(Time("grad_norm", $"[{N}]", DType.F32, N * 4.0, 0, () => b.GlobalNorm([g])));
        }
        foreach (var (m, n, k) in new[] { (8192, 8192, 8192), (4096, 11008, 4096), (8192, 4096, 11008) })
            using (var a = b.Allocate(bf, m, k)) using (var w = b.Allocate(bf, n, k)) using (var c = b.Allocate(bf, m, n))
                results.Add(Time("gemm (cublasLt, x W^T)", $"{m}x{n}x{k}", bf, 2.0 * (m * (long)k + n * (long)k + m * (long)n), 2.0 * m * n * k,
                    () => b.Gemm(a, false, w, true, c)));
        return results;
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
