using System.Collections;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Serialization;
using Parquet;
using Parquet.Serialization;

namespace R1V2.Native.Trainer.Data;

/// <summary>One Parquet row of a prompt dataset as written by <see cref="ParquetRows.WritePrompts"/> (HF-style column names).</summary>
public sealed class ParquetPromptRecord
{
    [JsonPropertyName("question")] public string? Question { get; set; }
    [JsonPropertyName("answer")] public string? Answer { get; set; }
    /// <summary>The image's encoded bytes (PNG, JPEG, ...), or null for a text-only prompt.</summary>
    [JsonPropertyName("image")] public byte[]? Image { get; set; }
    [JsonPropertyName("choices")] public List<string>? Choices { get; set; }
    [JsonPropertyName("image_digits")] public List<int>? ImageDigits { get; set; }
    [JsonPropertyName("image_objects")] public List<string>? ImageObjects { get; set; }
}

/// <summary>One Parquet row of a preference dataset.</summary>
public sealed class ParquetPairRecord
{
    [JsonPropertyName("prompt")] public string? Prompt { get; set; }
    [JsonPropertyName("image")] public byte[]? Image { get; set; }
    [JsonPropertyName("chosen")] public string? Chosen { get; set; }
    [JsonPropertyName("rejected")] public string? Rejected { get; set; }
}

/// <summary>What a row parser sees: the row's columns, where it is (for errors) and how to get its images as files.</summary>
public sealed class ParquetRow(IDictionary<string, object?> columns, string where, Func<IDictionary<string, object?>, string, List<string>> images)
{
    public string Where => where;
    public object? this[string column] => columns.TryGetValue(column, out var v) ? Plain(v) : null;

    /// <summary>Untyped Parquet values as plain CLR ones: strings and byte arrays for the memory slices the reader returns.</summary>
    public static object? Plain(object? v) => v switch
    {
        ReadOnlyMemory<char> m => m.ToString(),
        Memory<char> m => m.ToString(),
        ReadOnlyMemory<byte> m => m.ToArray(),
        Memory<byte> m => m.ToArray(),
        _ => v,
    };

    public string? String(params string[] names)
    {
        foreach (var n in names)
            switch (this[n])
            {
                case null: continue;
                case string s: return s;
                case var v when v.GetType().IsPrimitive || v is decimal: return Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture);
                default: throw new InvalidDataException($"{where}: column '{n}' must be a string");
            }
        return null;
    }

    public List<T>? List<T>(string name)
    {
        var v = this[name];
        if (v is null) return null;
        if (v is string || v is not IEnumerable e) throw new InvalidDataException($"{where}: column '{name}' must be a list of {typeof(T).Name}");
        var list = new List<T>();
        foreach (var item in e)
        {
            var x = Plain(item);
            try { list.Add((T)Convert.ChangeType(x, typeof(T), System.Globalization.CultureInfo.InvariantCulture)!); }
            catch (Exception ex) when (ex is InvalidCastException or FormatException or OverflowException or ArgumentNullException)
            { throw new InvalidDataException($"{where}: column '{name}' must be a list of {typeof(T).Name}, found {x ?? "null"} ({x?.GetType().FullName})"); }
        }
        return list;
    }

    /// <summary>The row's images as files: column "image" or "images" holding bytes, a path, or an HF image struct {bytes, path}, or a list of these.</summary>
    public List<string> Images() => images(columns, where);
}

/// <summary>
/// A Parquet file read one row group at a time (Parquet.Net untyped deserialisation, so any column layout and nested HF
/// image structs work). Opening makes one validating pass without keeping rows; reading loads the row's group (one
/// group is cached). Image bytes are written once to a per-file cache directory so the image pipeline reads them like
/// any file; image paths are resolved against the Parquet file's directory. A bad row is an error naming file and row,
/// or with skip-bad-rows is left out and counted.
/// </summary>
public sealed class ParquetRows<T> : IRowSource<T>
{
    private readonly string _path;
    private readonly Func<ParquetRow, T> _parse;
    private readonly List<int> _rows = [];      // file row of each usable row
    private readonly long[] _groupStart;         // first file row of each row group, plus the total
    private readonly string _imageCache;
    private bool _validating;
    private int _cachedGroup = -1;
    private List<IDictionary<string, object?>> _cached = [];

