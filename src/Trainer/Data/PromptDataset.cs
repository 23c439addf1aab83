using System.Globalization;
using System.Text.Json.Nodes;

namespace R1V2.Native.Trainer.Data;

/// <summary>
/// One training prompt: the question, the verifiable answer, optional multiple-choice options, image files, and what
/// the images are known to hold (for the grounding check), e.g. "image_digits": [3, 7] and "image_objects": ["cat", "sofa"].
/// </summary>
public sealed record PromptRow(int Index, string Question, string Answer, IReadOnlyList<string> Images, IReadOnlyList<string>? Choices,
    IReadOnlyList<int>? ImageDigits, IReadOnlyList<string>? ImageObjects = null, string? Type = null)
{
    /// <summary>The digits of a digit scene from left to right ("digits"), for the reading check of evaluations; null when not given.</summary>
    public IReadOnlyList<int>? Digits { get; init; }
}

/// <summary>
/// Prompts from JSONL ("question" or "prompt", "answer", optional "images"/"image", "choices", "image_digits",
/// "image_objects", "type": a question type that evaluations report accuracy by, "digits": a digit scene's digits left to right) or Parquet (the same columns; "image"/"images" as bytes, paths or HF {bytes, path} structs; see
/// <see cref="ParquetRows{T}"/>), chosen by the file's extension.
/// </summary>
public sealed class PromptDataset
{
    private readonly ShuffledRows<PromptRow> _rows;
    private readonly SortedSet<string> _objects = new(StringComparer.Ordinal);

    public PromptDataset(string path, int seed, bool shuffle = true, bool skipBadRows = false)
    {
        // The sources validate every row once while indexing; the object words are collected in that same pass.
        PromptRow Collect(PromptRow row)
        {
            foreach (var o in row.ImageObjects ?? []) _objects.Add(o);
            return row;
        }
        IRowSource<PromptRow> source = path.EndsWith(".parquet", StringComparison.OrdinalIgnoreCase)
            ? new ParquetRows<PromptRow>(path, r => Collect(ParseParquet(r)), skipBadRows)
            : new JsonlRows<PromptRow>(path, (o, where) => Collect(Parse(o, path, where)), skipBadRows);
        _rows = new ShuffledRows<PromptRow>(source, seed, shuffle);
    }

    /// <summary>Every image_objects entry of the file's rows (the grounding check's object vocabulary).</summary>
    public IReadOnlyCollection<string> ObjectWords => _objects;

    public int Count => _rows.Source.Count;
    public int SkippedRows => _rows.Source.SkippedRows;
    public (int Epoch, int Index) Position => _rows.Position;
    public void Seek((int Epoch, int Index) position) => _rows.Seek(position);
    public List<PromptRow> Next(int count) => _rows.Next(count).Select(r => r.Item with { Index = r.Row }).ToList();
    public PromptRow Read(int row) => _rows.Source.Read(row) with { Index = row };

    private static PromptRow ParseParquet(ParquetRow r)
    {
        var question = r.String("question", "prompt", "problem") ?? throw new InvalidDataException($"{r.Where}: no 'question' string");
        var answer = r.String("answer") ?? throw new InvalidDataException($"{r.Where}: no 'answer'");
        var digits = r.List<int>("image_digits");
        var ordered = r.List<int>("digits");
        SingleDigits(digits, "image_digits", () => r.Where);
        SingleDigits(ordered, "digits", () => r.Where);
        return new PromptRow(-1, question, answer, r.Images(), r.List<string>("choices"), digits, r.List<string>("image_objects"), r.String("type")) { Digits = ordered };
    }

    private static void SingleDigits(List<int>? digits, string column, Func<string> where)
    {
        if (digits is not null && digits.Any(d => d is < 0 or > 9)) throw new InvalidDataException($"{where()}: '{column}' holds single digits 0-9");
    }

    private static PromptRow Parse(JsonObject o, string path, Func<string> where)
    {
        var question = JsonlRows<PromptRow>.String(o, "question") ?? JsonlRows<PromptRow>.String(o, "prompt") ?? throw new InvalidDataException($"{where()}: no 'question' string");
        var answer = JsonlRows<PromptRow>.String(o, "answer")
            ?? (o["answer"] is JsonValue n && n.TryGetValue<double>(out var d) ? d.ToString(CultureInfo.InvariantCulture) : null)
            ?? throw new InvalidDataException($"{where()}: no 'answer'");
        var choices = o["choices"] is JsonArray c ? c.Select(x => x?.ToString() ?? "").ToList() : null;
        List<int>? digits, ordered;
        List<string>? objects;
        try
        {
            digits = o["image_digits"] is JsonArray dg ? dg.Select(x => x!.GetValue<int>()).ToList() : null;
            ordered = o["digits"] is JsonArray od ? od.Select(x => x!.GetValue<int>()).ToList() : null;
            objects = o["image_objects"] is JsonArray ob ? ob.Select(x => x!.GetValue<string>()).ToList() : null;
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or NullReferenceException)
        {
            throw new InvalidDataException($"{where()}: 'image_digits' and 'digits' must be lists of integers and 'image_objects' a list of strings");
        }
        SingleDigits(digits, "image_digits", where);
        SingleDigits(ordered, "digits", where);
        return new PromptRow(-1, question, answer, JsonlRows<PromptRow>.Images(o, path, where), choices, digits, objects, JsonlRows<PromptRow>.String(o, "type")) { Digits = ordered };
    }
}

