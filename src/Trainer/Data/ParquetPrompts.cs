using System.Text.Json.Serialization;
using Parquet.Serialization;

namespace R1V2.Native.Trainer.Data;

/// <summary>One Parquet row of a prompt dataset (HF-style column names).</summary>
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

/// <summary>
/// Prompts from a Parquet file (Parquet.Net): row groups are read at open; image bytes are written once to
/// <c>FILE.images/row-N.bin</c> beside the file so that the image pipeline reads them like any file. A row without a
/// question or answer is an error naming file and row, or with skip-bad-rows is left out and counted.
/// </summary>
public sealed class ParquetPrompts : IRowSource<PromptRow>
{
    private readonly List<PromptRow> _rows = [];

    public ParquetPrompts(string path, bool skipBadRows)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset not found: {path}", path);
        IList<ParquetPromptRecord> records;
        try { records = ParquetSerializer.DeserializeAsync<ParquetPromptRecord>(path).GetAwaiter().GetResult().Data; }
        catch (Exception e) when (e is not OutOfMemoryException) { throw new InvalidDataException($"{path}: not a readable prompt Parquet file ({e.Message})", e); }
        var imageDir = path + ".images";
        for (int i = 0; i < records.Count; i++)
        {
            var r = records[i];
            if (string.IsNullOrEmpty(r.Question) || r.Answer is null)
            {
                if (skipBadRows) { SkippedRows++; continue; }
                throw new InvalidDataException($"{path}: row {i} has no question or no answer");
            }
            var images = new List<string>();
            if (r.Image is { Length: > 0 } bytes)
            {
                Directory.CreateDirectory(imageDir);
                var file = Path.Combine(imageDir, $"row-{i}.bin");
                if (!File.Exists(file) || new FileInfo(file).Length != bytes.Length) File.WriteAllBytes(file, bytes);
                images.Add(file);
            }
            _rows.Add(new PromptRow(-1, r.Question, r.Answer, images, r.Choices, r.ImageDigits, r.ImageObjects));
        }
        if (_rows.Count == 0) throw new InvalidDataException($"{path}: no usable rows");
    }

    public int Count => _rows.Count;
    public int SkippedRows { get; private set; }
    public PromptRow Read(int row) => _rows[row];

    /// <summary>Writes prompts as a Parquet file in the same layout (tests and dataset tools).</summary>
    public static void Write(string path, IEnumerable<ParquetPromptRecord> rows) =>
        ParquetSerializer.SerializeAsync(rows, path).GetAwaiter().GetResult();
}
