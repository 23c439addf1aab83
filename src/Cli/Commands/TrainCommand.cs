using System.CommandLine;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine train`: the training pipeline (SFT warm start, reward model, MPO, GRPO with the Selective Sample Buffer).</summary>
public static class TrainCommand
{
    public static Command Create()
    {
        var cmd = new Command("train", "Train a model (default task: the built-in visual-reasoning pipeline)");
        cmd.SetAction(_ =>
        {
            AnsiConsole.MarkupLine("[yellow]engine train is not available in this build yet.[/] The op library and backends it runs on are; see README.md.");
            return 3;
        });
        return cmd;
    }
}
