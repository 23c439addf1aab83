using System.CommandLine;
using R1V2.Native.Engine.Backends.Cpu;
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
        var cmd = new Command("init", "Write a randomly initialised checkpoint (config.json, safetensors, tokenizer.json, tokenizer_config.json)") { config, output, seed, dtype };
        cmd.SetAction(r => Run(r.GetValue(config)!, r.GetValue(output)!, r.GetValue(seed), r.GetValue(dtype)!));
        return cmd;
    }

    public static int Run(string configPath, string outDir, int seed, string dtype = "fp32")
    {
        var stored = dtype switch { "fp32" => "F32", "bf16" => "BF16", _ => throw new ArgumentException($"--dtype must be fp32 or bf16, got '{dtype}'") };
        var config = VlmConfig.Load(configPath);
        long parameters = VlmWeights.ParameterCount(config);
        if (parameters > 2_000_000_000L)
            throw new InvalidOperationException($"{configPath} describes {parameters / 1e9:F1}B parameters; engine init writes random checkpoints for configs up to 2B (the large configs are for memory planning)");
        Directory.CreateDirectory(outDir);
        using var backend = new CpuBackend();
        using var store = new ParameterStore(backend, config, TrainableParts.None, (name, shape) => VlmWeights.RandomInit(config, name, shape, seed));
        TokenizerWriter.Write(outDir, config.Llm.VocabSize);
        int imageContext = TokenizerFiles.SpecialTokenId(Path.Combine(outDir, "tokenizer.json"), TokenizerFiles.ImageContext);
        using var model = new VisionLanguageModel(backend, config, store, imageContext);
        model.Save(outDir, stored);
        AnsiConsole.MarkupLineInterpolated($"wrote {outDir}: {parameters:N0} parameters ({stored}), seed {seed}, <IMG_CONTEXT> = {imageContext}, {config.TokensPerTile} image tokens per tile");
        return 0;
    }
}
