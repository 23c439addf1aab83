using System.Diagnostics;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Tests.Parallel;

[CollectionDefinition("mpi", DisableParallelization = true)]
public sealed class MpiCollection;

/// <summary>
/// The engine under mpirun: every collective of `engine selftest collectives` on 4 ranks against the host computation.
/// Skips, saying so, where mpirun is missing, except in CI (CI=true), where that is a failure: .ci/run installs Open MPI.
/// </summary>
[Collection("mpi")]
public sealed class MpiTests
{
    private static string Engine => Path.Combine(AppContext.BaseDirectory, OperatingSystem.IsWindows() ? "engine.exe" : "engine");

    private static string? MpiRun()
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator))
            if (dir.Length > 0 && File.Exists(Path.Combine(dir, "mpirun"))) return Path.Combine(dir, "mpirun");
        return null;
    }

    private static string RequireMpiRun()
    {
        var mpirun = MpiRun();
        if (mpirun is null && Environment.GetEnvironmentVariable("CI") == "true") Assert.Fail("CI=true but mpirun is missing: .ci/run installs openmpi-bin");
        Skip.If(mpirun is null, "mpirun is not installed here (apt-get install openmpi-bin)");
        return mpirun!;
    }

    /// <summary>Runs <c>mpirun -np N engine ARGS</c> (as root too, oversubscribed, unbound) with a timeout; returns exit code and output.</summary>
    private static (int Code, string Output) Run(int ranks, params string[] args)
    {
        var info = new ProcessStartInfo(RequireMpiRun(), ["--oversubscribe", "--bind-to", "none", "-np", ranks.ToString(), Engine, .. args])
            { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
        info.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        using var p = Process.Start(info)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(180)))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"mpirun -np {ranks} engine {string.Join(' ', args)} did not end within 180 s");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    [SkippableFact]
    public void SelftestCollectives_OnFourRanks_MatchesTheHostComputation()
    {
        var (code, output) = Run(4, "selftest", "collectives", "--sizes", "1024,65536");
        Assert.True(code == 0, output);
        Assert.Contains("4 rank(s) (MpiCollectives)", output);
        Assert.Contains("all 9 collectives match the host computation on 4 rank(s)", output);
    }

    [SkippableFact]
    public void AFailingRank_EndsTheWholeJobWithItsMessage_NotAHang()
    {
        var (code, output) = Run(3, "selftest", "abort", "--rank", "1");
        Assert.NotEqual(0, code);
        Assert.Contains("a deliberate failure on rank 1", output);
        Assert.Matches("rank 1: [a-z ]*error: ", output);
        Assert.Contains("rank 1: ending the job after the error above", output);
    }

    [Fact]
    public void SelftestChecks_CatchACollectiveThatDoesNothing()
    {
        using var b = new CpuBackend();
        var checks = SelftestCommand.Checks(new Inert(), b);
        Assert.Contains(checks, k => k.Collective.StartsWith("all_reduce sum") && k.Problem is not null);
        Assert.Contains(checks, k => k.Collective == "all_gather" && k.Problem is not null);
        Assert.Contains(checks, k => k.Collective.StartsWith("broadcast") && k.Problem is not null);
    }

    [Fact]
    public void OneProcess_NeedsNoMpiLibrary()
    {
        Assert.Same(SingleProcessCollectives.Instance, Launch.Collectives());
        Assert.All(SelftestCommand.Checks(SingleProcessCollectives.Instance, new CpuBackend()), k => Assert.Null(k.Problem));
    }

    [SkippableFact]
    public void MpiLibrary_ExportsTheOpenMpiHandlesTheBindingReads()
    {
        Skip.IfNot(NativeLibraries.Mpi.TryLoad(out var error), $"no MPI library here ({error})");
        // Not initialised in this process (the test host forks children): the handles are exported objects of Open MPI.
        foreach (var name in new[] { "ompi_mpi_comm_world", "ompi_mpi_float", "ompi_mpi_double", "ompi_mpi_int", "ompi_mpi_byte", "ompi_mpi_op_sum", "ompi_mpi_op_max" })
            Assert.True(NativeLibraries.Mpi.HasExport(name), $"{name} is not exported");
    }

    [Fact]
    public void GlobalNorm_CountsReplicatedGradientsOnce_AndSumsShards()
    {
        using var b = new CpuBackend();
        using var g = b.FromArray([3f, 4f], DType.F32, [2]);
        var four = new Replicas(4);
        Assert.Equal(5.0, b.GlobalNorm([g]), 12);                    // replicated on 4 data-parallel ranks: once
        Assert.Equal(10.0, b.GlobalNorm([g], shardedOver: four), 12); // 4 distinct shards of 25 each
    }

    /// <summary>A group of <paramref name="n"/> ranks holding the same values: a sum is n times the local value.</summary>
    private sealed class Replicas(int n) : ICollectives
    {
        public int Rank => 0;
        public int WorldSize => n;
        public int LocalRank => 0;
        public void AllReduceSum(Span<double> values) { foreach (ref var v in values) v *= n; }
        public void AllReduceMax(Span<double> values) { }
        public void AllReduceSum(Tensor tensor) => throw new NotSupportedException();
        public void Broadcast(Span<byte> data, int root) { }
        public void AllGather(ReadOnlySpan<float> mine, Span<float> all) => throw new NotSupportedException();
        public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine) => throw new NotSupportedException();
        public void Barrier() { }
        public void Abort(string message) => throw new InvalidOperationException(message);
        public ICollectives Split(int color, int key) => this;
    }

    /// <summary>A group of 3 whose collectives do nothing: the self-test must notice.</summary>
    private sealed class Inert : ICollectives
    {
        public int Rank => 1;
        public int WorldSize => 3;
        public int LocalRank => 1;
        public void AllReduceSum(Span<double> values) { }
        public void AllReduceMax(Span<double> values) { }
        public void AllReduceSum(Tensor tensor) { }
        public void Broadcast(Span<byte> data, int root) { }
        public void AllGather(ReadOnlySpan<float> mine, Span<float> all) { }
        public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine) { }
        public void Barrier() { }
        public void Abort(string message) => throw new InvalidOperationException(message);
        public ICollectives Split(int color, int key) => this;
    }
}
