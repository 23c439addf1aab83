using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;

namespace R1V2.Native.Engine.Images;

/// <summary>
/// InternVL image preprocessing: RGB, dynamic tiling into image_size tiles (the grid whose aspect ratio is closest to
/// the image's, min..max tiles, ties to the later grid when the image is large enough), bicubic resize, row-major
/// crops, a thumbnail when there is more than one tile, ImageNet normalisation, channels first. An image of exactly
/// image_size x image_size is one tile with no resize. Files are size-checked with Identify before decoding.
/// </summary>
public sealed class ImagePreprocessor(int tileSize, int minTiles = 1, int maxTiles = 12, bool thumbnail = true)
{
    public static readonly float[] Mean = [0.485f, 0.456f, 0.406f];
    public static readonly float[] Std = [0.229f, 0.224f, 0.225f];

    public const long MaxFileBytes = 64L << 20;

    /// <summary>Decoding that stops after the first frame of an animated GIF or a multi-page TIFF (the model sees one frame).</summary>
    private static readonly Configuration FirstFrameOnly = MakeFirstFrameOnly();

    private static Configuration MakeFirstFrameOnly()
    {
        var c = Configuration.Default.Clone();
        c.ImageFormatsManager.SetDecoder(SixLabors.ImageSharp.Formats.Gif.GifFormat.Instance,
            new SixLabors.ImageSharp.Formats.Gif.GifDecoder { DecodingMode = SixLabors.ImageSharp.Metadata.FrameDecodingMode.First });
        c.ImageFormatsManager.SetDecoder(SixLabors.ImageSharp.Formats.Tiff.TiffFormat.Instance,
            new SixLabors.ImageSharp.Formats.Tiff.TiffDecoder { DecodingMode = SixLabors.ImageSharp.Metadata.FrameDecodingMode.First });
        return c;
    }
    public const long MaxPixels = 64L << 20;

    public int TileSize { get; } = tileSize;

    /// <summary>The (columns, rows) tile grid for a width x height image.</summary>
    public (int Cols, int Rows) Grid(int width, int height)
    {
        double aspect = (double)width / height;
        var candidates = new List<(int, int)>();
        for (int n = minTiles; n <= maxTiles; n++)
            for (int i = 1; i <= n; i++)
                for (int j = 1; j <= n; j++)
                    if (i * j <= maxTiles && i * j >= minTiles && !candidates.Contains((i, j))) candidates.Add((i, j));
        candidates.Sort((a, b) => (a.Item1 * a.Item2).CompareTo(b.Item1 * b.Item2));
        var best = (1, 1);
        double bestDiff = double.PositiveInfinity;
        long area = (long)width * height;
        foreach (var (i, j) in candidates)
        {
            double diff = Math.Abs(aspect - (double)i / j);
            if (diff < bestDiff) { bestDiff = diff; best = (i, j); }
            else if (diff == bestDiff && area > 0.5 * TileSize * TileSize * i * j) best = (i, j);
        }
        return best;
    }

