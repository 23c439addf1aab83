using System.CommandLine;
using R1V2.Native.Cli.Commands;

namespace R1V2.Native.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        // Numbers in output and files read the same everywhere (ICU stays on: the tokenizer needs Unicode NFC).
        System.Globalization.CultureInfo.DefaultThreadCurrentCulture = System.Globalization.CultureInfo.InvariantCulture;
        System.Globalization.CultureInfo.CurrentCulture = System.Globalization.CultureInfo.InvariantCulture;
        // Logs and CI capture output through a pipe: give tables room instead of wrapping them at 80 columns.
        if (Console.IsOutputRedirected) Spectre.Console.AnsiConsole.Profile.Width = 200;
        var root = new RootCommand("R1V2.Native: trains and runs multimodal reasoning models (hybrid RL on a vision-language model).")
        {
            KernelsCommand.Create(),
            BenchCommand.Create(),
            InfoCommand.Create(),
            TrainCommand.Create(),
            InitCommand.Create(),
            ScoreCommand.Create(),
            TokenizeCommand.Create(),
            GenerateCommand.CreateGenerate(),
            GenerateCommand.CreateChat(),
            ReportCommand.Create(),
            SamplingCommands.CreateBuildPairs(),
            SamplingCommands.CreatePrefilter(),
            DigitsCommand.Create(),
            EvalCommand.Create(),
            ExportCommand.Create(),
            SelftestCommand.Create(),
            PlanCommand.Create(),
            TuneCommand.Create(),
            ServeCommand.Create(),
        };
        try
        {
            return root.Parse(args).Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception e)
        {
            return Report(e, Console.Error, Environment.GetEnvironmentVariable("R1V2_TRACE") == "1");
        }
    }

    /// <summary>Prefixes every line with "rank R: ".</summary>
    private sealed class RankPrefixedWriter(TextWriter inner, int rank) : TextWriter
    {
        public override System.Text.Encoding Encoding => inner.Encoding;
        public override void Write(char value) => inner.Write(value);
        public override void WriteLine(string? value)
        {
            foreach (var line in (value ?? "").Split('\n')) inner.WriteLine($"rank {rank}: {line}");
            inner.Flush();
        }
    }

    /// <summary>
    /// The one place an exception ends a command: a problem with the user's input (<see cref="IsInputError"/>) prints
    /// <c>error: message</c> and exits 1; an interrupted run exits 130; anything else prints <c>internal error: message</c>
    /// and exits 2. No exception leaves the process; with <paramref name="trace"/> the stack trace follows the message.
    /// </summary>
    public static int Report(Exception e, TextWriter error, bool trace)
    {
        // Under mpirun each line names its rank, and a rank that fails ends the whole job (the others would wait forever).
        var group = Engine.Backends.Launch.Current;
        if (group.WorldSize > 1) error = new RankPrefixedWriter(error, group.Rank);
        int code = Classify(e, error, trace);
        if (group.WorldSize > 1 && code != 130) group.Abort($"ending the job after the error above (exit {code})");
        return code;
    }

    private static int Classify(Exception e, TextWriter error, bool trace)
    {
        e = Unwrap(e);
        int code;
        if (e is OperationCanceledException)
        {
            error.WriteLine($"interrupted: {e.Message}");
            code = 130;
        }
        else if (IsInputError(e))
        {
            error.WriteLine($"error: {e.Message}");
            code = 1;
        }
        else
        {
            error.WriteLine($"internal error: {e.GetType().Name}: {e.Message}{(trace ? "" : " (R1V2_TRACE=1 shows the trace)")}");
            code = 2;
        }
        if (trace) error.WriteLine(e.ToString());
        return code;
    }

    /// <summary>The exception behind a wrapper that only carries one (a task's, a reflective call's).</summary>
    private static Exception Unwrap(Exception e)
    {
        while (true)
        {
            switch (e)
            {
                case AggregateException { InnerExceptions.Count: 1 } a: e = a.InnerExceptions[0]; continue;
                case System.Reflection.TargetInvocationException { InnerException: { } inner }: e = inner; continue;
                case TypeInitializationException { InnerException: { } init }: e = init; continue;
                default: return e;
            }
        }
    }

    /// <summary>
    /// Exceptions that report a problem with what the user gave or the machine it runs on: the engine's
    /// <see cref="Engine.InputException"/> family, a missing or malformed file, a bad setting or argument, a file that
    /// cannot be read or written (a full disk, a permission).
    /// </summary>
    public static bool IsInputError(Exception e) =>
        e is Engine.InputException or InvalidDataException or FileNotFoundException or DirectoryNotFoundException or ArgumentException or FormatException
            or IOException or UnauthorizedAccessException or System.Text.Json.JsonException or YamlDotNet.Core.YamlException
            or InvalidOperationException { Source: "R1V2.Native.Trainer" or "R1V2.Native.Engine" or "engine" };
}
