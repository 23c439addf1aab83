using System.CommandLine;
using System.Globalization;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>
/// `engine plan`: the device memory one rank needs for a stage of a config on a given world size and tensor-parallel
/// size, from <see cref="StepCost"/> (the same shapes the model code allocates), whether it fits a GPU's memory, and
/// what to change when it does not.
/// </summary>
public static class PlanCommand
{
    /// <summary>What a plan is asked about.</summary>
    public sealed record Request(string ConfigPath, int Gpus, int Tp, string Stage, TrainableParts Trainable, long GpuBytes, int SequenceTokens, int Tiles,
        int MicroBatch, int Rollouts, int PromptTokens, int MaxNewTokens, bool CheckpointLayers, bool ShardOptimizer, bool Reference, DType DType);

    /// <summary>One rank's memory by part; <see cref="Total"/> is what must fit.</summary>
    public sealed record Plan(Request Request, MemoryEstimate Step, long FrozenCopy, long KvCache)
    {
        public int DataParallel => Request.Gpus / Request.Tp;
        public long Total => Step.Total + FrozenCopy + KvCache;
        public bool Fits => Total <= Request.GpuBytes;
    }

    public static Command Create()
    {
        var config = new Option<string>("--config") { Description = "Model config (config.json of the VLM)", Required = true };
        var gpus = new Option<int>("--gpus") { Description = "World size: GPUs (ranks) over all nodes", DefaultValueFactory = _ => 1 };
        var tp = new Option<int>("--tp") { Description = "Tensor-parallel size (divides the decoder's heads, kv heads and MLP)", DefaultValueFactory = _ => 1 };
        var stage = new Option<string>("--stage") { Description = "sft | rm | mpo | grpo", DefaultValueFactory = _ => "grpo" };
        var trainable = new Option<string>("--trainable") { Description = "adapter | adapter+llm | adapter+vit | all", DefaultValueFactory = _ => "adapter" };
        var memory = new Option<string>("--gpu-memory") { Description = "One GPU's memory, e.g. 80GB or 141GB (GB = 10^9 bytes, GiB = 2^30)", DefaultValueFactory = _ => "80GB" };
        var seq = new Option<int>("--seq") { Description = "Tokens per training sequence (prompt, image tokens and response)", DefaultValueFactory = _ => 4096 };
        var tiles = new Option<int>("--tiles") { Description = "Image tiles per sequence (448 x 448 each, thumbnail included)", DefaultValueFactory = _ => 7 };
        var batch = new Option<int>("--micro-batch") { Description = "Sequences per micro-batch on one rank", DefaultValueFactory = _ => 1 };
        var rollouts = new Option<int>("--rollouts") { Description = "GRPO: rollouts sampled together on one rank (their KV cache)", DefaultValueFactory = _ => 64 };
        var prompt = new Option<int>("--prompt-tokens") { Description = "GRPO: prompt tokens per rollout (image tokens included)", DefaultValueFactory = _ => 2048 };
        var newTokens = new Option<int>("--max-new-tokens") { Description = "GRPO: response tokens per rollout", DefaultValueFactory = _ => 2048 };
        var ckpt = new Option<bool>("--checkpoint-layers") { Description = "Per-layer activation checkpointing (keep each layer's input, recompute in backward)" };
        var shard = new Option<bool>("--shard-optimizer") { Description = "ZeRO-1: masters and moments sharded over the data-parallel ranks (parallel.shard_optimizer)" };
        var kl = new Option<bool>("--kl") { Description = "GRPO with a KL term: a frozen reference copy beside the policy (MPO always has one)" };
        var dtype = new Option<string>("--dtype") { Description = "bf16 (CUDA) | f32 (the CPU backend)", DefaultValueFactory = _ => "bf16" };
        var cmd = new Command("plan", "Plan one GPU's memory for a stage on N GPUs with tensor parallelism: weights, masters, gradients, optimizer shard, activations, KV cache, loss workspace; fits or what to change")
            { config, gpus, tp, stage, trainable, memory, seq, tiles, batch, rollouts, prompt, newTokens, ckpt, shard, kl, dtype };
        cmd.SetAction(r => Run(new Request(r.GetValue(config)!, r.GetValue(gpus), r.GetValue(tp), r.GetValue(stage)!, BenchCommand.ParseTrainable(r.GetValue(trainable)!),
            ParseBytes(r.GetValue(memory)!), r.GetValue(seq), r.GetValue(tiles), r.GetValue(batch), r.GetValue(rollouts), r.GetValue(prompt), r.GetValue(newTokens),
            r.GetValue(ckpt), r.GetValue(shard), r.GetValue(kl), r.GetValue(dtype) == "f32" ? DType.F32 : DType.BF16)));
        return cmd;
    }

