using System.CommandLine;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Trainer;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine export --run DIR --out DIR [--dtype bf16|f32]`: a run's model as a whole HF checkpoint.</summary>
public static class ExportCommand
{
    public static Command Create()
    {
        var run = new Option<string>("--run")
            { Description = "A run directory (its newest intact checkpoint is exported) or a checkpoint directory (lean or full)", Required = true };
        var output = new Option<string>("--out") { Description = "Directory to write the HF checkpoint to", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "Stored precision: bf16 (the release format) or f32", DefaultValueFactory = _ => "bf16" };
        dtype.AcceptOnlyFromAmong("bf16", "f32");
        var cmd = new Command("export", "Write a run's model whole in the HF InternVL layout (frozen tensors from the base of a lean checkpoint, 5 GB shards, tokenizer and configs copied)")
            { run, output, dtype };
        cmd.SetAction(r => Run(r.GetValue(run)!, r.GetValue(output)!, r.GetValue(dtype)!));
        return cmd;
    }

    /// <summary>The checkpoint a --run argument names: the directory itself when it holds weights, else its run's newest intact checkpoint.</summary>
    public static string Resolve(string run)
    {
        if (!Directory.Exists(run)) throw new DirectoryNotFoundException($"--run {run}: no such directory");
        if (File.Exists(Path.Combine(run, Checkpoint.SingleFile)) || File.Exists(Path.Combine(run, Checkpoint.IndexFile))) return run;
        return RunCheckpoints.Latest(run, cleanup: false) // the run may be training: its temporaries are its own
               ?? (Directory.Exists(Path.Combine(run, "final")) ? Path.Combine(run, "final") : null)
               ?? throw new CheckpointException($"--run {run}: neither a checkpoint directory (model.safetensors or its index) nor a run with an intact checkpoint under {Path.Combine(run, "checkpoints")}");
    }

    public static int Run(string run, string output, string dtype = "bf16")
    {
        var source = Resolve(run);
        ExportResult r = null!;
        AnsiConsole.Status().Start($"exporting {source}", _ => r = CheckpointExport.Export(source, output, dtype == "f32" ? "F32" : "BF16"));
        AnsiConsole.MarkupLineInterpolated($"wrote {r.Output}: {r.Tensors} tensors, {r.Bytes / 1e9:F2} GB {r.DType} in {r.Shards} file(s), from {r.Source}; copied {string.Join(", ", r.SideFiles)}");
        return 0;
    }
}
