using R1V2.Native.Cli.Commands;
using R1V2.Native.Interop;

namespace R1V2.Native.Tests.Cli;

public sealed class CliTests
{
    [SkippableFact]
    public void KernelsCommand_CompilesEveryFamilyForBothArchs_AndExitsZero()
    {
        Skip.IfNot(NativeLibraries.Nvrtc.TryLoad(out var error), $"libnvrtc is not installed here ({error})");
        var cache = Path.Combine(Path.GetTempPath(), "r1v2-cli-" + Guid.NewGuid().ToString("N"));
        try
        {
            Assert.Equal(0, KernelsCommand.Run("sm_80, 90", cache));
            Assert.NotEmpty(Directory.GetFiles(cache));
        }
        finally { Directory.Delete(cache, recursive: true); }
    }

    [Fact]
    public void KernelsCommand_RejectsAnUnknownArch()
    {
        var e = Assert.Throws<ArgumentException>(() => KernelsCommand.Run("sm_80,hopper", null));
        Assert.Contains("'hopper' is not a GPU arch", e.Message);
    }

    [SkippableFact]
    public void BenchKernels_WithoutAGpu_SaysSoAndExitsZero_WritingNothing()
    {
        Skip.If(Gpu.Available, "a GPU is present: the benchmark would run");
        var dir = Path.Combine(Path.GetTempPath(), "r1v2-bench-" + Guid.NewGuid().ToString("N"));
        Assert.Equal(0, BenchCommand.RunKernels(dir, 20));
        Assert.False(Directory.Exists(dir));
    }

    [Theory]
    [InlineData("sft")]
    [InlineData("rm")]
    public void BenchModel_OfAStage_PrintsItsFigures_WritesJson_AndExitsZero(string stage)
    {
        var dir = Path.Combine(Path.GetTempPath(), "r1v2-bench-model-" + Guid.NewGuid().ToString("N"));
        try
        {
            Assert.Equal(0, BenchCommand.RunModel(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), 1, 48, 1, 1, "adapter", "cpu", dir,
                stage: Enum.Parse<R1V2.Native.Trainer.Bench.BenchStage>(stage, ignoreCase: true), checkpointLayers: true));
            var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Assert.Single(Directory.GetFiles(dir, $"model-{stage}-tiny-*.json"))))!;
            Assert.Equal(stage, json["Stage"]!.GetValue<string>());
            Assert.True(json["LossPeakBytes"]!.GetValue<long>() > 0);
            Assert.Equal(0, BenchCommand.RunMemory(Path.Combine(AppContext.BaseDirectory, "configs", "r1v2-38b.json"), "8192,16384", 7, 0.5, "bf16", true));
        }
        finally { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void KernelTable_ShowsBracketedShapesAsText()
    {
        var timing = new R1V2.Native.Engine.Backends.Cuda.KernelTiming("rmsnorm_forward", "[4096, 1024]", "bf16", 12.5, 12.0, 25,
            16e6, 0, 1280, 0, 26.6, "memory");
        var writer = new StringWriter();
        var console = Spectre.Console.AnsiConsole.Create(new Spectre.Console.AnsiConsoleSettings
        {
            Ansi = Spectre.Console.AnsiSupport.No, Out = new Spectre.Console.AnsiConsoleOutput(writer),
        });
        console.Profile.Width = 200;
        console.Write(BenchCommand.KernelTable([timing]));
        var text = writer.ToString();
        Assert.Contains("[4096, 1024]", text);
        Assert.Contains("rmsnorm_forward", text);
        Assert.Contains("26.6", text);
    }
}
