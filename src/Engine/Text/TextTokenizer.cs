using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace R1V2.Native.Engine.Text;

/// <summary>
/// A Hugging Face byte-level BPE tokenizer (Qwen2 family) built on Microsoft.ML.Tokenizers: NFC normalisation, the
/// split regex from tokenizer.json, byte-level BPE over the vocabulary and merges, and every added token (special
/// or not) recognised whole inside text. Decoding maps byte symbols back to UTF-8 and keeps added tokens verbatim.
/// </summary>
public sealed class TextTokenizer
{
    /// <summary>The Qwen2 pre-tokenizer split pattern (used when tokenizer.json gives a bare ByteLevel pre-tokenizer).</summary>
    public const string Qwen2Pattern = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    private readonly BpeTokenizer _bpe;
    private readonly Dictionary<string, int> _added;
    private readonly Dictionary<int, string> _addedById;

    private TextTokenizer(BpeTokenizer bpe, Dictionary<string, int> added, int vocabSize, string source)
    {
        _bpe = bpe;
        _added = added;
        _addedById = added.ToDictionary(kv => kv.Value, kv => kv.Key);
        VocabularySize = vocabSize;
        Source = source;
    }

    public string Source { get; }

    /// <summary>Base vocabulary plus added tokens (the model's vocab_size may be larger: padding rows).</summary>
    public int VocabularySize { get; }

    public IReadOnlyDictionary<string, int> AddedTokens => _added;

    public int? TokenId(string token) => _added.TryGetValue(token, out var id) ? id : null;

    public int RequireToken(string token) =>
        TokenId(token) ?? throw new InvalidDataException($"{Source}: the tokenizer has no token '{token}'");

    /// <summary>Loads tokenizer.json from a checkpoint directory or a file path.</summary>
    public static TextTokenizer Load(string path)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, "tokenizer.json") : path;
        if (!File.Exists(file)) throw new FileNotFoundException($"tokenizer not found: {file}", file);
        JsonObject root;
        try { root = JsonNode.Parse(File.ReadAllText(file)) as JsonObject ?? throw new JsonException("not an object"); }
        catch (JsonException e) { throw new InvalidDataException($"{file}: not valid JSON ({e.Message})", e); }
        // A field of the wrong JSON type (a number where a string belongs, a missing object) names the file, not the JSON API.
        try { return Build(root, file); }
        catch (Exception e) when (e is InvalidOperationException or NullReferenceException or FormatException or KeyNotFoundException or OverflowException)
        {
            throw new InvalidDataException($"{file}: malformed tokenizer ({e.Message})", e);
        }
    }

    private static TextTokenizer Build(JsonObject root, string file)
    {
        var model = root["model"] as JsonObject ?? throw new InvalidDataException($"{file}: no 'model'");
        if (model["type"]?.GetValue<string>() is { } type && type != "BPE") throw new InvalidDataException($"{file}: model type '{type}' is not BPE");
        var vocabNode = model["vocab"] as JsonObject ?? throw new InvalidDataException($"{file}: no model.vocab");
        var vocab = new Dictionary<string, int>(vocabNode.Count, StringComparer.Ordinal);
        foreach (var (token, id) in vocabNode) vocab[token] = id!.GetValue<int>();

        var merges = new List<string>();
        if (model["merges"] is JsonArray mergeNodes)
            foreach (var m in mergeNodes)
                merges.Add(m switch
                {
                    JsonValue v => v.GetValue<string>(),
                    JsonArray pair when pair.Count == 2 => pair[0]!.GetValue<string>() + " " + pair[1]!.GetValue<string>(),
                    _ => throw new InvalidDataException($"{file}: a merge is neither \"a b\" nor [a, b]"),
                });

        var added = new Dictionary<string, int>(StringComparer.Ordinal);
        if (root["added_tokens"] is JsonArray addedNodes)
            foreach (var a in addedNodes)
                added[a!["content"]!.GetValue<string>()] = a["id"]!.GetValue<int>();

        var normalizer = root["normalizer"]?["type"]?.GetValue<string>();
        if (normalizer is not (null or "NFC")) throw new InvalidDataException($"{file}: normalizer '{normalizer}' is not supported (NFC or none)");
        var pattern = SplitPattern(root["pre_tokenizer"], file);

        var options = new BpeOptions(vocab)
        {
            Merges = merges,
            ByteLevel = true,
            PreTokenizer = new RegexPreTokenizer(new Regex(pattern, RegexOptions.Compiled), added),
            SpecialTokens = added,
        };
        var bpe = BpeTokenizer.Create(options);
        int size = Math.Max(vocab.Count == 0 ? 0 : vocab.Values.Max() + 1, added.Count == 0 ? 0 : added.Values.Max() + 1);
        return new TextTokenizer(bpe, added, size, file);
    }

    private static string SplitPattern(JsonNode? pre, string file)
    {
        switch (pre?["type"]?.GetValue<string>())
        {
            case "Sequence":
                foreach (var p in pre["pretokenizers"]!.AsArray())
                    if (p?["type"]?.GetValue<string>() == "Split" && p["pattern"]?["Regex"]?.GetValue<string>() is { } rx) return rx;
                throw new InvalidDataException($"{file}: the pre_tokenizer sequence has no Split regex");
            case "ByteLevel":
                return Qwen2Pattern;
            default:
                throw new InvalidDataException($"{file}: pre_tokenizer '{pre?["type"]}' is not supported (Sequence[Split, ByteLevel] or ByteLevel)");
        }
    }

    /// <summary>Token ids of <paramref name="text"/> (NFC-normalised first; added tokens are matched whole).</summary>
    public int[] Encode(string text) =>
        _bpe.EncodeToIds(text.Normalize(NormalizationForm.FormC), considerPreTokenization: true, considerNormalization: false).ToArray();

    public string Decode(IEnumerable<int> ids)
    {
        var list = ids as IReadOnlyList<int> ?? ids.ToList();
        if (list.Count == 0) return "";
        foreach (var id in list)
            if (id < 0 || id >= VocabularySize) throw new ArgumentOutOfRangeException(nameof(ids), $"token id {id} is outside the vocabulary of {VocabularySize}");
        return _bpe.Decode(list, considerSpecialTokens: true) ?? "";
    }

    /// <summary>The text of one token (its bytes may be part of a longer UTF-8 character).</summary>
    public string TokenText(int id) => _addedById.TryGetValue(id, out var s) ? s : Decode([id]);
}