/// <summary>One preference pair: a prompt (with images) and a chosen and a rejected response.</summary>
public sealed record PreferencePair(int Index, string Prompt, IReadOnlyList<string> Images, string Chosen, string Rejected);

/// <summary>
/// Preference pairs in JSONL or Parquet: "prompt" (or "question"), optional "images"/"image", "chosen", "rejected".
/// </summary>
public sealed class PreferenceDataset(string path, int seed, bool shuffle = true, bool skipBadRows = false)
{
    private readonly ShuffledRows<PreferencePair> _rows = new(path.EndsWith(".parquet", StringComparison.OrdinalIgnoreCase)
        ? new ParquetRows<PreferencePair>(path, ParseParquet, skipBadRows)
        : new JsonlRows<PreferencePair>(path, (o, where) => Parse(o, path, where), skipBadRows), seed, shuffle);

    public int Count => _rows.Source.Count;
    public int SkippedRows => _rows.Source.SkippedRows;
    public (int Epoch, int Index) Position => _rows.Position;
    public void Seek((int Epoch, int Index) position) => _rows.Seek(position);
    public List<PreferencePair> Next(int count) => _rows.Next(count).Select(r => r.Item with { Index = r.Row }).ToList();
    public PreferencePair Read(int row) => _rows.Source.Read(row) with { Index = row };

    private static PreferencePair ParseParquet(ParquetRow r)
    {
        var prompt = r.String("prompt", "question") ?? throw new InvalidDataException($"{r.Where}: no 'prompt' string");
        var chosen = r.String("chosen") ?? throw new InvalidDataException($"{r.Where}: no 'chosen' string");
        var rejected = r.String("rejected") ?? throw new InvalidDataException($"{r.Where}: no 'rejected' string");
        if (chosen.Length == 0 || rejected.Length == 0) throw new InvalidDataException($"{r.Where}: 'chosen' and 'rejected' must not be empty");
        return new PreferencePair(-1, prompt, r.Images(), chosen, rejected);
    }

    private static PreferencePair Parse(JsonObject o, string path, Func<string> where)
    {
        var prompt = JsonlRows<PreferencePair>.String(o, "prompt") ?? JsonlRows<PreferencePair>.String(o, "question") ?? throw new InvalidDataException($"{where()}: no 'prompt' string");
        var chosen = JsonlRows<PreferencePair>.String(o, "chosen") ?? throw new InvalidDataException($"{where()}: no 'chosen' string");
        var rejected = JsonlRows<PreferencePair>.String(o, "rejected") ?? throw new InvalidDataException($"{where()}: no 'rejected' string");
        if (chosen.Length == 0 || rejected.Length == 0) throw new InvalidDataException($"{where()}: 'chosen' and 'rejected' must not be empty");
        return new PreferencePair(-1, prompt, JsonlRows<PreferencePair>.Images(o, path, where), chosen, rejected);
    }
}

/// <summary>One supervised example: a prompt (with images) and the response to imitate.</summary>
public sealed record SftExample(int Index, string Prompt, IReadOnlyList<string> Images, string Response);

/// <summary>Supervised examples in JSONL or Parquet: "prompt" (or "question"), optional "images"/"image", "response".</summary>
public sealed class SftDataset(string path, int seed, bool shuffle = true, bool skipBadRows = false)
{
    private readonly ShuffledRows<SftExample> _rows = new(path.EndsWith(".parquet", StringComparison.OrdinalIgnoreCase)
        ? new ParquetRows<SftExample>(path, ParseParquet, skipBadRows)
        : new JsonlRows<SftExample>(path, (o, where) => Parse(o, path, where), skipBadRows), seed, shuffle);

    public int Count => _rows.Source.Count;
    public int SkippedRows => _rows.Source.SkippedRows;
    public (int Epoch, int Index) Position => _rows.Position;
    public void Seek((int Epoch, int Index) position) => _rows.Seek(position);
    public List<SftExample> Next(int count) => _rows.Next(count).Select(r => r.Item with { Index = r.Row }).ToList();
    public SftExample Read(int row) => _rows.Source.Read(row) with { Index = row };

    private static SftExample ParseParquet(ParquetRow r)
    {
        var prompt = r.String("prompt", "question") ?? throw new InvalidDataException($"{r.Where}: no 'prompt' string");
        var response = r.String("response") ?? throw new InvalidDataException($"{r.Where}: no 'response' string");
        if (response.Length == 0) throw new InvalidDataException($"{r.Where}: 'response' must not be empty");
        return new SftExample(-1, prompt, r.Images(), response);
    }

    private static SftExample Parse(JsonObject o, string path, Func<string> where)
    {
        var prompt = JsonlRows<SftExample>.String(o, "prompt") ?? JsonlRows<SftExample>.String(o, "question") ?? throw new InvalidDataException($"{where()}: no 'prompt' string");
        var response = JsonlRows<SftExample>.String(o, "response") ?? throw new InvalidDataException($"{where()}: no 'response' string");
        if (response.Length == 0) throw new InvalidDataException($"{where()}: 'response' must not be empty");
        return new SftExample(-1, prompt, JsonlRows<SftExample>.Images(o, path, where), response);
    }
}
