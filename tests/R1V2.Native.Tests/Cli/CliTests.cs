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
}
