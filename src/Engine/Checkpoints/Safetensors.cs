using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Checkpoints;

/// <summary>A checkpoint file or tensor that breaks the format or the expected layout.</summary>
public sealed class CheckpointException(string message) : InputException(message);

/// <summary>One tensor entry of a safetensors header.</summary>
public sealed record SafetensorInfo(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long Length => Shape.Aggregate(1L, (a, d) => a * d);
    public string ShapeString => "[" + string.Join(", ", Shape) + "]";

    public static int ElementSize(string dtype) => dtype switch
    {
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "F64" or "I64" or "U64" => 8,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => 0,
    };
}

/// <summary>
/// A memory-mapped .safetensors file: 8-byte little-endian header length, a JSON header of
/// {name: {dtype, shape, data_offsets}}, then the data. Opening validates the whole header (length, JSON, dtypes,
/// shapes, offsets in range, sizes matching shapes, no overlaps); reads convert bf16 / fp16 / fp32 to fp32.
/// </summary>
public sealed unsafe class SafetensorsFile : IDisposable
{
    /// <summary>Headers above this are refused as absurd (real ones are well under a megabyte per thousand tensors).</summary>
    public const long MaxHeaderBytes = 100L << 20;

    private readonly MemoryMappedFile? _map;
    private readonly MemoryMappedViewAccessor? _view;
    private readonly byte* _base;
    private readonly long _dataStart;

    private SafetensorsFile(string path, Dictionary<string, SafetensorInfo> tensors, IReadOnlyDictionary<string, string> metadata,
        MemoryMappedFile? map, MemoryMappedViewAccessor? view, long dataStart)
    {
        Path = path;
        Tensors = tensors;
        Metadata = metadata;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        if (view is not null)
        {
            byte* p = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            _base = p + view.PointerOffset;
        }
    }

    public string Path { get; }
    public IReadOnlyDictionary<string, SafetensorInfo> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    public static SafetensorsFile Open(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists) throw new FileNotFoundException($"checkpoint file not found: {path}", path);
        long fileLength = info.Length;
        if (fileLength < 8) throw new CheckpointException($"{path}: {fileLength} bytes is too short for a safetensors header");
        byte[] lengthBytes = new byte[8];
        using (var fs = File.OpenRead(path)) fs.ReadExactly(lengthBytes);
        long headerLength = BitConverter.ToInt64(lengthBytes);
        if (headerLength <= 0 || headerLength > MaxHeaderBytes)
            throw new CheckpointException($"{path}: header length {headerLength} is absurd (must be 1..{MaxHeaderBytes})");
        if (8 + headerLength > fileLength)
            throw new CheckpointException($"{path}: header length {headerLength} runs past the end of the {fileLength}-byte file (truncated?)");

        byte[] header = new byte[headerLength];
        using (var fs = File.OpenRead(path)) { fs.Position = 8; fs.ReadExactly(header); }
        JsonObject root;
        try { root = JsonNode.Parse(Encoding.UTF8.GetString(header).TrimEnd(' ', '\0')) as JsonObject ?? throw new JsonException("not an object"); }
        catch (JsonException e) { throw new CheckpointException($"{path}: the header is not a JSON object ({e.Message})"); }

        long dataLength = fileLength - 8 - headerLength;
        var tensors = new Dictionary<string, SafetensorInfo>(StringComparer.Ordinal);
        var metadata = new Dictionary<string, string>();
        foreach (var (name, node) in root)
        {
            if (name == "__metadata__")
            {
                if (node is JsonObject m)
                    foreach (var (k, v) in m) metadata[k] = v?.ToString() ?? "";
                continue;
            }
            tensors[name] = ParseEntry(path, name, node, dataLength);
        }

        var ordered = tensors.Values.Where(t => t.End > t.Begin).OrderBy(t => t.Begin).ToList();
        for (int i = 1; i < ordered.Count; i++)
            if (ordered[i].Begin < ordered[i - 1].End)
                throw new CheckpointException($"{path}: tensors '{ordered[i - 1].Name}' and '{ordered[i].Name}' overlap (bytes {ordered[i - 1].Begin}..{ordered[i - 1].End} and {ordered[i].Begin}..{ordered[i].End})");

