using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Backends.Cuda;

namespace R1V2.Native.Tests.Kernels;

/// <summary>`engine bench kernels` without a GPU: its op list runs on the CPU, and the regression gate's arithmetic.</summary>
public sealed class KernelBenchmarkTests
{
    [Fact]
    public void EveryBenchmarkedOp_RunsOnTheCpu_AtTinyShapes()
    {
        using var b = new CpuBackend();
        var names = new List<string>();
        foreach (var op in KernelOps.All(b, BenchShapes.Tiny, DType.F32))
            using (op)
            {
                op.Launch();
                names.Add(op.Name);
            }
        // Forward and backward, weight and bias gradients, every attention schedule, decode at each batch, the loss pair.
        foreach (var expected in new[] { "rmsnorm_backward (dx + weight gradient)", "layernorm_backward (dx + weight and bias gradients)", "bias_backward",
                     "gelu_backward", "softmax_backward", "rope_backward", "embedding_backward", "attention_forward (Tiled)", "attention_backward (RowWise)",
                     "attention_forward (Flash)", "attention_backward (Flash)",
                     "paged_attention_decode (batch 1)", "paged_attention_decode (batch 3)", "fused GRPO loss, pass 1 (chunked LM head + log-sum-exp)",
                     "unfused loss ([T, V] fp32 logits + cross entropy)", "adamw_update", "adamw_multi (9 tensors, one launch)", "grad_norm", "gemm (x W^T)" })
            Assert.Contains(expected, names);
        b.ReleaseTables();                       // the RoPE table the rope ops made (cached by the backend)
        Assert.Equal(0, b.Memory.BytesInUse);   // every input was freed
    }

    [Fact]
    public void TheFusedLoss_PeaksFarBelowTheUnfusedOne()
    {
        using var b = new CpuBackend();
        var shapes = BenchShapes.Tiny with { LossRows = 64, LossVocabulary = 4000 };
        long fused = 0, unfused = 0;
        foreach (var op in KernelOps.All(b, shapes, DType.F32))
            using (op)
            {
                if (op.Name.StartsWith("fused GRPO loss", StringComparison.Ordinal)) fused = KernelOps.PeakBytes(b, op);
                if (op.Name.StartsWith("unfused loss", StringComparison.Ordinal)) unfused = KernelOps.PeakBytes(b, op);
            }
        Assert.True(unfused >= 64L * 4000 * 4, $"the unfused loss holds [T, V] fp32 logits: {unfused} B");
        Assert.True(fused * 3 <= unfused, $"fused {fused} B against unfused {unfused} B");
    }

    private static KernelTiming T(string op, double percent, string shape = "[8192, 5120]") =>
        new(op, shape, "bf16", 10, 9, 25, 1e8, 0, 1000, 0, percent, "memory");

    [Fact]
    public void TheGate_FailsAKernelMoreThanFivePercentBelowItsBaseline_Only()
    {
        IReadOnlyList<KernelTiming> baseline = [T("rmsnorm_forward", 80), T("softmax_forward", 50), T("adamw_update", 60)];
        IReadOnlyList<KernelTiming> now = [T("rmsnorm_forward", 75.9), T("softmax_forward", 47.6), T("adamw_update", 90), T("swiglu_forward", 40)];
        var (regressions, fresh) = KernelBaseline.Compare(now, baseline);
        var r = Assert.Single(regressions);                     // 80 -> 75.9 is 5.1% lower; 50 -> 47.6 is 4.8%
        Assert.Equal("rmsnorm_forward", r.Op);
        Assert.Equal(["swiglu_forward [8192, 5120]"], fresh);
        Assert.Empty(KernelBaseline.Compare([T("rmsnorm_forward", 75.9, "[8192, 4096]")], baseline).Regressions);   // another shape is another kernel
    }

    [Fact]
    public void TheGate_ReadsTheBenchmarksJson_AndRefusesAnotherGpusBaseline()
    {
        var dir = Directory.CreateTempSubdirectory("r1v2-baseline-").FullName;
        try
        {
            var path = Path.Combine(dir, "h200.json");
            File.WriteAllText(path, System.Text.Json.JsonSerializer.Serialize(new { device = new { Name = "NVIDIA H200" }, timings = new[] { T("rmsnorm_forward", 80) } }));
            Assert.Equal(1, BenchCommand.Gate([T("rmsnorm_forward", 70)], "NVIDIA H200", path));
            Assert.Equal(0, BenchCommand.Gate([T("rmsnorm_forward", 79)], "NVIDIA H200", path));
            Assert.Contains("measured on NVIDIA H200, this GPU is NVIDIA H100", Assert.Throws<InvalidDataException>(() => BenchCommand.Gate([], "NVIDIA H100", path)).Message);
            File.WriteAllText(path, "{ broken");
            Assert.Contains(path, Assert.Throws<InvalidDataException>(() => KernelBaseline.Read(path)).Message);
            Assert.Equal(Path.Combine("perf", "baselines", "nvidia-h200.json"), KernelBaseline.PathFor("NVIDIA H200"));
        }
        finally { Directory.Delete(dir, true); }
    }
}
