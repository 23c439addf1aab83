using System.Diagnostics;
using R1V2.Native.Cli.Commands;

namespace R1V2.Native.Tests.Cli;

/// <summary>
/// Preemption and crashes with real signals to a child `engine train`: SIGTERM and SIGINT checkpoint at the next step
/// and exit 0, a second signal ends the process at once, and SIGKILL at random moments followed by restarts ends
/// bit-identical to an uninterrupted run with no temporary directory left.
/// </summary>
public sealed class SignalTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-signals-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private static string Engine => Path.Combine(AppContext.BaseDirectory, OperatingSystem.IsWindows() ? "engine.exe" : "engine");

    private string[] Args(string output, int steps, int every, params string[] extra)
    {
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 2);
        return ["train", "--config", Path.Combine(AppContext.BaseDirectory, "configs", "grpo-tiny.yaml"), "--set", $"model={ckpt}",
            "--set", $"data.path={Path.Combine(AppContext.BaseDirectory, "configs", "data", "arithmetic.jsonl")}", "--set", $"steps={steps}",
            "--set", "grpo.max_new_tokens=6", "--set", $"checkpoint.every={every}", "--set", "checkpoint.keep=2", "--backend", "cpu", "--out", output, .. extra];
    }

    private static Process Start(string[] args)
    {
        var info = new ProcessStartInfo(Engine, args) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        info.Environment["R1V2_TRACE"] = "0";
        return Process.Start(info)!;
    }

    private static void Signal(Process p, string signal)
    {
        using var kill = Process.Start("kill", [$"-{signal}", p.Id.ToString()])!;
        kill.WaitForExit();
    }

    private static int Lines(string path) => File.Exists(path) ? File.ReadAllLines(path).Count(l => l.Trim().Length > 0) : 0;

    /// <summary>Waits until the run's metrics have at least <paramref name="lines"/> lines (or the process ended).</summary>
    private static async Task WaitForSteps(Process p, string output, int lines)
    {
        var clock = Stopwatch.StartNew();
        while (!p.HasExited && Lines(Path.Combine(output, "metrics.jsonl")) < lines && clock.Elapsed < TimeSpan.FromSeconds(120)) await Task.Delay(50);
    }

    private static string Strip(string line)
    {
        var o = System.Text.Json.Nodes.JsonNode.Parse(line)!.AsObject();
        o.Remove("Seconds");
        o.Remove("TokensPerSecond");
        return o.ToJsonString();
    }

    private static string[] Metrics(string output) => File.ReadAllLines(Path.Combine(output, "metrics.jsonl")).Where(l => l.Trim().Length > 0).Select(Strip).ToArray();

    [SkippableTheory]
    [InlineData("TERM")]
    [InlineData("INT")]
    public async Task ASignal_CheckpointsAtTheNextStep_AndExitsZero_ThenTheRunResumes(string signal)
    {
        Skip.IfNot(OperatingSystem.IsLinux() || OperatingSystem.IsMacOS(), "POSIX signals");
        var output = Path.Combine(_dir, signal);
        using (var p = Start(Args(output, 400, 1000)))
        {
            await WaitForSteps(p, output, 2);
            Assert.False(p.HasExited, "the run ended before the signal");
            Signal(p, signal);
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            await p.WaitForExitAsync();
            Assert.Equal(0, p.ExitCode);
            Assert.Contains($"SIG{signal}: stopping after the current step", await stderr);
            Assert.Contains($"stopped by SIG{signal}: checkpoint written at step", (await stdout).Replace("\n", " "));
        }
        int stopped = Lines(Path.Combine(output, "metrics.jsonl"));
        Assert.InRange(stopped, 2, 399);
        Assert.EndsWith($"step-{stopped:D6}", R1V2.Native.Trainer.RunCheckpoints.Latest(output));
        // The same command continues from that checkpoint (here to 2 more steps than were done).
        string[] more = Args(output, stopped + 2, 1000);
        using (var p = Start(more))
        {
            await p.WaitForExitAsync();
            Assert.Equal(0, p.ExitCode);
        }
        Assert.Equal(stopped + 2, Lines(Path.Combine(output, "metrics.jsonl")));
    }

    [SkippableTheory]
    [InlineData("TERM")]
    [InlineData("INT")]
    public async Task ASignal_StopsEngineServe_AndItExitsZero(string signal)
    {
        Skip.IfNot(OperatingSystem.IsLinux() || OperatingSystem.IsMacOS(), "POSIX signals");
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 2);
        using var p = Start(["serve", "--model", ckpt, "--port", "0", "--backend", "cpu"]);
        var listening = new TaskCompletionSource<string>();
        var log = new System.Text.StringBuilder();
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null) return;
            lock (log) log.AppendLine(e.Data);
            var m = System.Text.RegularExpressions.Regex.Match(e.Data, @"at (http://[^ ]+)/v1");
            if (m.Success) listening.TrySetResult(m.Groups[1].Value);
        };
        p.BeginOutputReadLine();
        Assert.True(await Task.WhenAny(listening.Task, Task.Delay(TimeSpan.FromSeconds(60))) == listening.Task, "the server did not start");
        using (var http = new HttpClient { BaseAddress = new Uri(listening.Task.Result) })
        {
            var reply = await http.PostAsync("/v1/completions", new StringContent("{\"model\": \"tiny\", \"prompt\": \"hi\", \"max_tokens\": 2}"));
            Assert.Equal(System.Net.HttpStatusCode.OK, reply.StatusCode);
        }
        Signal(p, signal);
        var exited = p.WaitForExitAsync();
        Assert.True(await Task.WhenAny(exited, Task.Delay(TimeSpan.FromSeconds(30))) == exited, "the server did not stop");
        Assert.Equal(0, p.ExitCode);
        lock (log)
        {
            Assert.Contains("POST /v1/completions 200", log.ToString());   // the access log
            Assert.Contains("server stopped", log.ToString());
        }
    }

    [SkippableFact]
    public async Task ASecondSignal_EndsTheProcessAtOnce()
    {
        Skip.IfNot(OperatingSystem.IsLinux(), "POSIX signals");
        var output = Path.Combine(_dir, "twice");
        // Long steps (64 prompts x 4 samples of up to 128 tokens, a few seconds each), so that the run is still in its step
        // when the second signal comes (with shorter ones it could finish the step and exit 0 in between).
        using var p = Start(Args(output, 400, 1000, "--set", "grpo.prompts_per_step=64", "--set", "grpo.max_new_tokens=128"));
        var acknowledged = new TaskCompletionSource();
        p.ErrorDataReceived += (_, e) => { if (e.Data?.Contains("SIGTERM: stopping") == true) acknowledged.TrySetResult(); };
        p.BeginErrorReadLine();
        await WaitForSteps(p, output, 1);
        Signal(p, "TERM");
        // Two signals sent at once may arrive as one (POSIX does not queue them): the second goes after the first is seen.
        Assert.True(await Task.WhenAny(acknowledged.Task, Task.Delay(TimeSpan.FromSeconds(30))) == acknowledged.Task, "the first SIGTERM was not acknowledged");
        Signal(p, "TERM");
        var exited = p.WaitForExitAsync();
        Assert.True(await Task.WhenAny(exited, Task.Delay(TimeSpan.FromSeconds(30))) == exited, "a second SIGTERM should end the run at once");
        Assert.NotEqual(0, p.ExitCode);
    }

    [SkippableFact]
    public async Task SigkillAtRandomMoments_ThenRestarts_EndBitIdenticalToAnUninterruptedRun()
    {
        Skip.IfNot(OperatingSystem.IsLinux(), "POSIX signals");
        const int steps = 30;
        var straight = Path.Combine(_dir, "straight");
        using (var p = Start(Args(straight, steps, 1)))
        {
            await p.WaitForExitAsync();
            Assert.Equal(0, p.ExitCode);
        }
        var killed = Path.Combine(_dir, "killed");
        var rng = new Random(7);
        int kills = 0;
        for (int attempt = 0; ; attempt++)
        {
            using var p = Start(Args(killed, steps, 1));
            // Four kills at random moments (start-up, mid-step, mid-checkpoint), then a run left to finish.
            var exited = p.WaitForExitAsync();
            if (attempt < 4 && await Task.WhenAny(exited, Task.Delay(rng.Next(400, 1500))) != exited)
            {
                p.Kill();
                await p.WaitForExitAsync();
                kills++;
                continue;
            }
            await exited;
            var error = await p.StandardError.ReadToEndAsync();
            Assert.True(p.ExitCode == 0, $"restart {attempt} after {kills} kills exited {p.ExitCode}: {error}");
            break;
        }
        Assert.True(kills >= 3, $"only {kills} kills landed");
        Assert.Equal(Metrics(straight), Metrics(killed));
        Assert.Equal(File.ReadAllBytes(Path.Combine(R1V2.Native.Trainer.RunCheckpoints.Latest(straight)!, "model.safetensors")),
            File.ReadAllBytes(Path.Combine(R1V2.Native.Trainer.RunCheckpoints.Latest(killed)!, "model.safetensors")));
        Assert.Empty(Directory.GetDirectories(Path.Combine(killed, "checkpoints"), "*.tmp-*"));
    }
}