    /// <summary>"80GB", "141 GB", "96GiB", "1.5TB", or a plain byte count.</summary>
    public static long ParseBytes(string text)
    {
        var t = text.Trim().Replace(" ", "");
        var units = new (string Suffix, double Scale)[] { ("TiB", 1L << 40), ("GiB", 1L << 30), ("MiB", 1L << 20), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("B", 1) };
        foreach (var (suffix, scale) in units)
            if (t.EndsWith(suffix, StringComparison.OrdinalIgnoreCase)
                && double.TryParse(t[..^suffix.Length], NumberStyles.Float, CultureInfo.InvariantCulture, out var v) && v > 0)
                return (long)(v * scale);
        return long.TryParse(t, out var bytes) && bytes > 0 ? bytes
            : throw new ArgumentException($"--gpu-memory '{text}' is not a size such as 80GB, 141GB or 96GiB");
    }

    public static Plan Compute(Request q)
    {
        if (q.Gpus < 1 || q.Tp < 1 || q.Gpus % q.Tp != 0) throw new ArgumentException($"--gpus {q.Gpus} must be a positive multiple of --tp {q.Tp}");
        if (q.Stage is not ("sft" or "rm" or "mpo" or "grpo")) throw new ArgumentException($"--stage must be sft, rm, mpo or grpo, not '{q.Stage}'");
        if (q.SequenceTokens < 1 || q.MicroBatch < 1 || q.Tiles < 0) throw new ArgumentException("--seq and --micro-batch must be at least 1, --tiles at least 0");
        var c = VlmConfig.Load(q.ConfigPath);
        int imageTokens = q.Tiles * c.TokensPerTile;
        if (imageTokens >= q.SequenceTokens) throw new ArgumentException($"--seq {q.SequenceTokens} leaves no text beside {q.Tiles} tiles of {c.TokensPerTile} image tokens");
        // The responses are scored: half the text tokens of a preference or GRPO sequence, none for a reward model.
        var shape = StepShape.Uniform(q.MicroBatch, q.SequenceTokens, q.Tiles);
        int text = q.MicroBatch * (q.SequenceTokens - imageTokens);
        shape = shape with { Scored = q.Stage switch { "rm" => 0, "sft" => text / 2, _ => text / 2 } };
        var layout = new ParallelLayout(q.Gpus / q.Tp, q.Tp, q.ShardOptimizer);
        var step = StepCost.TrainingMemory(c, shape, q.Trainable, q.DType, q.CheckpointLayers, layout: layout);
        long frozen = q.Stage == "mpo" || (q.Stage == "grpo" && q.Reference) ? StepCost.FrozenCopyBytes(c, q.DType, q.Tp) : 0;
        long kv = q.Stage == "grpo" ? StepCost.KvCacheBytes(c, q.Rollouts, q.PromptTokens + q.MaxNewTokens, q.DType, q.Tp) : 0;
        return new Plan(q, step, frozen, kv);
    }

