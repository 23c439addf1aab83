using System.Diagnostics;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Tasks;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace R1V2.Native.Trainer.Pipeline;

public sealed record VisionPretrainSettings(int Steps, int Batch, float LearningRate, int Seed, int Warmup = 10, int HeldOutScenes = 200);

/// <summary>What vision pretraining measured: the loss per step, and on scenes of held-out digit images the share of
/// image tokens whose cell content (a digit or empty) the probe reads right, and of those that hold a digit.</summary>
public sealed record VisionPretrainResult(IReadOnlyList<double> Losses, double HeldOutTokenAccuracy, double HeldOutDigitAccuracy, double Seconds);

/// <summary>
/// Vision alignment in the digit pipeline: the vision encoder and the adapter learn to hand the LLM what they see in
/// the LLM's own terms (the role of a pretrained InternViT and the MLP warm-up in InternVL). A fixed probe [11, D]
/// holds the LLM's embeddings of the digit words and a direction for "empty"; every image token, RMS-normalised, is
/// scored by tau * cos against each row and trained (cross-entropy, ViT and adapter only) to pick the content of the
/// grid cell it covers. The LLM is untouched; the ViT and adapter weights go into the checkpoint SFT starts from.
/// </summary>
public static class VisionPretraining
{
    public const int Empty = 10, Classes = 11;

    /// <summary>tau of the cosine probe: logits tau * cos(token, row).</summary>
    public const float CosineScale = 10f;

    /// <summary>
    /// For each image token of one tile (the adapter's order), the grid cell its patches lie in, row by row.
    /// Fails when a token's patches straddle cells (the model's patch grid does not refine the scene grid).
    /// </summary>
    public static int[] TokenCells(VlmConfig c, int gridCells)
    {
        int side = c.TilePatchesPerSide, r = (int)Math.Round(1 / c.DownsampleRatio);
        if (side % gridCells != 0) throw new ArgumentException($"{side} patches per side do not divide into a {gridCells} x {gridCells} grid");
        var map = VisionAdapter.ShuffleRows(1, side, r, c.PsVersion);
        int tokens = map.Length / (r * r), per = side / gridCells;
        var cells = new int[tokens];
        for (int o = 0; o < tokens; o++)
        {
            var of = Enumerable.Range(0, r * r).Select(j => map[o * r * r + j]).Select(p => p / side / per * gridCells + p % side / per).Distinct().ToList();
            if (of.Count != 1)
                throw new ArgumentException($"image token {o} covers patches of {of.Count} grid cells: with {side} patches per side and pixel shuffle {r}, a token must lie in one of the {gridCells} x {gridCells} cells");
            cells[o] = of[0];
        }
        return cells;
    }

    /// <summary>Pixel values of one scene, through the same preprocessing as an image file of the dataset.</summary>
    public static float[] Pixels(ImagePreprocessor pre, DigitTaskItem item)
    {
        using var grey = Image.LoadPixelData<L8>(item.Canvas, item.CanvasSize, item.CanvasSize);
        using var rgb = grey.CloneAs<Rgb24>();
        var (pixels, tiles) = pre.Tile(rgb);
        if (tiles != 1) throw new InvalidOperationException($"a {item.CanvasSize}-pixel scene became {tiles} tiles; the model's image size must equal the canvas");
        return pixels;
    }

