using System.Runtime.InteropServices;

namespace R1V2.Native.Cli;

/// <summary>
/// SIGINT (Ctrl-C) and SIGTERM (what Slurm and most schedulers send before SIGKILL) ask a training command to stop at
/// the next step boundary with a checkpoint; a second signal ends the process at once (the signal's default action).
/// </summary>
public sealed class StopSignals : IDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly PosixSignalRegistration[] _registrations;

    private readonly string _stopping;

    /// <param name="stopping">What the first signal does, as printed (default: a training command's step and checkpoint).</param>
    public StopSignals(string stopping = "stopping after the current step with a checkpoint")
    {
        _stopping = stopping;
        _registrations = [PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle), PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle)];
    }

    public CancellationToken Token => _stop.Token;
    public bool Requested => _stop.IsCancellationRequested;

    /// <summary>The signal that asked to stop ("SIGTERM" or "SIGINT"), or null.</summary>
    public string? Signal { get; private set; }

    private void Handle(PosixSignalContext context)
    {
        if (_stop.IsCancellationRequested)
        {
            context.Cancel = false;   // the second signal: its default action ends the process now
            return;
        }
        context.Cancel = true;
        Signal = context.Signal == PosixSignal.SIGTERM ? "SIGTERM" : "SIGINT";
        Console.Error.WriteLine($"{Signal}: {_stopping} (a second signal stops at once)");
        _stop.Cancel();
    }

    /// <summary>The line a stopped run ends with: where its checkpoint is and how to continue.</summary>
    public string StoppedLine(string where) => $"stopped by {Signal ?? "a signal"}: {where}; run the same command to resume";

    public void Dispose()
    {
        foreach (var r in _registrations) r.Dispose();
        _stop.Dispose();
    }
}
