using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>
/// `engine score --model DIR --data FILE.jsonl --out OUT.jsonl`: teacher-forced log p(token_t | tokens before t, images)
/// for t = score_from .. n-1 of each row. Rows: {"input_ids": [...], "images": ["a.png", ...], "score_from": k}, or as
/// text {"prompt": "...", "response": "...", "images": [...]} (the prompt goes through the chat template with its
/// images; the response's tokens are scored). Image paths are relative to the data file. Output rows:
/// {"logprobs": [...]}, one per input row, in order.
/// </summary>
public static class ScoreCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Checkpoint directory", Required = true };
        var data = new Option<string>("--data") { Description = "Input JSONL", Required = true };
        var output = new Option<string>("--out") { Description = "Output JSONL", Required = true };
        var backend = Backends.Option();
        var cmd = new Command("score", "Teacher-forced per-token log-probabilities of JSONL rows (also the reference model's log-probs)") { model, data, output, backend };
        cmd.SetAction(r => Run(r.GetValue(model)!, r.GetValue(data)!, r.GetValue(output)!, r.GetValue(backend)!));
        return cmd;
    }

    /// <summary>One parsed input row: token ids with the first scored position, or a prompt and a response as text.</summary>
    public sealed record Row(int[]? InputIds, string[] Images, int ScoreFrom, string? Prompt = null, string? Response = null);

    public static Row ParseRow(string line, string file, int lineNumber)
    {
        string Where() => $"{file}:{lineNumber}";
        JsonObject obj;
        try { obj = JsonNode.Parse(line) as JsonObject ?? throw new JsonException("not an object"); }
        catch (JsonException e) { throw new InvalidDataException($"{Where()}: not a JSON object ({e.Message})"); }
        var images = obj["images"] is JsonArray imgs ? imgs.Select((x, i) => x is JsonValue s && s.TryGetValue<string>(out var p) ? p
            : throw new InvalidDataException($"{Where()}: images[{i}] is not a path")).ToArray() : [];
        if (obj.ContainsKey("prompt") || obj.ContainsKey("response"))
        {
            if (obj["prompt"] is not JsonValue pv || !pv.TryGetValue<string>(out var prompt) || obj["response"] is not JsonValue rv || !rv.TryGetValue<string>(out var response))
                throw new InvalidDataException($"{Where()}: text rows need both 'prompt' and 'response' strings");
            if (response.Length == 0) throw new InvalidDataException($"{Where()}: 'response' is empty: nothing to score");
            return new Row(null, images, 0, prompt, response);
        }
        if (obj.ContainsKey("text") || obj.ContainsKey("messages"))
            throw new InvalidDataException($"{Where()}: give either input_ids (with score_from) or a prompt and a response");
        if (obj["input_ids"] is not JsonArray ids || ids.Count == 0) throw new InvalidDataException($"{Where()}: 'input_ids' must be a non-empty array of token ids");
        var tokens = new int[ids.Count];
        for (int i = 0; i < tokens.Length; i++)
        {
            if (ids[i] is not JsonValue v || !v.TryGetValue<int>(out tokens[i]))
                throw new InvalidDataException($"{Where()}: input_ids[{i}] is not an integer");
        }
        int from = obj["score_from"] is JsonValue f && f.TryGetValue<int>(out var k) ? k : 1;
        if (from < 1 || from > tokens.Length) throw new InvalidDataException($"{Where()}: score_from {from} must be in [1, {tokens.Length}] (token 0 has no context)");
        return new Row(tokens, images, from);
    }

    public static int Run(string modelDir, string dataPath, string outPath, string backendName)
    {
        using var backend = Backends.Create(backendName);
        using var model = VisionLanguageModel.Load(backend, modelDir);
        var pre = new ImagePreprocessor(model.Config.ForceImageSize);
        TextTokenizer? tokenizer = null;
        var template = new ChatTemplate(model.Config.TokensPerTile);
        var baseDir = Path.GetDirectoryName(Path.GetFullPath(dataPath))!;
        var lines = File.ReadAllLines(dataPath);
        if (lines.All(string.IsNullOrWhiteSpace)) throw new InvalidDataException($"{dataPath}: no rows to score (the file is empty)");
        var results = new List<string>();
        int lineNumber = 0, rows = 0;
        long tokens = 0;
        foreach (var line in lines)
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            var row = ParseRow(line, dataPath, lineNumber);
            var pixels = new List<float>();
            var tileCounts = new List<int>();
            foreach (var image in row.Images)
            {
                var (p, n) = pre.Load(Path.IsPathRooted(image) ? image : Path.Combine(baseDir, image));
                pixels.AddRange(p);
                tileCounts.Add(n);
            }
            int tiles = tileCounts.Sum();
            var ids = row.InputIds;
            if (ids is null)
            {
                tokenizer ??= TextTokenizer.Load(modelDir);
                var promptIds = tokenizer.Encode(template.Render([new ChatMessage("user", row.Prompt!, tileCounts)]));
                ids = [.. promptIds, .. tokenizer.Encode(row.Response!)];
                row = row with { ScoreFrom = promptIds.Length };
            }
            var targets = new int[ids.Length];
            for (int t = 0; t < ids.Length; t++) targets[t] = t + 1 < ids.Length && t + 1 >= row.ScoreFrom ? ids[t + 1] : Backend.IgnoreIndex;
            var batch = new VlmBatch(ids, targets, [0, ids.Length], tiles > 0 ? [.. pixels] : null, tiles);
            float[] logprobs;
            try
            {
                using var pass = model.Forward(batch);
                logprobs = pass.LogProbs[(row.ScoreFrom - 1)..(ids.Length - 1)];
            }
            catch (ArgumentException e) { throw new InvalidDataException($"{dataPath}:{lineNumber}: {e.Message}", e); }
            results.Add(new JsonObject { ["logprobs"] = new JsonArray(logprobs.Select(x => (JsonNode)x).ToArray()) }.ToJsonString());
            rows++;
            tokens += logprobs.Length;
        }
        File.WriteAllLines(outPath + ".tmp", results);
        File.Move(outPath + ".tmp", outPath, overwrite: true);
        AnsiConsole.MarkupLineInterpolated($"scored {rows} rows, {tokens} tokens on {backend.Name}; wrote {outPath}");
        return 0;
    }
}
