using System.Text.Json;
using System.Text.Json.Nodes;

namespace R1V2.Native.Trainer.Data;

/// <summary>
/// One training prompt: the question, the verifiable answer, optional multiple-choice options, image files, and what
/// the images are known to hold (for the grounding check), e.g. {"digits": [3, 7]}.
/// </summary>
public sealed record PromptRow(int Index, string Question, string Answer, IReadOnlyList<string> Images, IReadOnlyList<string>? Choices,
    IReadOnlyList<int>? ImageDigits);

/// <summary>
/// A prompt dataset in JSONL: one object per line with "question" (or "prompt"), "answer", optional "images" (paths
/// relative to the file) or "image", "choices" and "image_digits". Lines are indexed by byte offset and read on
/// demand (the file is never held whole). A bad row is an error naming file and line, or, with skip-bad-rows, is left
/// out and counted. Order: a seeded permutation per epoch; the position (epoch, index) is what a checkpoint saves.
/// </summary>
public sealed class PromptDataset
{
    private readonly string _path;
    private readonly List<long> _offsets = [];
    private readonly List<int> _lines = [];
    private readonly int _seed;
    private readonly bool _shuffle;
    private int[] _order = [];

    public PromptDataset(string path, int seed, bool shuffle = true, bool skipBadRows = false)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset not found: {path}", path);
        _path = path;
        _seed = seed;
        _shuffle = shuffle;
        using var fs = File.OpenRead(path);
        long start = 0;
        int line = 0;
        var buffer = new List<byte>();
        int b;
        while (true)
        {
            b = fs.ReadByte();
            if (b == '\n' || b < 0)
            {
                line++;
                if (buffer.Count > 0 && buffer.Any(x => !char.IsWhiteSpace((char)x)))
                {
                    var text = System.Text.Encoding.UTF8.GetString(buffer.ToArray());
                    try
                    {
                        Parse(text, line);
                        _offsets.Add(start);
                        _lines.Add(line);
                    }
                    catch (InvalidDataException) when (skipBadRows) { SkippedRows++; }
                }
                buffer.Clear();
                start = fs.Position;
                if (b < 0) break;
            }
            else buffer.Add((byte)b);
        }
        if (_offsets.Count == 0) throw new InvalidDataException($"{path}: no usable rows");
        Position = (0, 0);
        _order = Order(0);
    }

    public int Count => _offsets.Count;
    public int SkippedRows { get; }
    public (int Epoch, int Index) Position { get; private set; }

    public void Seek((int Epoch, int Index) position)
    {
        Position = position;
        _order = Order(position.Epoch);
    }

    private int[] Order(int epoch)
    {
        var order = Enumerable.Range(0, Count).ToArray();
        if (_shuffle) new Random(HashCode.Combine(_seed, epoch)).Shuffle(order);
        return order;
    }

    /// <summary>The next <paramref name="count"/> prompts, wrapping into the next epoch (and its permutation).</summary>
    public List<PromptRow> Next(int count)
    {
        var rows = new List<PromptRow>();
        while (rows.Count < count)
        {
            if (Position.Index >= Count) Seek((Position.Epoch + 1, 0));
            rows.Add(Read(_order[Position.Index]));
            Position = (Position.Epoch, Position.Index + 1);
        }
        return rows;
    }

    public PromptRow Read(int row)
    {
        using var fs = File.OpenRead(_path);
        fs.Position = _offsets[row];
        using var reader = new StreamReader(fs);
        return Parse(reader.ReadLine() ?? "", _lines[row]) with { Index = row };
    }

    private PromptRow Parse(string text, int line)
    {
        string Where() => $"{_path}:{line}";
        JsonObject o;
        try { o = JsonNode.Parse(text) as JsonObject ?? throw new JsonException("not an object"); }
        catch (JsonException e) { throw new InvalidDataException($"{Where()}: not a JSON object ({e.Message})"); }
        string? Str(string key) => o[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        var question = Str("question") ?? Str("prompt") ?? throw new InvalidDataException($"{Where()}: no 'question' string");
        var answer = Str("answer") ?? (o["answer"] is JsonValue n && n.TryGetValue<double>(out var d) ? d.ToString(System.Globalization.CultureInfo.InvariantCulture) : null)
            ?? throw new InvalidDataException($"{Where()}: no 'answer'");
        var dir = Path.GetDirectoryName(Path.GetFullPath(_path))!;
        var images = new List<string>();
        if (Str("image") is { } single) images.Add(single);
        if (o["images"] is JsonArray arr)
            foreach (var x in arr) images.Add(x is JsonValue v && v.TryGetValue<string>(out var p) ? p : throw new InvalidDataException($"{Where()}: 'images' must be paths"));
        images = images.Select(p => Path.IsPathRooted(p) ? p : Path.Combine(dir, p)).ToList();
        foreach (var p in images) if (!File.Exists(p)) throw new InvalidDataException($"{Where()}: image {p} does not exist");
        var choices = o["choices"] is JsonArray c ? c.Select(x => x?.ToString() ?? "").ToList() : null;
        var digits = o["image_digits"] is JsonArray dg ? dg.Select(x => x!.GetValue<int>()).ToList() : null;
        return new PromptRow(-1, question, answer, images, choices, digits);
    }
}
