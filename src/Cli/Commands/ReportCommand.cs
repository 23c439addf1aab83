using System.CommandLine;
using R1V2.Native.Trainer;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine report RUN_DIR`: plots and a markdown summary from a run's metrics.jsonl.</summary>
public static class ReportCommand
{
    public static Command Create()
    {
        var run = new Argument<string>("run") { Description = "Run directory (holds metrics.jsonl)" };
        var cmd = new Command("report", "Write PNG plots (reward, accuracy, effective-sample ratio, length, policy ratio, hallucination) and summary.md for a run") { run };
        cmd.SetAction(r =>
        {
            foreach (var f in Report.Write(r.GetValue(run)!)) AnsiConsole.MarkupLineInterpolated($"wrote {f}");
            return 0;
        });
        return cmd;
    }
}
