using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Engine.Models;

/// <summary>What <see cref="ModelFactory.Init"/> wrote.</summary>
public sealed record InitResult(long Parameters, string StoredType, int ImageContextId, int TokensPerTile, int Merges);

/// <summary>Randomly initialised checkpoints in the Hugging Face InternVL layout (what `engine init` writes).</summary>
public static class ModelFactory
{
    /// <summary>
    /// Writes config.json, the weights (random, reproducible from <paramref name="seed"/>), tokenizer.json and
    /// tokenizer_config.json into <paramref name="outDir"/>; with a corpus the tokenizer also gets byte-level BPE merges
    /// learned from it up to the config's vocab_size.
    /// </summary>
    public static InitResult Init(string configPath, string outDir, int seed, string? tokenizerCorpus = null, string dtype = "fp32")
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
        return new InitResult(parameters, stored, imageContext, config.TokensPerTile, merges.Count);
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
}
