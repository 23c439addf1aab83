using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Kernels;

namespace R1V2.Native.Tests.Kernels;

/// <summary>`engine tune` without a GPU: the search with a fake device, the cache's keys, merging, fallback and bad files.</summary>
public sealed class KernelTunerTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-tuning-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    /// <summary>
    /// A device whose variants take the given times by block (keeping fewer values a thread costs 1 us per value short
    /// of 32); the listed blocks compute something other than the CPU twin.
    /// </summary>
    private sealed class FakeDevice(Dictionary<int, double> times, params int[] wrong) : IVariantRunner
    {
        public List<KernelVariant> Timed { get; } = [];
        public string? Check(string family, KernelVariant v) => wrong.Contains(v.Block) ? $"element 3 is 0.5, the CPU twin's 0.25" : null;

        public double Time(string family, KernelVariant v)
        {
            Timed.Add(v);
            return times[v.Block] + (v.Kept == 0 ? 0 : (32 - v.Kept) * 1e-3);
        }
    }

    [Fact]
    public void TheFastestCheckedVariant_Wins_AndOneThatComputesSomethingElseNeverDoes()
    {
        var device = new FakeDevice(new() { [64] = 3.0, [128] = 2.0, [256] = 1.5, [512] = 0.4, [1024] = 2.5 }, wrong: 512);
        var choice = KernelTuner.Tune("rmsnorm", device);
        Assert.Equal(new KernelVariant(256, 32), choice.Variant);         // 512 is faster but wrong
        Assert.Equal(1.5, choice.Milliseconds);
        Assert.DoesNotContain(device.Timed, v => v.Block == 512);          // checked before it is timed
        Assert.Contains(choice.Tried, t => t.Variant.Block == 512 && t.Rejected!.Contains("CPU twin"));
        Assert.Equal(KernelTuning.Space("rmsnorm"), choice.Tried.Select(t => t.Variant));
        Assert.Equal(15, choice.Tried.Count);                              // 5 block sizes x 3 kept counts
    }

    [Fact]
    public void AFamilyWhoseEveryVariantFails_KeepsItsDefault()
    {
        var choice = KernelTuner.Tune("softmax", new FakeDevice([], 64, 128, 256, 512, 1024));
        Assert.Equal(KernelTuning.DefaultVariant("softmax"), choice.Variant);
        Assert.Null(choice.Milliseconds);
        Assert.All(choice.Tried, t => Assert.NotNull(t.Rejected));
    }

    [Fact]
    public void AVariantThatThrows_IsSetAsideWithItsMessage()
    {
        var choice = KernelTuner.Tune("gelu", new Throwing());
        Assert.All(choice.Tried.Where(t => t.Variant.Block == 1024), t => Assert.Contains("too many resources", t.Rejected));
        Assert.Equal(new KernelVariant(64), choice.Variant);
    }

    private sealed class Throwing : IVariantRunner
    {
        public string? Check(string family, KernelVariant v) => v.Block == 1024 ? throw new InvalidOperationException("launch failed: too many resources requested") : null;
        public double Time(string family, KernelVariant v) => v.Block;
    }

    private static TuningKey Key(string gpu = "NVIDIA H200", string cc = "90", int driver = 12040, string nvrtc = "12.4", string bucket = TuningKey.StandardShapes) =>
        new(gpu, cc, driver, nvrtc, bucket);

    [Fact]
    public void TheCache_ReturnsTheChoices_ForTheSameKeyOnly_AndMergesLaterRuns()
    {
        var cache = new TuningCache(_dir);
        cache.Save(Key(), [new FamilyChoice("rmsnorm", new KernelVariant(512, 16), 0.2, []), new FamilyChoice("softmax", 1024, 0.3, [])]);
        cache.Save(Key(), [new FamilyChoice("gelu", 128, 0.1, [])]);                       // a later run of other families
        var tuning = cache.Load(Key());
        Assert.Equal((512, 1024, 128), (tuning.Block("rmsnorm"), tuning.Block("softmax"), tuning.Block("gelu")));
        Assert.Equal(KernelTuning.DefaultBlocks["adamw"], tuning.Block("adamw"));
        Assert.Equal(["-DRMSNORM_BLOCK=512", "-DRMSNORM_KEPT=16"], tuning.Defines("rmsnorm"));
        Assert.Equal(["-DSOFTMAX_BLOCK=1024", "-DSOFTMAX_KEPT=32"], tuning.Defines("softmax")); // kept at its default
        Assert.Equal(["-DGELU_BLOCK=128"], tuning.Defines("gelu"));
        Assert.Contains("\"rmsnorm\": \"512x16\"", File.ReadAllText(cache.PathOf(Key())));
        // Another GPU, driver, compiler or shape bucket does not see it.
        foreach (var other in new[] { Key(gpu: "NVIDIA H100 80GB HBM3"), Key(driver: 12080), Key(nvrtc: "12.8"), Key(bucket: TuningKey.BucketOf(5120)), Key(cc: "80") })
        {
            Assert.NotEqual(Key().FileName, other.FileName);
            Assert.Same(KernelTuning.Default, cache.Load(other));
        }
    }

    [Theory]
    [InlineData("{ not json", "unreadable")]
    [InlineData("{\"blocks\": {\"rmsnorm\": \"big\"}}", "the variant of 'rmsnorm' is neither a block size")]
    [InlineData("{\"blocks\": {\"rmsnorm\": \"256x12\"}}", "rmsnorm keeps 8, 16, 32 values a thread, got 12")]
    [InlineData("{\"blocks\": {\"gelu\": \"256x16\"}}", "gelu has no kept-values parameter")]
    [InlineData("{\"blocks\": {\"flash_decoding\": 256}}", "unknown kernel family 'flash_decoding'")]
    [InlineData("{\"blocks\": {\"rmsnorm\": 100}}", "must be a multiple of 32")]
    [InlineData("{\"tried\": []}", "no \"blocks\" object")]
    public void ABadCacheFile_IsReported_AndTheDefaultsStand(string content, string problem)
    {
        var cache = new TuningCache(_dir);
        File.WriteAllText(cache.PathOf(Key()), content);
        var warnings = new List<string>();
        Assert.Same(KernelTuning.Default, cache.Load(Key(), warnings.Add));
        var w = Assert.Single(warnings);
        Assert.Contains(cache.PathOf(Key()), w);
        Assert.Contains(problem, w);
    }

    [Fact]
    public void EveryFamilysSpace_HoldsItsDefault_AndOnlyLaunchableBlocks()
    {
        foreach (var family in KernelTuning.DefaultBlocks.Keys)
        {
            var space = KernelTuning.Space(family);
            Assert.Contains(KernelTuning.DefaultVariant(family), space);
            Assert.All(space, v => Assert.True(v.Block % 32 == 0 && v.Block >= 32 && v.Block <= 1024, $"{family}: {v}"));
            foreach (var v in space) _ = new KernelTuning(new Dictionary<string, KernelVariant> { [family] = v });   // every one is a valid tuning
        }
    }

    [Fact]
    public void Shapes_ComeFromAModelConfig_WithItsBucket()
    {
        var (shapes, bucket) = TuneCommand.ParseShapes($"model={Path.Combine(AppContext.BaseDirectory, "configs", "r1v2-38b.json")}");
        Assert.Equal(("hidden-5120", 5120, 27648), (bucket, shapes.Hidden, shapes.Intermediate));
        Assert.Equal(TuningKey.StandardShapes, TuneCommand.ParseShapes("standard").Bucket);
        Assert.Contains("--shapes must be standard or model=CONFIG", Assert.Throws<ArgumentException>(() => TuneCommand.ParseShapes("big")).Message);
    }

    [SkippableFact]
    public void WithoutAGpu_TuneSaysSo_AndTheListNeedsNone()
    {
        Assert.Equal(0, R1V2.Native.Cli.Program.Main(["tune", "--list"]));
        Skip.If(R1V2.Native.Engine.Backends.Cuda.CudaBackend.IsAvailable(out _), "a CUDA device is here");
        Assert.Equal(0, R1V2.Native.Cli.Program.Main(["tune", "--cache", _dir]));
        Assert.Empty(Directory.GetFiles(_dir));
        Assert.Equal(1, R1V2.Native.Cli.Program.Main(["tune", "--ops", "flash_decoding"]));   // an unknown family: an error naming it
    }
}