    /// <summary>Loads and tiles one image file: pixel values [tiles, 3, S, S] and the tile count.</summary>
    public (float[] Pixels, int Tiles) Load(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists) throw new FileNotFoundException($"image not found: {path}", path);
        if (info.Length > MaxFileBytes) throw new InvalidDataException($"{path}: {info.Length} bytes is above the {MaxFileBytes}-byte limit");
        IImageInfo? header;
        try { header = Image.Identify(path); }
        catch (Exception e) when (e is UnknownImageFormatException or InvalidImageContentException or NotSupportedException)
        { throw new InvalidDataException($"{path}: not a readable image ({e.Message})", e); }
        if (header is null) throw new InvalidDataException($"{path}: unknown or unsupported image format");
        if ((long)header.Width * header.Height > MaxPixels || header.Width <= 0 || header.Height <= 0)
            throw new InvalidDataException($"{path}: {header.Width} x {header.Height} pixels is outside the limit of {MaxPixels} pixels");
        try
        {
            using var loaded = Image.Load<Rgb24>(FirstFrameOnly, path);
            using var image = loaded.Frames.Count > 1 ? loaded.Frames.CloneFrame(0) : loaded.Clone(); // animations: the first frame
            image.Mutate(x => x.AutoOrient());
            return Tile(image);
        }
        catch (Exception e) when (e is UnknownImageFormatException or InvalidImageContentException or ImageFormatException or NotSupportedException)
        { throw new InvalidDataException($"{path}: corrupt image ({e.Message})", e); }
    }

    /// <summary>
    /// Loads and tiles an image held in memory (e.g. a data URL's bytes); <paramref name="name"/> names it in errors and
    /// <paramref name="maxPixels"/> bounds its width x height before it is decoded.
    /// </summary>
    public (float[] Pixels, int Tiles) Load(byte[] data, string name, long maxPixels = MaxPixels)
    {
        IImageInfo? header;
        try { using var probe = new MemoryStream(data, writable: false); header = Image.Identify(probe); }
        catch (Exception e) when (e is UnknownImageFormatException or InvalidImageContentException or NotSupportedException)
        { throw new InvalidDataException($"{name}: not a readable image ({e.Message})", e); }
        if (header is null) throw new InvalidDataException($"{name}: unknown or unsupported image format");
        if ((long)header.Width * header.Height > maxPixels || header.Width <= 0 || header.Height <= 0)
            throw new InvalidDataException($"{name}: {header.Width} x {header.Height} pixels is outside the limit of {maxPixels} pixels");
        try
        {
            using var loaded = Image.Load<Rgb24>(FirstFrameOnly, data);
            using var image = loaded.Frames.Count > 1 ? loaded.Frames.CloneFrame(0) : loaded.Clone();
            image.Mutate(x => x.AutoOrient());
            return Tile(image);
        }
        catch (Exception e) when (e is UnknownImageFormatException or InvalidImageContentException or ImageFormatException or NotSupportedException)
        { throw new InvalidDataException($"{name}: corrupt image ({e.Message})", e); }
    }

    /// <summary>Several images batched: their tiles concatenated in order, with each image's tile count.</summary>
    public (float[] Pixels, int[] TilesPerImage) LoadAll(IReadOnlyList<string> paths)
    {
        var pixels = new List<float[]>();
        var tiles = new int[paths.Count];
        for (int i = 0; i < paths.Count; i++)
        {
            var (p, n) = Load(paths[i]);
            pixels.Add(p);
            tiles[i] = n;
        }
        var all = new float[pixels.Sum(p => p.Length)];
        int at = 0;
        foreach (var p in pixels) { p.CopyTo(all, at); at += p.Length; }
        return (all, tiles);
    }

    public (float[] Pixels, int Tiles) Tile(Image<Rgb24> image)
    {
        int s = TileSize;
        if (image.Width == s && image.Height == s) return (Normalise([image]), 1);
        var (cols, rows) = Grid(image.Width, image.Height);
        using var resized = image.Clone(x => x.Resize(cols * s, rows * s, KnownResamplers.Bicubic));
        var tiles = new List<Image<Rgb24>>();
        try
        {
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    tiles.Add(resized.Clone(x => x.Crop(new Rectangle(c * s, r * s, s, s))));
            if (thumbnail && tiles.Count > 1) tiles.Add(image.Clone(x => x.Resize(s, s, KnownResamplers.Bicubic)));
            return (Normalise(tiles), tiles.Count);
        }
        finally
        {
            foreach (var t in tiles) t.Dispose();
        }
    }

    private float[] Normalise(IReadOnlyList<Image<Rgb24>> tiles)
    {
        int s = TileSize;
        var result = new float[tiles.Count * 3 * s * s];
        for (int t = 0; t < tiles.Count; t++)
        {
            int n = t;
            tiles[t].ProcessPixelRows(acc =>
            {
                for (int y = 0; y < s; y++)
                {
                    var row = acc.GetRowSpan(y);
                    for (int x = 0; x < s; x++)
                    {
                        var p = row[x];
                        result[((n * 3 + 0) * s + y) * s + x] = (p.R / 255f - Mean[0]) / Std[0];
                        result[((n * 3 + 1) * s + y) * s + x] = (p.G / 255f - Mean[1]) / Std[1];
                        result[((n * 3 + 2) * s + y) * s + x] = (p.B / 255f - Mean[2]) / Std[2];
                    }
                }
            });
        }
        return result;
    }
}
