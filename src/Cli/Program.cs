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
        };
        try
        {
            return root.Parse(args).Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception e) when (IsInputError(e) && Environment.GetEnvironmentVariable("R1V2_TRACE") != "1")
        {
            // Bad input (a file, a setting, an argument) is reported by its message alone; R1V2_TRACE=1 shows the trace.
            Console.Error.WriteLine($"error: {e.Message}");
            return 1;
        }
    }

    /// <summary>Exceptions that report a problem with what the user gave: a missing or malformed file, a bad setting or argument.</summary>
    private static bool IsInputError(Exception e) =>
        e is InvalidDataException or FileNotFoundException or DirectoryNotFoundException or ArgumentException or FormatException
            or InvalidOperationException { Source: "R1V2.Native.Trainer" or "R1V2.Native.Engine" or "engine" };
}
