using System.CommandLine;
using R1V2.Native.Engine.Backends.Cuda;
using R1V2.Native.Engine.Kernels;
using R1V2.Native.Engine.Models;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>
/// `engine tune`: for each kernel family, every variant of its space compiled, checked against the CPU twin and timed
/// with CUDA events at the standard shapes or a model's; the winners go to the tuning cache, which every CUDA backend on
/// this GPU, driver and NVRTC then loads (<see cref="TuningCache"/>; R1V2_TUNING_SHAPES picks a model's bucket).
/// </summary>
public static class TuneCommand
{
    public static Command Create()
    {
        var ops = new Option<string?>("--ops") { Description = "Comma-separated kernel families (default: every family the tuner covers)" };
        var shapes = new Option<string>("--shapes") { Description = "standard, or model=CONFIG (a model config.json: its widths, bucket hidden-N)", DefaultValueFactory = _ => "standard" };
        var list = new Option<bool>("--list") { Description = "Print each family's variant space and default, and exit" };
        var cache = new Option<string?>("--cache") { Description = "Tuning cache directory (default: R1V2_TUNING_CACHE or ~/.cache/r1v2-native/tuning)" };
        var device = new Option<int>("--device") { Description = "CUDA device", DefaultValueFactory = _ => 0 };
        var cmd = new Command("tune", "Choose each kernel family's launch parameters on this GPU by benchmark (checked against the CPU twin first) and cache them")
            { ops, shapes, list, cache, device };
        cmd.SetAction(r => r.GetValue(list) ? List() : Run(r.GetValue(ops), r.GetValue(shapes)!, r.GetValue(cache), r.GetValue(device)));
        return cmd;
    }

    public static int List()
    {
        var table = new Table().AddColumns("family", "default", "variants (-D<FAMILY>_BLOCK=b, and -D<FAMILY>_KEPT=k as b x k)", "tuned by engine tune");
        foreach (var family in KernelTuning.DefaultBlocks.Keys.Order(StringComparer.Ordinal))
            table.AddRow(family, KernelTuning.DefaultVariant(family).ToString(), string.Join(", ", KernelTuning.Space(family)),
                CudaVariantRunner.Families.Contains(family) ? "yes" : "no (keeps its default)");
        AnsiConsole.Write(table);
        return 0;
    }

    /// <summary>The shapes and bucket of --shapes.</summary>
    public static (TuningShapes Shapes, string Bucket) ParseShapes(string text)
    {
        if (text == "standard") return (TuningShapes.Standard, TuningKey.StandardShapes);
        if (!text.StartsWith("model=", StringComparison.Ordinal) || text.Length == 6)
            throw new ArgumentException($"--shapes must be standard or model=CONFIG, not '{text}'");
        var c = VlmConfig.Load(text[6..]);
        return (new TuningShapes(8192, c.Llm.HiddenSize, c.Llm.IntermediateSize, Math.Min(c.Llm.VocabSize, 32768)), TuningKey.BucketOf(c.Llm.HiddenSize));
    }

    public static int Run(string? ops, string shapesText, string? cacheDir, int device)
    {
        var (shapes, bucket) = ParseShapes(shapesText);
        var families = ops is null ? [.. CudaVariantRunner.Families.Order(StringComparer.Ordinal)]
            : ops.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
        foreach (var f in families)
            if (!CudaVariantRunner.Families.Contains(f))
                throw new ArgumentException($"--ops: '{f}' is not a family engine tune covers ({string.Join(", ", CudaVariantRunner.Families.Order(StringComparer.Ordinal))})");
        if (!CudaBackend.IsAvailable(out var why))
        {
            AnsiConsole.MarkupLineInterpolated($"no CUDA device here ({why}): nothing to tune; every backend keeps the default launch parameters (engine tune --list shows them)");
            return 0;
        }
        var runner = new CudaVariantRunner(device, shapes);
        var choices = new List<FamilyChoice>();
        var table = new Table().AddColumns("family", "chosen", "ms", "default", "default ms", "variants set aside");
        foreach (var family in families)
        {
            var choice = KernelTuner.Tune(family, runner);
            choices.Add(choice);
            var byDefault = choice.Tried.FirstOrDefault(t => t.Variant == KernelTuning.DefaultVariant(family));
            table.AddRow(family, choice.Variant.ToString(), choice.Milliseconds?.ToString("F4") ?? "-", KernelTuning.DefaultVariant(family).ToString(),
                byDefault?.Milliseconds?.ToString("F4") ?? "-", string.Join("; ", choice.Tried.Where(t => t.Rejected is not null).Select(t => Markup.Escape($"{t.Variant}: {t.Rejected}"))));
        }
        using (var probe = new CudaBackend(device))
        {
            var key = CudaBackend.TuningKeyOf(probe.Device, bucket);
            var path = new TuningCache(cacheDir).Save(key, choices);
            AnsiConsole.MarkupLineInterpolated($"{probe.Device.Name}, shapes {bucket} (rows {shapes.Rows}, hidden {shapes.Hidden}, MLP {shapes.Intermediate}, vocabulary {shapes.Vocabulary})");
            AnsiConsole.Write(table);
            AnsiConsole.MarkupLineInterpolated($"wrote {path}{(bucket == TuningKey.StandardShapes ? "" : $" (backends load it with R1V2_TUNING_SHAPES={bucket})")}");
        }
        return 0;
    }
}