    /// <param name="probeRows">[11, D]: the LLM's embeddings of the tokens "0".."9" and a direction for an empty cell
    /// (only directions matter).</param>
    public static VisionPretrainResult Run(VisionLanguageModel model, DigitScenes train, DigitScenes heldOut, VisionPretrainSettings s, float[] probeRows,
        Action<int, double>? progress = null, CancellationToken cancel = default)
    {
        var clock = Stopwatch.StartNew();
        var b = model.Backend;
        var c = model.Config;
        if (c.ForceImageSize != train.CanvasSize) throw new ArgumentException($"the model sees {c.ForceImageSize}-pixel tiles but the scenes are {train.CanvasSize} pixels");
        var tokenCells = TokenCells(c, DigitScenes.GridCells);
        var pre = new ImagePreprocessor(c.ForceImageSize);
        int d = c.Llm.HiddenSize, perTile = tokenCells.Length;

        if (probeRows.Length != Classes * d) throw new ArgumentException($"probe rows hold {probeRows.Length} values, expected {Classes} x {d}");
        // Cosine logits: tau * cos(token, row), from the RMS-normalised token (norm sqrt(D)) and rows scaled to tau / sqrt(D).
        var rows = new float[probeRows.Length];
        for (int k = 0; k < Classes; k++)
        {
            double norm = Math.Sqrt(Enumerable.Range(0, d).Sum(i => (double)probeRows[k * d + i] * probeRows[k * d + i]));
            for (int i = 0; i < d; i++) rows[k * d + i] = (float)(probeRows[k * d + i] / norm * CosineScale / Math.Sqrt(d));
        }
        using var probe = b.FromArray(rows, b.ActivationType, [Classes, d], "vision_probe");
        using var ones = b.FromArray(Enumerable.Repeat(1f, d).ToArray(), b.ActivationType, [d], "vision_probe_norm");
        using var opt = new AdamWOptimizer(b, model.Parameters.Trainable, new AdamWSettings(s.LearningRate));
        var schedule = new LearningRateSchedule(s.LearningRate, s.Warmup, s.Steps);
        var rng = new Random(s.Seed);
        var losses = new List<double>();
        for (int step = 1; step <= s.Steps && !cancel.IsCancellationRequested; step++)
        {
            var items = Enumerable.Range(0, s.Batch).Select(_ => train.Sample(rng)).ToList();
            opt.ZeroGrad();
            var (loss, _) = Probe(model, probe, ones, pre, items, tokenCells, backward: true);
            opt.Step(schedule.At(step));
            losses.Add(loss);
            progress?.Invoke(step, loss);
        }

        // Held-out digit images, a fixed set of scenes.
        var heldRng = new Random(s.Seed + 7_000_001);
        var held = Enumerable.Range(0, s.HeldOutScenes).Select(_ => heldOut.Sample(heldRng)).ToList();
        long right = 0, total = 0, digitRight = 0, digits = 0;
        foreach (var chunk in held.Chunk(Math.Max(1, s.Batch)))
        {
            var (_, predicted) = Probe(model, probe, ones, pre, chunk, tokenCells, backward: false);
            for (int i = 0; i < chunk.Length; i++)
                for (int o = 0; o < perTile; o++)
                {
                    int truth = Label(chunk[i], tokenCells[o]), guess = predicted![i * perTile + o];
                    total++; right += guess == truth ? 1 : 0;
                    if (truth != Empty) { digits++; digitRight += guess == truth ? 1 : 0; }
                }
        }
        return new VisionPretrainResult(losses, (double)right / total, digits == 0 ? 0 : (double)digitRight / digits, clock.Elapsed.TotalSeconds);
    }

    private static int Label(DigitTaskItem item, int cell) =>
        item.Cells.Length == 0 ? throw new ArgumentException("the scene has no cell labels") : item.Cells[cell] < 0 ? Empty : item.Cells[cell];

    /// <summary>Mean cross-entropy of the probe over every image token of the scenes; with <paramref name="backward"/>
    /// the gradients of the adapter and the ViT, without it the probe's choice per token.</summary>
    private static (double Loss, int[]? Predicted) Probe(VisionLanguageModel model, Tensor probe, Tensor ones, ImagePreprocessor pre,
        IReadOnlyList<DigitTaskItem> items, int[] tokenCells, bool backward)
    {
        var b = model.Backend;
        int n = items.Count, perTile = tokenCells.Length, rows = n * perTile, d = model.Config.Llm.HiddenSize;
        var pixels = items.SelectMany(x => Pixels(pre, x)).ToArray();
        var labels = new int[rows];
        for (int i = 0; i < n; i++)
            for (int o = 0; o < perTile; o++) labels[i * perTile + o] = Label(items[i], tokenCells[o]);
        using var pass = model.ForwardImage(pixels, n);
        using var rstd = b.Allocate(DType.F32, rows);
        using var normed = b.Activations(rows, d);
        b.RmsNormForward(pass.Tokens, ones, normed, rstd, 1e-6f);
        using var logits = Linear.Forward(b, normed, probe, null);
        using var targets = b.FromArray(labels, [rows], "cell_labels");
        using var logp = b.Allocate(DType.F32, rows);
        using var lse = b.Allocate(DType.F32, rows);
        b.CrossEntropyForward(logits, targets, logp, lse);
        double loss = -logp.ToFloatArray().Sum(x => (double)x) / rows;
        if (!backward)
        {
            var values = logits.ToFloatArray();
            var predicted = new int[rows];
            for (int r = 0; r < rows; r++)
            {
                int best = 0;
                for (int k = 1; k < Classes; k++) if (values[r * Classes + k] > values[r * Classes + best]) best = k;
                predicted[r] = best;
            }
            return (loss, predicted);
        }
        using var dlogp = b.FromArray(Enumerable.Repeat(-1f / rows, rows).ToArray(), DType.F32, [rows]);
        b.CrossEntropyBackward(logits, targets, lse, dlogp, logits); // dlogits replace the logits
        using var dNormed = Linear.Backward(b, logits, normed, probe, null, null, inputGradient: true)!;
        b.RmsNormBackward(dNormed, pass.Tokens, ones, rstd, dNormed, null, false);
        model.BackwardImage(pass, dNormed);
        return (loss, null);
    }
}
