using System.CommandLine;
using R1V2.Native.Engine.Models;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine init --config FILE --out DIR [--seed N]`: a randomly initialised checkpoint in the HF layout.</summary>
public static class InitCommand
{
    public static Command Create()
    {
        var config = new Option<string>("--config") { Description = "Model config.json (InternVL / Skywork-chat layout), e.g. configs/tiny.json", Required = true };
        var output = new Option<string>("--out") { Description = "Checkpoint directory to write", Required = true };
        var seed = new Option<int>("--seed") { Description = "Initialisation seed", DefaultValueFactory = _ => 0 };
        var dtype = new Option<string>("--dtype") { Description = "Stored precision: fp32 or bf16", DefaultValueFactory = _ => "fp32" };
        var corpus = new Option<string?>("--tokenizer-corpus")
            { Description = "Text or JSONL (its prompt/question/response strings) to learn byte-level BPE merges from, filling the config's vocab_size" };
        var cmd = new Command("init", "Write a randomly initialised checkpoint (config.json, safetensors, tokenizer.json, tokenizer_config.json)") { config, output, seed, dtype, corpus };
        cmd.SetAction(r => Run(r.GetValue(config)!, r.GetValue(output)!, r.GetValue(seed), r.GetValue(dtype)!, r.GetValue(corpus)));
        return cmd;
    }

    public static int Run(string configPath, string outDir, int seed, string dtype = "fp32", string? tokenizerCorpus = null)
    {
        var r = ModelFactory.Init(configPath, outDir, seed, tokenizerCorpus, dtype);
        var learned = tokenizerCorpus is null ? "" : $"; tokenizer with {r.Merges} merges learned from {tokenizerCorpus}";
        AnsiConsole.MarkupLineInterpolated($"wrote {outDir}: {r.Parameters:N0} parameters ({r.StoredType}), seed {seed}, <IMG_CONTEXT> = {r.ImageContextId}, {r.TokensPerTile} image tokens per tile{learned}");
        return 0;
    }
}
