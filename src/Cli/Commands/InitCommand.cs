using System.CommandLine;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
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

    /// <summary>The texts of a corpus file: each JSONL row's prompt, question and response strings, or each line of plain text.</summary>
    public static IEnumerable<string> CorpusTexts(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"tokenizer corpus not found: {path}", path);
        int line = 0;
        foreach (var text in File.ReadLines(path))
        {
            line++;
            if (!path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase)) { yield return text; continue; }
            if (text.Trim().Length == 0) continue;
            System.Text.Json.Nodes.JsonObject o;
            try { o = System.Text.Json.Nodes.JsonNode.Parse(text)!.AsObject(); }
            catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or NullReferenceException)
            { throw new InvalidDataException($"{path}:{line}: not a JSON object"); }
            foreach (var key in new[] { "prompt", "question", "response" })
                if (o[key] is System.Text.Json.Nodes.JsonValue v && v.TryGetValue<string>(out var s)) yield return s;
        }
    }

    public static int Run(string configPath, string outDir, int seed, string dtype = "fp32", string? tokenizerCorpus = null)
    {
        var stored = dtype switch { "fp32" => "F32", "bf16" => "BF16", _ => throw new ArgumentException($"--dtype must be fp32 or bf16, got '{dtype}'") };
        var config = VlmConfig.Load(configPath);
        long parameters = VlmWeights.ParameterCount(config);
        if (parameters > 2_000_000_000L)
            throw new InvalidOperationException($"{configPath} describes {parameters / 1e9:F1}B parameters; engine init writes random checkpoints for configs up to 2B (the large configs are for memory planning)");
        Directory.CreateDirectory(outDir);
        using var backend = new CpuBackend();
        using var store = new ParameterStore(backend, config, TrainableParts.None, (name, shape) => VlmWeights.RandomInit(config, name, shape, seed));
        var merges = tokenizerCorpus is null ? [] : BpeTrainer.Train(CorpusTexts(tokenizerCorpus), config.Llm.VocabSize - TokenizerWriter.MinimumVocabulary);
        TokenizerWriter.Write(outDir, config.Llm.VocabSize, merges);
        int imageContext = TokenizerFiles.SpecialTokenId(Path.Combine(outDir, "tokenizer.json"), TokenizerFiles.ImageContext);
        using var model = new VisionLanguageModel(backend, config, store, imageContext);
        model.Save(outDir, stored);
        var learned = tokenizerCorpus is null ? "" : $"; tokenizer with {merges.Count} merges learned from {tokenizerCorpus}";
        AnsiConsole.MarkupLineInterpolated($"wrote {outDir}: {parameters:N0} parameters ({stored}), seed {seed}, <IMG_CONTEXT> = {imageContext}, {config.TokensPerTile} image tokens per tile{learned}");
        return 0;
    }
}
