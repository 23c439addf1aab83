using System.Diagnostics;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Checkpoints that survive the machine: manifests, falling back past a damaged checkpoint, stale temporaries, a full disk.</summary>
[Collection("cpu")]
public sealed class CheckpointDurabilityTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-durable-").FullName;
    private readonly List<string> _warnings = [];

    public void Dispose()
    {
        RunCheckpoints.Warn = message => Console.Error.WriteLine($"warning: {message}");
        Directory.Delete(_dir, true);
    }

    private string Run(string name) => Path.Combine(_dir, name);

    private void Capture() => RunCheckpoints.Warn = _warnings.Add;

    private static void Write(string run, int step) => RunCheckpoints.Save(run, step, keep: 3, tmp =>
    {
        File.WriteAllText(Path.Combine(tmp, "trainer_state.json"), $"{{\"step\": {step}}}");
        File.WriteAllBytes(Path.Combine(tmp, "model.safetensors"), Enumerable.Range(0, 4096).Select(i => (byte)(i * step)).ToArray());
    });

    [Theory]
    [InlineData("truncated")]
    [InlineData("bit-flip")]
    [InlineData("missing")]
    [InlineData("manifest")]
    public void ADamagedNewestCheckpoint_FallsBackToThePreviousOne_WithAWarning(string damage)
    {
        Capture();
        var run = Run(damage);
        Write(run, 1);
        Write(run, 2);
        var newest = RunCheckpoints.Latest(run)!;
        Assert.EndsWith("step-000002", newest);
        Assert.True(File.Exists(Path.Combine(newest, RunCheckpoints.ManifestName)));
        var weights = Path.Combine(newest, "model.safetensors");
        switch (damage)
        {
            case "truncated": File.WriteAllBytes(weights, File.ReadAllBytes(weights)[..1000]); break;
            case "bit-flip":
                var bytes = File.ReadAllBytes(weights);
                bytes[777] ^= 0x10;
                File.WriteAllBytes(weights, bytes);
                break;
            case "missing": File.Delete(weights); break;
            default: File.WriteAllText(Path.Combine(newest, RunCheckpoints.ManifestName), "{\"files\": [tru"); break;
        }
        Assert.EndsWith("step-000001", RunCheckpoints.Latest(run));
        var warning = Assert.Single(_warnings);
        Assert.Contains($"checkpoint {newest} is damaged (", warning);
        Assert.Contains(damage switch { "truncated" => "model.safetensors has 1000 bytes", "bit-flip" => "does not match its SHA-256", "missing" => "model.safetensors is missing", _ => "unreadable" }, warning);
    }

    [Fact]
    public void LeftoverTemporaries_OfAKilledWrite_AreRemovedOnStart_AndOnlyThose()
    {
        Capture();
        var run = Run("stale");
        Write(run, 1);
        var stale = Path.Combine(run, "checkpoints", "step-000002.tmp-0a1b2c3d");
        Directory.CreateDirectory(stale);
        File.WriteAllText(Path.Combine(stale, "model.safetensors"), "half");
        var staleFinal = Path.Combine(run, "final.tmp-deadbeef");
        Directory.CreateDirectory(staleFinal);
        var mine = Path.Combine(run, "checkpoints", "notes");           // not a temporary of the run: kept
        Directory.CreateDirectory(mine);
        Assert.EndsWith("step-000001", RunCheckpoints.Latest(run));
        Assert.False(Directory.Exists(stale));
        Assert.False(Directory.Exists(staleFinal));
        Assert.True(Directory.Exists(mine));
        Assert.Equal(2, _warnings.Count);
    }

    /// <summary>The trainer tests' tiny GRPO run, checkpointed every step, the last 3 kept.</summary>
    private TrainConfig Config(string output, int steps)
    {
        var config = GrpoTestRuns.Config(_dir, output, steps);
        config.Checkpoint.Every = 1;
        config.Checkpoint.Keep = 3;
        return config;
    }

    private static RewardBreakdown Letters(string text, PromptRow p) => GrpoTestRuns.Letters(text, p);

    [Fact]
    public void ATrainerResumingPastADamagedCheckpoint_EndsBitIdenticalToAnUninterruptedRun()
    {
        Capture();
        var straight = Run("straight");
        using (var t = new GrpoTrainer(Config(straight, 4), fx.Backend, Letters)) t.Run();
        var damaged = Run("damaged");
        using (var t = new GrpoTrainer(Config(damaged, 3), fx.Backend, Letters)) t.Run();
        var newest = RunCheckpoints.Latest(damaged)!;
        File.Delete(Path.Combine(newest, "optimizer.safetensors"));
        using (var t = new GrpoTrainer(Config(damaged, 4), fx.Backend, Letters))
        {
            Assert.Equal(2, t.Step);                                      // step 3's checkpoint is damaged: resumed from step 2
            t.Run();
        }
        Assert.Contains(_warnings, w => w.Contains("optimizer.safetensors is missing"));
        Assert.Equal(File.ReadAllLines(Path.Combine(straight, "metrics.jsonl")).Select(Strip), File.ReadAllLines(Path.Combine(damaged, "metrics.jsonl")).Select(Strip));
        Assert.Equal(File.ReadAllBytes(Path.Combine(RunCheckpoints.Latest(straight)!, "model.safetensors")),
            File.ReadAllBytes(Path.Combine(RunCheckpoints.Latest(damaged)!, "model.safetensors")));
    }

    /// <summary>A metrics line without its timing fields (wall time differs between runs).</summary>
    private static string Strip(string line)
    {
        var o = System.Text.Json.Nodes.JsonNode.Parse(line)!.AsObject();
        o.Remove("Seconds");
        o.Remove("TokensPerSecond");
        return o.ToJsonString();
    }

    [SkippableFact]
    public void AFullDisk_EndsTheSaveWithAClearError_AndKeepsThePreviousCheckpoint()
    {
        Skip.IfNot(OperatingSystem.IsLinux() && Environment.UserName == "root", "mounting a small tmpfs needs root on Linux");
        var mount = Run("small-disk");
        Directory.CreateDirectory(mount);
        int mounted;
        try
        {
            using var p = Process.Start(new ProcessStartInfo("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", mount]) { RedirectStandardError = true })!;
            p.WaitForExit();
            mounted = p.ExitCode;
        }
        catch (System.ComponentModel.Win32Exception) { mounted = -1; }
        Skip.If(mounted != 0, $"mount -t tmpfs failed here (exit {mounted}): no mount command or privilege");
        try
        {
            RunCheckpoints.Save(mount, 1, keep: 2, tmp => File.WriteAllBytes(Path.Combine(tmp, "model.safetensors"), new byte[16 << 10]));
            var e = Assert.Throws<IOException>(() => RunCheckpoints.Save(mount, 2, keep: 2, tmp => File.WriteAllBytes(Path.Combine(tmp, "model.safetensors"), new byte[256 << 10])));
            var error = new StringWriter();
            Assert.Equal(1, R1V2.Native.Cli.Program.Report(e, error, trace: false));   // reported as `error: ...`, exit 1
            Assert.StartsWith("error: ", error.ToString());
            Assert.EndsWith("step-000001", RunCheckpoints.Latest(mount));            // the previous checkpoint, intact
            Assert.Empty(Directory.GetDirectories(Path.Combine(mount, "checkpoints"), "*.tmp-*"));
        }
        finally
        {
            using var u = Process.Start("umount", [mount]);
            u.WaitForExit();
        }
    }
}