    public ParquetRows(string path, Func<ParquetRow, T> parse, bool skipBadRows)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset not found: {path}", path);
        _path = path;
        _parse = parse;
        var info = new FileInfo(path);
        var key = Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes($"{info.FullName}|{info.Length}|{info.LastWriteTimeUtc.Ticks}")))[..16];
        _imageCache = Path.Combine(Path.GetTempPath(), "r1v2-parquet-images", key);
        try
        {
            var reader = ParquetReader.CreateAsync(path).GetAwaiter().GetResult();
            try
            {
                _groupStart = new long[reader.RowGroupCount + 1];
                for (int g = 0; g < reader.RowGroupCount; g++) _groupStart[g + 1] = _groupStart[g] + reader.RowGroups[g].RowCount;
            }
            finally { reader.DisposeAsync().AsTask().GetAwaiter().GetResult(); }
        }
        catch (Exception e) when (e is not (OutOfMemoryException or FileNotFoundException))
        {
            throw new InvalidDataException($"{path}: not a readable Parquet file ({e.Message})", e);
        }
        _validating = true;
        for (int g = 0; g + 1 < _groupStart.Length; g++)
        {
            var rows = Group(g);
            for (int i = 0; i < rows.Count; i++)
            {
                int fileRow = (int)(_groupStart[g] + i);
                try { Parse(rows[i], fileRow); _rows.Add(fileRow); }
                catch (InvalidDataException) when (skipBadRows) { SkippedRows++; }
            }
        }
        _validating = false;
        if (_rows.Count == 0) throw new InvalidDataException($"{path}: no usable rows");
    }

    public int Count => _rows.Count;
    public int SkippedRows { get; }

    public T Read(int row)
    {
        int fileRow = _rows[row];
        int g = Array.FindLastIndex(_groupStart, s => s <= fileRow);
        return Parse(Group(g)[(int)(fileRow - _groupStart[g])], fileRow);
    }

    private T Parse(IDictionary<string, object?> columns, int fileRow) => _parse(new ParquetRow(columns, $"{_path}: row {fileRow}", ImagesOf));

    private List<IDictionary<string, object?>> Group(int g)
    {
        if (g == _cachedGroup) return _cached;
        try
        {
            using var stream = File.OpenRead(_path);
            var result = ParquetSerializer.DeserializeUntypedAsync(stream, rowGroupIndex: g).GetAwaiter().GetResult();
            _cached = result.Data.Select(d => (IDictionary<string, object?>)d.ToDictionary(kv => kv.Key, kv => (object?)kv.Value, StringComparer.Ordinal)).ToList();
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new InvalidDataException($"{_path}: row group {g} could not be read ({e.Message})", e);
        }
        _cachedGroup = g;
        return _cached;
    }

    private List<string> ImagesOf(IDictionary<string, object?> columns, string where)
    {
        var files = new List<string>();
        var dir = Path.GetDirectoryName(Path.GetFullPath(_path))!;
        int n = 0;
        void Add(object? value)
        {
            var v = ParquetRow.Plain(value);
            switch (v)
            {
                case null: return;
                case byte[] bytes: files.Add(Materialise(bytes)); return;
                case string p: files.Add(Resolve(p)); return;
                case IDictionary<string, object?> s:
                    if (s.TryGetValue("bytes", out var b) && ParquetRow.Plain(b) is byte[] { Length: > 0 } data) files.Add(Materialise(data));
                    else if (s.TryGetValue("path", out var q) && ParquetRow.Plain(q) is string { Length: > 0 } path) files.Add(Resolve(path));
                    else throw new InvalidDataException($"{where}: image struct has neither bytes nor path");
                    return;
                case IDictionary other: Add(other.Keys.Cast<object>().ToDictionary(k => k.ToString()!, k => other[k])); return;
                case IEnumerable list: foreach (var x in list) Add(x); return;
                default: throw new InvalidDataException($"{where}: an image must be bytes, a path or a {{bytes, path}} struct, found {v.GetType().Name}");
            }
        }
        string Materialise(byte[] bytes)
        {
            var file = Path.Combine(_imageCache, $"row-{where[(where.LastIndexOf(' ') + 1)..]}-{n++}.bin");
            if (_validating) return file;
            Directory.CreateDirectory(_imageCache);
            if (!File.Exists(file) || new FileInfo(file).Length != bytes.Length)
            {
                File.WriteAllBytes(file + ".tmp", bytes);
                File.Move(file + ".tmp", file, overwrite: true);
            }
            return file;
        }
        string Resolve(string p)
        {
            var full = Path.IsPathRooted(p) ? p : Path.Combine(dir, p);
            if (!File.Exists(full)) throw new InvalidDataException($"{where}: image {full} does not exist");
            return full;
        }
        Add(columns.TryGetValue("image", out var one) ? one : null);
        Add(columns.TryGetValue("images", out var many) ? many : null);
        return files;
    }
}

/// <summary>Writers for Parquet datasets in the layout the readers expect (tests and dataset tools).</summary>
public static class ParquetRows
{
    public static void WritePrompts(string path, IEnumerable<ParquetPromptRecord> rows, int rowGroupSize = 1 << 20) => Write(path, rows, rowGroupSize);

    public static void WritePairs(string path, IEnumerable<ParquetPairRecord> rows, int rowGroupSize = 1 << 20) => Write(path, rows, rowGroupSize);

    /// <summary>Any record type (nested classes become structs, lists become lists), written atomically.</summary>
    public static void Write<T>(string path, IEnumerable<T> rows, int rowGroupSize = 1 << 20)
    {
        ParquetSerializer.SerializeAsync(rows, path + ".tmp", new ParquetOptions { RowGroupSize = rowGroupSize }).GetAwaiter().GetResult();
        File.Move(path + ".tmp", path, overwrite: true);
    }
}
