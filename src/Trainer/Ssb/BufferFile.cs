using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;

namespace R1V2.Native.Trainer.Ssb;

/// <summary>
/// The Selective Sample Buffer in a checkpoint: buffer.bin, a little-endian length-prefixed file. Each rollout keeps
/// its response ids, old log-probs, reward, advantage and birth step, and a reference to its prompt instead of the
/// prompt's tokens and pixels: the data file's row index and a SHA-256 of the prompt ids and pixel values it was
/// sampled from. Resuming rebuilds each distinct prompt once from the data file and refuses one whose hash differs
/// (the data file or an image changed), naming the file and row.
/// <code>
/// "R1V2SSB1" | data path (int32 length + UTF-8) | count (int32)
/// per rollout: row (int32) | prompt sha256 (32 bytes) | tiles (int32) | n (int32) | ids (n x int32) | old log-probs (n x fp32)
///              | reward (fp64) | advantage (fp64) | born (int32)
/// </code>
/// </summary>
public static class BufferFile
{
    public const string Name = "buffer.bin";
    private static readonly byte[] Magic = "R1V2SSB1"u8.ToArray();

    public static void Write(string path, string dataPath, IReadOnlyList<Rollout> items)
    {
        var hashes = new Dictionary<(int[], float[]?), byte[]>(new ReferencePair());
        using var fs = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16);
        using var w = new BinaryWriter(fs, Encoding.UTF8);
        w.Write(Magic);
        WriteString(w, dataPath);
        w.Write(items.Count);
        foreach (var r in items)
        {
            if (!hashes.TryGetValue((r.PromptIds, r.Pixels), out var hash)) hashes[(r.PromptIds, r.Pixels)] = hash = PromptHash(r.PromptIds, r.Pixels);
            w.Write(r.Prompt);
            w.Write(hash);
            w.Write(r.Tiles);
            w.Write(r.Response.Length);
            w.Write(MemoryMarshal.AsBytes(r.Response.AsSpan()));
            if (r.OldLogProbs.Length != r.Response.Length) throw new ArgumentException($"rollout of row {r.Prompt}: {r.OldLogProbs.Length} old log-probs for {r.Response.Length} tokens");
            w.Write(MemoryMarshal.AsBytes(r.OldLogProbs.AsSpan()));
            w.Write(r.Reward);
            w.Write(r.Advantage);
            w.Write(r.Born);
        }
    }

    /// <summary>
    /// Reads the rollouts back, rebuilding each distinct prompt row once through <paramref name="prompt"/> (its
    /// chat-templated ids, pixels and tiles from the data file) and checking it against the stored hash.
    /// </summary>
    public static List<Rollout> Read(string path, string dataPath, Func<int, (int[] Ids, float[]? Pixels, int Tiles)> prompt)
    {
        if (!File.Exists(path)) throw new InvalidDataException($"checkpoint has no {Name}: {path}");
        using var fs = File.OpenRead(path);
        using var r = new BinaryReader(fs, Encoding.UTF8);
        try
        {
            if (!r.ReadBytes(Magic.Length).AsSpan().SequenceEqual(Magic)) throw new InvalidDataException($"{path}: not a sample buffer file (bad magic)");
            string stored = ReadString(r, path); // where they were sampled from; the prompt hashes are what is checked
            int count = r.ReadInt32();
            if (count < 0) throw new InvalidDataException($"{path}: negative rollout count {count}");
            var prompts = new Dictionary<int, (int[] Ids, float[]? Pixels, int Tiles, byte[] Hash)>();
            var items = new List<Rollout>(Math.Min(count, 1 << 16));
            for (int i = 0; i < count; i++)
            {
                int row = r.ReadInt32();
                var hash = r.ReadBytes(32);
                int tiles = r.ReadInt32(), n = r.ReadInt32();
                if (n < 0 || n > 1 << 28 || (long)n * 8 > fs.Length - fs.Position) throw new InvalidDataException($"{path}: rollout {i} claims {n} tokens, more than the file holds");
                var ids = MemoryMarshal.Cast<byte, int>(r.ReadBytes(n * 4)).ToArray();
                var old = MemoryMarshal.Cast<byte, float>(r.ReadBytes(n * 4)).ToArray();
                double reward = r.ReadDouble(), advantage = r.ReadDouble();
                int born = r.ReadInt32();
                if (!prompts.TryGetValue(row, out var p))
                {
                    var (pids, pixels, ptiles) = prompt(row);
                    prompts[row] = p = (pids, pixels, ptiles, PromptHash(pids, pixels));
                }
                if (!p.Hash.AsSpan().SequenceEqual(hash) || p.Tiles != tiles)
                    throw new InvalidDataException($"{path}: buffered rollout {i} was sampled from row {row} of {stored}; row {row} of {dataPath} no longer gives the same prompt (the data file or one of its images changed since the checkpoint)");
                items.Add(new Rollout(row, p.Ids, p.Pixels, p.Tiles, ids, old, reward, advantage, born));
            }
            if (fs.Position != fs.Length) throw new InvalidDataException($"{path}: {fs.Length - fs.Position} bytes after the last rollout");
            return items;
        }
        catch (EndOfStreamException) { throw new InvalidDataException($"{path}: truncated"); }
    }

    /// <summary>SHA-256 of a prompt's token ids and pixel values (their bytes, little-endian).</summary>
    public static byte[] PromptHash(int[] ids, float[]? pixels)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(BitConverter.GetBytes(ids.Length));
        sha.AppendData(MemoryMarshal.AsBytes(ids.AsSpan()));
        sha.AppendData(BitConverter.GetBytes(pixels?.Length ?? -1));
        if (pixels is not null) sha.AppendData(MemoryMarshal.AsBytes(pixels.AsSpan()));
        return sha.GetHashAndReset();
    }

    private static void WriteString(BinaryWriter w, string s)
    {
        var bytes = Encoding.UTF8.GetBytes(s);
        w.Write(bytes.Length);
        w.Write(bytes);
    }

    private static string ReadString(BinaryReader r, string path)
    {
        int n = r.ReadInt32();
        if (n < 0 || n > 1 << 16) throw new InvalidDataException($"{path}: a string of {n} bytes");
        return Encoding.UTF8.GetString(r.ReadBytes(n));
    }

    /// <summary>Prompt arrays by reference: a group's rollouts share them, so each distinct prompt is hashed once.</summary>
    private sealed class ReferencePair : IEqualityComparer<(int[], float[]?)>
    {
        public bool Equals((int[], float[]?) a, (int[], float[]?) b) => ReferenceEquals(a.Item1, b.Item1) && ReferenceEquals(a.Item2, b.Item2);
        public int GetHashCode((int[], float[]?) k) =>
            HashCode.Combine(System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode(k.Item1), k.Item2 is null ? 0 : System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode(k.Item2));
    }
}
