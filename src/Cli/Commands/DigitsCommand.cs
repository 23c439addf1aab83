using System.CommandLine;
using R1V2.Native.Trainer.Tasks;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine digits`: writes a visual-question dataset of handwritten-digit scenes (the default task's data).</summary>
public static class DigitsCommand
{
    public static Command Create()
    {
        var output = new Option<string>("--out") { Description = "Output directory (images/ and prompts.jsonl)", Required = true };
        var split = new Option<string>("--split") { Description = "train | reinforcement | validation | held-out: which source digit images to draw (reinforcement images are only seen by GRPO; validation and held-out images are never used in training)", DefaultValueFactory = _ => "held-out" };
        var count = new Option<int>("--count") { Description = "Number of questions", DefaultValueFactory = _ => 200 };
        var seed = new Option<int>("--seed") { DefaultValueFactory = _ => 1 };
        var canvas = new Option<int>("--canvas") { Description = "Canvas side in pixels", DefaultValueFactory = _ => 64 };
        var maxDigits = new Option<int>("--max-digits") { Description = "At most this many digits per scene (1-4)", DefaultValueFactory = _ => 4 };
        var cmd = new Command("digits", "Write visual questions about 1-4 handwritten MNIST digits (sum, largest, count, presence, left to right) as PNGs + prompts.jsonl")
            { output, split, count, seed, canvas, maxDigits };
        cmd.SetAction(r => Run(r.GetValue(output)!, r.GetValue(split)!, r.GetValue(count), r.GetValue(seed), r.GetValue(canvas), r.GetValue(maxDigits)));
        return cmd;
    }

    public static int Run(string output, string split, int count, int seed, int canvas, int maxDigits = 4)
    {
        var s = DigitSplits.Parse(split);
        if (count < 1) throw new ArgumentException("--count must be positive");
        var items = new DigitScenes(MnistDigits.Embedded(), s, canvas, maxDigits).WriteDataset(output, count, seed);
        var byType = items.GroupBy(i => i.Type).OrderBy(g => g.Key).Select(g => $"{g.Key.Name()} {g.Count()}");
        AnsiConsole.MarkupLineInterpolated($"wrote {items.Count} questions ({string.Join(", ", byType)}) on {s.Name()} digit images to {Path.Combine(output, "prompts.jsonl")}");
        return 0;
    }
}
