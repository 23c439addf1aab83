using System.Text.RegularExpressions;
using R1V2.Native.Engine.Kernels;
using R1V2.Native.Interop;

namespace R1V2.Native.Tests.Kernels;

/// <summary>Every kernel family compiles with NVRTC for sm_80 and sm_90 (no GPU needed); the cache and error paths behave.</summary>
public sealed class KernelCompileTests : IDisposable
{
    private readonly string _cache = Path.Combine(Path.GetTempPath(), "r1v2-kernel-cache-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_cache)) Directory.Delete(_cache, recursive: true);
    }

    private static void RequireNvrtc()
    {
        Skip.IfNot(NativeLibraries.Nvrtc.TryLoad(out var error), $"libnvrtc is not installed here ({error}); .ci/run installs it");
    }

    /// <summary>extern "C" kernel names declared in a family's source, expanding the f32/bf16 instantiation macro.</summary>
    private static IEnumerable<string> DeclaredKernels(string source)
    {
        foreach (Match m in Regex.Matches(source, @"^INSTANTIATE_F32_BF16\((\w+),", RegexOptions.Multiline))
        {
            yield return m.Groups[1].Value + "_f32";
            yield return m.Groups[1].Value + "_bf16";
        }
        foreach (Match m in Regex.Matches(source, @"^extern ""C"" __global__ void (?:__launch_bounds__\(\w+\) )?(\w+)\(", RegexOptions.Multiline))
            yield return m.Groups[1].Value;
        foreach (Match m in Regex.Matches(source, @"^INSTANTIATE_MMA_FORWARD\((\d+)\)", RegexOptions.Multiline))
            yield return $"attention_mma_forward_d{m.Groups[1].Value}_bf16";
        foreach (Match m in Regex.Matches(source, @"^INSTANTIATE_FLASH\((\d+)\)", RegexOptions.Multiline))
        {
            yield return $"attention_flash_forward_d{m.Groups[1].Value}_bf16";
            yield return $"attention_flash_backward_d{m.Groups[1].Value}_bf16";
        }
        foreach (Match m in Regex.Matches(source, @"^INSTANTIATE_MMA_BACKWARD\((\d+)\)", RegexOptions.Multiline))
        {
            yield return $"attention_mma_backward_dq_d{m.Groups[1].Value}_bf16";
            yield return $"attention_mma_backward_dkdv_d{m.Groups[1].Value}_bf16";
        }
    }

    [SkippableTheory]
    [InlineData("sm_80")]
    [InlineData("sm_90")]
    public void EveryKernelFamily_CompilesToCubin_WithZeroWarnings_AndReportsEveryKernel(string arch)
    {
        RequireNvrtc();
        var compiler = new KernelCompiler(_cache);
        Assert.NotEmpty(KernelSources.Families);
        foreach (var (family, source) in KernelSources.Families)
        {
            var compiled = compiler.Compile(family, arch); // throws on any error or warning
            Assert.Empty(KernelCompiler.Warnings(compiled.Log));
            Assert.True(compiled.Image.Length > 4 && compiled.Image[0] == 0x7F && compiled.Image[1] == (byte)'E', $"{family}: not an ELF cubin");
            var reported = compiled.Kernels.Select(k => k.Kernel).ToHashSet();
            Assert.Equal(DeclaredKernels(source).Count(), reported.Count);
            foreach (var kernel in DeclaredKernels(source))
                Assert.True(reported.Contains(kernel), $"{family}: ptxas reported no resources for {kernel}");
            Assert.All(compiled.Kernels, k => Assert.InRange(k.Registers, 1, 255));
            Assert.All(compiled.Kernels, k => Assert.Equal(0, k.SpillStoreBytes + k.SpillLoadBytes));
        }
    }

    [Fact]
    public void EveryFamily_HasATuningEntry_AndEveryTuningEntryAFamily()
    {
        Assert.Equal(KernelSources.Families.Keys.Order(), KernelTuning.DefaultBlocks.Keys.Order());
    }

    [SkippableFact]
    public void SecondCompile_ComesFromTheCache_AndACorruptEntryIsRecompiled()
    {
        RequireNvrtc();
        var compiler = new KernelCompiler(_cache);
        var first = compiler.Compile("rmsnorm", "sm_80");
        Assert.False(first.FromCache);
        var second = compiler.Compile("rmsnorm", "sm_80");
        Assert.True(second.FromCache);
        Assert.Equal(first.Image, second.Image);
        Assert.Equal(first.Kernels, second.Kernels);

        var entry = Assert.Single(Directory.GetFiles(_cache));
        var bytes = File.ReadAllBytes(entry);
        bytes[bytes.Length / 2] ^= 0xFF;
        File.WriteAllBytes(entry, bytes);
        var third = compiler.Compile("rmsnorm", "sm_80");
        Assert.False(third.FromCache);
        Assert.Equal(first.Image, third.Image);

        File.WriteAllBytes(entry, bytes[..10]); // truncated
        Assert.False(compiler.Compile("rmsnorm", "sm_80").FromCache);
        Assert.True(compiler.Compile("rmsnorm", "sm_80").FromCache);
    }