        if (dataLength == 0) return new SafetensorsFile(path, tensors, metadata, null, null, 8 + headerLength);
        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        var view = map.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
        return new SafetensorsFile(path, tensors, metadata, map, view, 8 + headerLength);
    }

    private static SafetensorInfo ParseEntry(string path, string name, JsonNode? node, long dataLength)
    {
        CheckpointException Bad(string what) => new($"{path}: tensor '{name}': {what}");
        if (node is not JsonObject o) throw Bad("entry is not an object");
        var dtype = o["dtype"]?.GetValueKind() == JsonValueKind.String ? o["dtype"]!.GetValue<string>() : throw Bad("missing dtype");
        int size = SafetensorInfo.ElementSize(dtype);
        if (size == 0) throw Bad($"unknown dtype '{dtype}'");
        if (o["shape"] is not JsonArray shapeNode) throw Bad("missing shape");
        var shape = new long[shapeNode.Count];
        for (int i = 0; i < shape.Length; i++)
        {
            if (shapeNode[i] is not JsonValue v || !v.TryGetValue<long>(out var d) || d < 0) throw Bad($"shape {shapeNode.ToJsonString()} is not a list of non-negative integers");
            shape[i] = d;
        }
        if (o["data_offsets"] is not JsonArray off || off.Count != 2 || off[0] is not JsonValue b0 || off[1] is not JsonValue e0
            || !b0.TryGetValue<long>(out var begin) || !e0.TryGetValue<long>(out var end))
            throw Bad("data_offsets must be [begin, end]");
        if (begin < 0 || end < begin || end > dataLength)
            throw Bad($"data_offsets [{begin}, {end}] are outside the {dataLength} data bytes (truncated file?)");
        long elements;
        try { elements = shape.Aggregate(1L, (a, d) => checked(a * d)); }
        catch (OverflowException) { throw Bad($"shape {shapeNode.ToJsonString()} overflows"); }
        if (elements > long.MaxValue / size || elements * size != end - begin)
            throw Bad($"{end - begin} bytes do not hold shape {shapeNode.ToJsonString()} of {dtype} ({elements} x {size} bytes)");
        return new SafetensorInfo(name, dtype, shape, begin, end);
    }

    public SafetensorInfo Info(string name) =>
        Tensors.TryGetValue(name, out var t) ? t : throw new CheckpointException($"{Path}: no tensor '{name}'");

    /// <summary><paramref name="count"/> raw bytes of a tensor from byte <paramref name="offset"/> (valid while this file is open; any tensor size).</summary>
    public ReadOnlySpan<byte> Bytes(string name, long offset, int count)
    {
        var t = Info(name);
        if (offset < 0 || count < 0 || offset + count > t.End - t.Begin) throw new ArgumentOutOfRangeException(nameof(offset), $"{Path}: bytes [{offset}, {offset + count}) outside tensor '{name}'");
        return count == 0 ? [] : new ReadOnlySpan<byte>(_base + _dataStart + t.Begin + offset, count);
    }

    /// <summary>Reads a float tensor into fp32, converting from bf16 or fp16.</summary>
    public void ReadFloats(string name, Span<float> destination)
    {
        var t = Info(name);
        if (destination.Length != t.Length) throw new CheckpointException($"{Path}: tensor '{name}' has {t.Length} elements, {destination.Length} requested");
        if (t.DType is not ("F32" or "BF16" or "F16")) throw new CheckpointException($"{Path}: tensor '{name}' is {t.DType}; expected F32, BF16 or F16");
        int size = SafetensorInfo.ElementSize(t.DType);
        const int slice = 1 << 26; // elements per read: a tensor's bytes may pass 2 GiB (a 38B vocabulary in fp32)
        for (long at = 0; at < t.Length; at += slice)
        {
            int n = (int)Math.Min(slice, t.Length - at);
            Decode(Bytes(name, at * size, n * size), t.DType, destination.Slice((int)at, n));
        }
    }

    /// <summary>Stored values (F32, BF16 or F16 bytes, little-endian) into fp32: every reader of checkpoint data converts here.</summary>
    public static void Decode(ReadOnlySpan<byte> bytes, string dtype, Span<float> destination)
    {
        switch (dtype)
        {
            case "F32":
                System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).CopyTo(destination);
                break;
            case "BF16":
                var bf = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(bytes);
                for (int i = 0; i < bf.Length; i++) destination[i] = BFloat16.ToFloat(bf[i]);
                break;
            case "F16":
                var h = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(bytes);
                for (int i = 0; i < h.Length; i++) destination[i] = (float)h[i];
                break;
            default:
                throw new ArgumentException($"stored type {dtype}; expected F32, BF16 or F16");
        }
    }

    public float[] ReadFloats(string name)
    {
        var a = new float[checked((int)Info(name).Length)];
        ReadFloats(name, a);
        return a;
    }

    public void Dispose()
    {
        if (_view is not null)
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _view.Dispose();
        }
        _map?.Dispose();
    }

    /// <summary>
    /// Writes tensors (in the given order) to <paramref name="path"/> through a temporary file and a rename, so an
    /// existing file is never left half written. Data are stored in <paramref name="dtype"/> ("F32" or "BF16").
    /// </summary>
    public static void Write(string path, IEnumerable<(string Name, int[] Shape, float[] Data)> tensors, string dtype = "F32",
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        WriteStreamed(path, [.. list.Select(t => (t.Name, t.Shape))], i => list[i].Data, dtype, metadata);
    }

    /// <summary>
    /// Like <see cref="Write"/>, pulling each tensor's values from <paramref name="data"/> (by its index in
    /// <paramref name="layout"/>) only when its turn comes: the header is written from the shapes alone, so the host
    /// holds one tensor at a time (a 38B model's export never has the whole model in memory).
    /// </summary>
    public static void WriteStreamed(string path, IReadOnlyList<(string Name, int[] Shape)> layout, Func<int, float[]> data, string dtype = "F32",
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        if (dtype is not ("F32" or "BF16")) throw new ArgumentException($"can write F32 or BF16, not {dtype}");
        int size = dtype == "F32" ? 4 : 2;
        var header = new JsonObject();
        if (metadata is not null)
        {
            var m = new JsonObject();
            foreach (var (k, v) in metadata) m[k] = v;
            header["__metadata__"] = m;
        }
        long offset = 0;
        foreach (var (name, shape) in layout)
        {
            long bytes = shape.Aggregate(1L, (a, d) => a * d) * size;
            header[name] = new JsonObject
            {
                ["dtype"] = dtype,
                ["shape"] = new JsonArray(shape.Select(d => (JsonNode)d).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + bytes),
            };
            offset += bytes;
        }
        var headerBytes = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (headerBytes.Length + 7) / 8 * 8; // data starts 8-byte aligned
        var tmp = path + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                fs.Write(BitConverter.GetBytes((long)padded));
                fs.Write(headerBytes);
                for (int i = headerBytes.Length; i < padded; i++) fs.WriteByte((byte)' ');
                ushort[]? bits = null;
                for (int t = 0; t < layout.Count; t++)
                {
                    var (name, shape) = layout[t];
                    var values = data(t);
                    if (values.LongLength != shape.Aggregate(1L, (a, d) => a * d)) throw new ArgumentException($"tensor '{name}': {values.Length} values for shape [{string.Join(", ", shape)}]");
                    const int slice = 1 << 26; // elements per write: a tensor's bytes may pass 2 GiB
                    for (int at = 0; at < values.Length; at += slice)
                    {
                        int n = Math.Min(slice, values.Length - at);
                        if (dtype == "F32") { fs.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan(at, n))); continue; }
                        bits ??= new ushort[Math.Min(slice, values.Length)];
                        if (bits.Length < n) bits = new ushort[n];
                        for (int i = 0; i < n; i++) bits[i] = BFloat16.FromFloat(values[at + i]);
                        fs.Write(System.Runtime.InteropServices.MemoryMarshal.AsBytes(bits.AsSpan(0, n)));
                    }
                }
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, path, overwrite: true);
        }
        catch
        {
            File.Delete(tmp);
            throw;
        }
    }
}