    /// <summary>Changes that lower the plan, each with the total it gives, in the order worth trying.</summary>
    public static List<(string Change, Plan Plan)> Alternatives(Plan p)
    {
        var q = p.Request;
        var list = new List<(string, Plan)>();
        void Try(string change, Request r)
        {
            try { list.Add((change, Compute(r))); }
            catch (ArgumentException) { }
        }
        if (!q.CheckpointLayers) Try("--checkpoint-layers (activation checkpointing)", q with { CheckpointLayers = true });
        if (!q.ShardOptimizer && q.Gpus / q.Tp > 1) Try($"--shard-optimizer (ZeRO-1 over {q.Gpus / q.Tp} data-parallel ranks)", q with { ShardOptimizer = true });
        foreach (int tp in new[] { 2, 4, 8 }.Where(t => t > q.Tp && q.Gpus % t == 0)) Try($"--tp {tp}", q with { Tp = tp });
        if (q.Stage == "grpo" && q.Rollouts > 1) Try($"--rollouts {q.Rollouts / 2} (sample in two waves)", q with { Rollouts = q.Rollouts / 2 });
        if (q.MicroBatch > 1) Try($"--micro-batch {q.MicroBatch / 2}", q with { MicroBatch = q.MicroBatch / 2 });
        if (q.Trainable is TrainableParts.All or TrainableParts.AdapterAndVit)
            Try("--trainable adapter+llm (the ViT, whole on every rank, stays frozen)", q with { Trainable = TrainableParts.AdapterAndLlm });
        var all = q with { CheckpointLayers = true, ShardOptimizer = q.Gpus / q.Tp > 1 || q.ShardOptimizer, Tp = new[] { 8, 4, 2, q.Tp }.First(t => t >= q.Tp && q.Gpus % t == 0) };
        if (all != q) Try("all of the above that apply at once", all);
        return list;
    }

    public static int Run(Request q)
    {
        var p = Compute(q);
        static string G(long b) => (b / 1e9).ToString("F1", CultureInfo.InvariantCulture);
        var c = p.Request;
        AnsiConsole.MarkupLineInterpolated($"[bold]{Path.GetFileNameWithoutExtension(c.ConfigPath)}[/], stage {c.Stage}, trainable {c.Trainable}: {c.Gpus} GPU(s) = tp {c.Tp} x dp {p.DataParallel}; {c.MicroBatch} sequence(s) of {c.SequenceTokens} tokens with {c.Tiles} tiles per micro-batch; {c.DType.ToString().ToLowerInvariant()}; checkpointing {(c.CheckpointLayers ? "on" : "off")}; optimizer {(c.ShardOptimizer ? "sharded (ZeRO-1)" : "replicated")}");
        var table = new Table().AddColumns("per GPU", "GB");
        table.AddRow("weights (decoder cut tp ways, ViT and adapter whole)", G(p.Step.Weights));
        table.AddRow("fp32 masters of the trainable part" + (c.ShardOptimizer ? " (this rank's shard)" : ""), G(p.Step.Masters));
        table.AddRow("fp32 gradients" + (c.ShardOptimizer ? " (+ the reduce-scattered shard)" : ""), G(p.Step.Gradients));
        table.AddRow("AdamW moments" + (c.ShardOptimizer ? " (this rank's shard)" : ""), G(p.Step.Optimiser));
        table.AddRow("activations kept for backward", G(p.Step.Activations));
        table.AddRow("backward and fused-loss workspace", G(p.Step.BackwardWorkspace));
        if (p.FrozenCopy > 0) table.AddRow("frozen reference copy", G(p.FrozenCopy));
        if (p.KvCache > 0) table.AddRow($"KV cache: {c.Rollouts} rollouts x {c.PromptTokens + c.MaxNewTokens} tokens", G(p.KvCache));
        table.AddRow("[bold]total[/]", $"[bold]{G(p.Total)}[/]");
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine((p.Fits ? "[green]fits[/]" : "[red]does not fit[/]") + Markup.Escape($" in {G(c.GpuBytes)} GB per GPU ({100.0 * p.Total / c.GpuBytes:F0}% of it)"));
        if (!p.Fits)
        {
            var options = new Table().AddColumns("change", "total GB", "fits");
            foreach (var (change, alt) in Alternatives(p)) options.AddRow(Markup.Escape(change), G(alt.Total), alt.Fits ? "yes" : "no");
            AnsiConsole.Write(options);
        }
        return 0;
    }
}