    [SkippableFact]
    public void CacheKey_ChangesWithTuning()
    {
        RequireNvrtc();
        new KernelCompiler(_cache).Compile("softmax", "sm_80");
        var tuned = new KernelCompiler(_cache, new KernelTuning(new Dictionary<string, int> { ["softmax"] = 128 }));
        var compiled = tuned.Compile("softmax", "sm_80");
        Assert.False(compiled.FromCache);
        Assert.Contains("-DSOFTMAX_BLOCK=128", tuned.Options("softmax", "sm_80", true));
        Assert.Equal(2, Directory.GetFiles(_cache).Length);
    }

    [SkippableFact]
    public void InvalidKernelSource_GivesAnErrorCarryingTheNvrtcLogWithLine()
    {
        RequireNvrtc();
        const string source = "extern \"C\" __global__ void broken(float* x)\n{\n    x[0] = undefined_name;\n}\n";
        var e = Assert.Throws<NvrtcCompileException>(() => Nvrtc.Compile(source, "broken.cu", new Dictionary<string, string>(), ["-arch=sm_80"], cubin: true));
        Assert.Contains("broken.cu(3)", e.Message);
        Assert.Contains("undefined_name", e.Message);
        Assert.Equal(e.Log, e.Message[(e.Message.IndexOf('\n') + 1)..]);
    }

    [SkippableFact]
    public void NvrtcKnowsBothTargetArchs()
    {
        RequireNvrtc();
        var archs = Nvrtc.SupportedArchs();
        Assert.Contains(80, archs);
        Assert.Contains(90, archs);
        Assert.True(Nvrtc.Version() >= new Version(11, 2));
    }

    [Theory]
    [InlineData(90, "sm_90", true)]
    [InlineData(100, "sm_90", false)] // newer device than this NVRTC knows: PTX for the newest known arch, JIT by the driver
    [InlineData(86, "sm_86", true)]
    public void TargetFor_PicksCubinOrPtx(int cc, string arch, bool cubin)
    {
        Assert.Equal((arch, cubin), KernelCompiler.TargetFor(cc, [75, 80, 86, 89, 90]));
    }

    [Fact]
    public void TargetFor_OlderDeviceThanAnyKnownArch_IsAnError()
    {
        var e = Assert.Throws<InvalidOperationException>(() => KernelCompiler.TargetFor(61, [80, 90]));
        Assert.Contains("sm_61", e.Message);
    }

    [Fact]
    public void ParseReport_ReadsPtxasVerboseOutput()
    {
        const string log = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function 'k_bf16' for 'sm_90'
            ptxas info    : Function properties for k_bf16
            ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
            ptxas info    : Used 40 registers, 128 bytes smem
            ptxas info    : Compiling entry function 'k_f32' for 'sm_90'
            ptxas info    : Function properties for k_f32
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 12 registers
            ptxas info    : Compiling entry function 'k_new' for 'sm_90'
            ptxas info    : Function properties for k_new
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 32 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
            """;
        var r = KernelCompiler.ParseReport(log, "sm_90");
        Assert.Equal(new KernelResources("k_bf16", "sm_90", 40, 8, 4, 128, 16), r[0]);
        Assert.Equal(new KernelResources("k_f32", "sm_90", 12, 0, 0, 0, 0), r[1]);
        Assert.Equal(new KernelResources("k_new", "sm_90", 32, 0, 0, 4096, 0), r[2]); // ptxas 12.x and later add the barrier count
    }

    [Fact]
    public void NvrtcOwnCache_IsTurnedOff_FromVersion12_9_SoThePtxasReportIsAlwaysPrinted()
    {
        var compiler = new KernelCompiler(_cache);
        Assert.DoesNotContain("--no-cache", compiler.Options("softmax", "sm_90", true, new Version(11, 8)));
        Assert.DoesNotContain("--no-cache", compiler.Options("softmax", "sm_90", true, new Version(12, 8)));
        Assert.Contains("--no-cache", compiler.Options("softmax", "sm_90", true, new Version(12, 9)));
        Assert.Contains("--no-cache", compiler.Options("softmax", "sm_90", true, new Version(13, 0)));
    }
}
