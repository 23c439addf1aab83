using R1V2.Native.Engine.Images;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Metadata.Profiles.Exif;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;

namespace R1V2.Native.Tests.Images;

public sealed class ImagePreprocessorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-img-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    /// <summary>InternVL's dynamic_preprocess grid choice written out literally: a set of (i, j), sorted by i x j.</summary>
    private static (int, int) ReferenceGrid(int width, int height, int minNum, int maxNum, int size)
    {
        var set = new HashSet<(int, int)>();
        for (int n = minNum; n <= maxNum; n++)
            for (int i = 1; i <= n; i++)
                for (int j = 1; j <= n; j++)
                    if (i * j <= maxNum && i * j >= minNum) set.Add((i, j));
        var ratios = set.OrderBy(r => r.Item1 * r.Item2).ThenBy(r => r.Item1).ToList();
        double aspect = (double)width / height, best = double.PositiveInfinity;
        var bestRatio = (1, 1);
        foreach (var r in ratios)
        {
            double diff = Math.Abs(aspect - (double)r.Item1 / r.Item2);
            if (diff < best) { best = diff; bestRatio = r; }
            else if (diff == best && width * height > 0.5 * size * size * r.Item1 * r.Item2) bestRatio = r;
        }
        return bestRatio;
    }

    [Fact]
    public void Grid_MatchesTheReferenceAlgorithm_OverManyAspectRatios()
    {
        var pre = new ImagePreprocessor(448, minTiles: 1, maxTiles: 12);
        var rng = new Random(3);
        int checkedCount = 0;
        for (int i = 0; i < 3000; i++)
        {
            int w = rng.Next(8, 4000), h = rng.Next(8, 4000);
            if (i % 3 == 0) h = w * rng.Next(1, 5) / rng.Next(1, 5) + 1; // near-simple ratios, where ties happen
            Assert.Equal(ReferenceGrid(w, h, 1, 12, 448), pre.Grid(w, h));
            checkedCount++;
        }
        foreach (var (w, h) in new[] { (448, 448), (896, 448), (448, 1344), (1000, 1000), (800, 800), (3000, 100), (100, 3000), (1793, 897) })
            Assert.Equal(ReferenceGrid(w, h, 1, 12, 448), pre.Grid(w, h));
        var six = new ImagePreprocessor(448, minTiles: 2, maxTiles: 6);
        for (int w = 100; w < 2000; w += 97)
            for (int h = 100; h < 2000; h += 89)
                Assert.Equal(ReferenceGrid(w, h, 2, 6, 448), six.Grid(w, h));
        Assert.Equal(3000, checkedCount);
    }

    private string Save(Image<Rgb24> image, string name)
    {
        var path = Path.Combine(_dir, name);
        image.Save(path);
        return path;
    }

    private static Image<Rgb24> Gradient(int w, int h)
    {
        var img = new Image<Rgb24>(w, h);
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                img[x, y] = new Rgb24((byte)(x * 255 / w), (byte)(y * 255 / h), 128);
        return img;
    }

    [Theory]
    [InlineData("a.png")]
    [InlineData("a.bmp")]
    [InlineData("a.webp")]
    [InlineData("a.gif")]
    [InlineData("a.jpg")]
    public void Load_ReadsEveryFormat_AsOneExactTile(string name)
    {
        using var img = Gradient(28, 28);
        var path = Save(img, name);
        var (pixels, tiles) = new ImagePreprocessor(28).Load(path);
        Assert.Equal(1, tiles);
        Assert.Equal(3 * 28 * 28, pixels.Length);
        // Red rises left to right in every format: check the normalised channel at both ends of the first row.
        Assert.True(pixels[27] > pixels[0] + 3, $"{name}: red channel does not rise across the row");
        if (name is "a.png" or "a.bmp") // lossless formats (the WebP default is lossy, GIF is palettised)
            Assert.Equal((0 / 255f - ImagePreprocessor.Mean[0]) / ImagePreprocessor.Std[0], pixels[0], 4);
    }

    [Fact]
    public void AnAnimatedGif_GivesItsFirstFrame_FromAFileOrFromBytes()
    {
        using var gif = new Image<Rgb24>(28, 28, new Rgb24(250, 0, 0));       // frame 0: red
        using (var blue = new Image<Rgb24>(28, 28, new Rgb24(0, 0, 250)))     // frame 1: blue
            gif.Frames.AddFrame(blue.Frames.RootFrame);
        var path = Path.Combine(_dir, "anim.gif");
        gif.SaveAsGif(path);
        var pre = new ImagePreprocessor(28);
        foreach (var (pixels, tiles) in new[] { pre.Load(path), pre.Load(File.ReadAllBytes(path), "anim.gif") })
        {
            Assert.Equal(1, tiles);
            float red = pixels[0], blueChannel = pixels[2 * 28 * 28];
            Assert.True(red > 1.5f && blueChannel < 0f, $"expected the red first frame, got red {red}, blue {blueChannel}");
        }
    }

    [Fact]
    public void Load_AppliesExifOrientation()
    {
        using var img = Gradient(40, 20);
        img.Metadata.ExifProfile = new ExifProfile();
        img.Metadata.ExifProfile.SetValue(ExifTag.Orientation, (ushort)6); // rotate 90 degrees clockwise to display
        var path = Path.Combine(_dir, "rot.jpg");
        img.SaveAsJpeg(path);
        var pre = new ImagePreprocessor(448);
        using var loaded = Image.Load<Rgb24>(path);
        Assert.Equal((40, 20), (loaded.Width, loaded.Height));
        loaded.Mutate(x => x.AutoOrient());
        Assert.Equal((20, 40), (loaded.Width, loaded.Height));
        var (_, tiles) = pre.Load(path);
        Assert.Equal(pre.Grid(20, 40) is (1, 1) ? 1 : pre.Grid(20, 40).Cols * pre.Grid(20, 40).Rows + 1, tiles);
    }

    [Fact]
    public void LoadAll_BatchesTheTilesOfSeveralImages()
    {
        using var a = Gradient(28, 28);
        using var b = Gradient(60, 28);
        var pre = new ImagePreprocessor(28);
        var (pixels, tiles) = pre.LoadAll([Save(a, "a.png"), Save(b, "b.png")]);
        Assert.Equal([1, 3], tiles); // 60 x 28 -> a 2 x 1 grid plus the thumbnail
        Assert.Equal(4 * 3 * 28 * 28, pixels.Length);
    }

    [Fact]
    public void CorruptOrMissingFiles_AreErrorsNamingTheFile()
    {
        var bad = Path.Combine(_dir, "bad.png");
        File.WriteAllBytes(bad, [0x89, 0x50, 0x4E, 0x47, 1, 2, 3, 4, 5]);
        var e = Assert.Throws<InvalidDataException>(() => new ImagePreprocessor(28).Load(bad));
        Assert.Contains(bad, e.Message);
        var text = Path.Combine(_dir, "notes.txt");
        File.WriteAllText(text, "not an image");
        Assert.Contains(text, Assert.Throws<InvalidDataException>(() => new ImagePreprocessor(28).Load(text)).Message);
        Assert.Throws<FileNotFoundException>(() => new ImagePreprocessor(28).Load(Path.Combine(_dir, "none.png")));
    }

    [Fact]
    public void HugeDeclaredDimensions_AreRefusedBeforeDecoding()
    {
        // A valid PNG whose header claims 60000 x 60000 pixels: Identify reads only the header.
        using var img = new Image<Rgb24>(1, 1);
        var path = Path.Combine(_dir, "huge.png");
        img.SaveAsPng(path);
        var bytes = File.ReadAllBytes(path);
        // IHDR width and height are big-endian at bytes 16..23; the CRC after it is recomputed.
        BitConverter.GetBytes(System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(60000)).CopyTo(bytes, 16);
        BitConverter.GetBytes(System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(60000)).CopyTo(bytes, 20);
        uint crc = Crc32(bytes.AsSpan(12, 17));
        BitConverter.GetBytes(System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(crc)).CopyTo(bytes, 29);
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<InvalidDataException>(() => new ImagePreprocessor(448).Load(path));
        Assert.Contains("60000 x 60000 pixels is outside the limit", e.Message);
    }

    private static uint Crc32(ReadOnlySpan<byte> data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (var b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (uint)-(int)(crc & 1));
        }
        return ~crc;
    }
}
