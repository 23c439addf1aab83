using System.Text.Json;
using System.Text.Json.Nodes;

namespace R1V2.Native.Trainer.Data;

/// <summary>Rows that can be counted and read by number.</summary>
public interface IRowSource<out T>
{
    int Count { get; }
    int SkippedRows { get; }
    T Read(int row);
}

/// <summary>
/// A seeded permutation of a row source per epoch, read in order; the position (epoch, index) is what checkpoints save.
/// </summary>
public sealed class ShuffledRows<T>(IRowSource<T> source, int seed, bool shuffle)
{
    private int[] _order = Order(source.Count, seed, shuffle, 0);

    public IRowSource<T> Source => source;
    public (int Epoch, int Index) Position { get; private set; }

    private static int[] Order(int count, int seed, bool shuffle, int epoch)
    {
        var order = Enumerable.Range(0, count).ToArray();
        if (shuffle) new Random(R1V2.Native.Engine.Seeds.ForRandom(seed, epoch)).Shuffle(order);
        return order;
    }

    public void Seek((int Epoch, int Index) position)
    {
        Position = position;
        _order = Order(source.Count, seed, shuffle, position.Epoch);
    }

    /// <summary>The next <paramref name="count"/> rows with their row numbers, wrapping into the next epoch.</summary>
    public List<(int Row, T Item)> Next(int count)
    {
        var rows = new List<(int, T)>();
        while (rows.Count < count)
        {
            if (Position.Index >= source.Count) Seek((Position.Epoch + 1, 0));
            int row = _order[Position.Index];
            rows.Add((row, source.Read(row)));
            Position = (Position.Epoch, Position.Index + 1);
        }
        return rows;
    }
}

/// <summary>
/// A JSONL file indexed by byte offset in one validating pass; rows are parsed again when read. A bad row is an
/// error naming file and line, or with skip-bad-rows is left out and counted.
/// </summary>
public sealed class JsonlRows<T> : IRowSource<T>
{
    private readonly string _path;
    private readonly Func<JsonObject, Func<string>, T> _parse;
    private readonly List<long> _offsets = [];
    private readonly List<int> _lines = [];

    public JsonlRows(string path, Func<JsonObject, Func<string>, T> parse, bool skipBadRows)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset not found: {path}", path);
        _path = path;
        _parse = parse;
        var bytes = File.ReadAllBytes(path); // one pass to index lines; rows are parsed again on demand
        int line = 0;
        for (long start = 0; start < bytes.Length;)
        {
            long end = Array.IndexOf(bytes, (byte)'\n', (int)start);
            if (end < 0) end = bytes.Length;
            line++;
            var text = System.Text.Encoding.UTF8.GetString(bytes, (int)start, (int)(end - start));
            if (text.Trim().Length > 0)
            {
                try
                {
                    ParseLine(text, line);
                    _offsets.Add(start);
                    _lines.Add(line);
                }
                catch (InvalidDataException) when (skipBadRows) { SkippedRows++; }
            }
            start = end + 1;
        }
        if (_offsets.Count == 0) throw new InvalidDataException($"{path}: no usable rows");
    }

    public int Count => _offsets.Count;
    public int SkippedRows { get; }

    public T Read(int row)
    {
        using var fs = File.OpenRead(_path);
        fs.Position = _offsets[row];
        using var reader = new StreamReader(fs);
        return ParseLine(reader.ReadLine() ?? "", _lines[row]);
    }

    private T ParseLine(string text, int line)
    {
        string Where() => $"{_path}:{line}";
        JsonObject o;
        try { o = JsonNode.Parse(text) as JsonObject ?? throw new JsonException("not an object"); }
        catch (JsonException e) { throw new InvalidDataException($"{Where()}: not a JSON object ({e.Message})"); }
        return _parse(o, Where);
    }

    /// <summary>Image paths of a row ("image" and/or "images"), resolved against the file's folder and checked.</summary>
    public static List<string> Images(JsonObject o, string file, Func<string> where)
    {
        var dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(file))!;
        var images = new List<string>();
        if (o["image"] is JsonValue single && single.TryGetValue<string>(out var one)) images.Add(one);
        if (o["images"] is JsonArray arr)
            foreach (var x in arr) images.Add(x is JsonValue v && v.TryGetValue<string>(out var p) ? p : throw new InvalidDataException($"{where()}: 'images' must be paths"));
        images = images.Select(p => System.IO.Path.IsPathRooted(p) ? p : System.IO.Path.Combine(dir, p)).ToList();
        foreach (var p in images) if (!File.Exists(p)) throw new InvalidDataException($"{where()}: image {p} does not exist");
        return images;
    }

    public static string? String(JsonObject o, string key) => o[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
}
