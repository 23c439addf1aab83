using System.Text.Json.Nodes;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Models;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace R1V2.Native.Tests.Cli;

/// <summary>`engine init` and `engine score` end to end, and the shipped configs.</summary>
[Collection("cpu")]
public sealed class ModelCommandTests(CpuFixture fx) : IDisposable
{
    private readonly Backend _b = fx.Backend;
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-cmd-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string Config(string name) => Path.Combine(AppContext.BaseDirectory, "configs", name + ".json");

    [Fact]
    public void Configs_ParseWithTheExpectedSizes()
    {
        var big = VlmConfig.Load(Config("r1v2-38b"));
        double billions = VlmWeights.ParameterCount(big) / 1e9;
        Assert.InRange(billions, 37.5, 38.5); // InternViT-6B (5.9B) + adapter + QwQ-32B (32.8B)
        Assert.Equal(256, big.TokensPerTile);
        Assert.Equal(16, VlmConfig.Load(Config("small")).TokensPerTile);
        Assert.Equal(4, VlmConfig.Load(Config("tiny")).TokensPerTile);
    }

    [Fact]
    public void Init_WritesALoadableCheckpoint_ReproducibleFromItsSeed()
    {
        string a = Path.Combine(_dir, "a"), b = Path.Combine(_dir, "b"), c = Path.Combine(_dir, "c");
        Assert.Equal(0, InitCommand.Run(Config("tiny"), a, seed: 3));
        InitCommand.Run(Config("tiny"), b, seed: 3);
        InitCommand.Run(Config("tiny"), c, seed: 4);
        foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json" }) Assert.True(File.Exists(Path.Combine(a, f)), f);
        Assert.Equal(File.ReadAllBytes(Path.Combine(a, "model.safetensors")), File.ReadAllBytes(Path.Combine(b, "model.safetensors")));
        Assert.NotEqual(File.ReadAllBytes(Path.Combine(a, "model.safetensors")), File.ReadAllBytes(Path.Combine(c, "model.safetensors")));
        using var model = VisionLanguageModel.Load(_b, a);
        Assert.Equal(261, model.ImageContextId);
        Assert.Equal(VlmWeights.ParameterCount(model.Config), model.Parameters.All.Sum(p => p.Parameter.Weights.Length));
        Assert.Equal(1f, model.Parameters["language_model.model.norm.weight"].Weights.ToFloatArray()[0]);
        Assert.Equal(0.1f, model.Parameters["vision_model.encoder.layers.1.ls2"].Weights.ToFloatArray()[5]);
    }

    [Fact]
    public void Init_RefusesTheFullSizeConfig()
    {
        var e = Assert.Throws<InvalidOperationException>(() => InitCommand.Run(Config("r1v2-38b"), Path.Combine(_dir, "big"), 0));
        Assert.Contains("38.", e.Message);
    }

    [Fact]
    public void Score_EqualsTheTeacherForcedLogSoftmaxOfTheModel_WithAnImage()
    {
        var ckpt = Path.Combine(_dir, "m");
        InitCommand.Run(Config("tiny"), ckpt, seed: 1);
        var rng = new Random(5);
        var raw = new byte[28 * 28 * 3];
        rng.NextBytes(raw);
        using (var img = Image.LoadPixelData<Rgb24>(raw, 28, 28)) img.SaveAsPng(Path.Combine(_dir, "digit.png"));
        int[] ids = [256 + 1, 10, 20, 259, 261, 261, 261, 261, 260, 30, 40, 50, 257 + 1];
        File.WriteAllText(Path.Combine(_dir, "rows.jsonl"),
            $"{{\"input_ids\": [{string.Join(",", ids)}], \"images\": [\"digit.png\"], \"score_from\": 9}}\n\n{{\"input_ids\": [5, 6, 7], \"score_from\": 1}}\n");
        var outPath = Path.Combine(_dir, "scores.jsonl");
        Assert.Equal(0, ScoreCommand.Run(ckpt, Path.Combine(_dir, "rows.jsonl"), outPath, "cpu"));
        var lines = File.ReadAllLines(outPath);
        Assert.Equal(2, lines.Length);
        var scored = JsonNode.Parse(lines[0])!["logprobs"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
        Assert.Equal(ids.Length - 9, scored.Length);
        Assert.Equal(2, JsonNode.Parse(lines[1])!["logprobs"]!.AsArray().Count);

        // Reference: pixels normalised here by hand, a plain forward, log-softmax of the logits in double.
        var pixels = new float[3 * 28 * 28];
        for (int y = 0; y < 28; y++)
            for (int x = 0; x < 28; x++)
                for (int ch = 0; ch < 3; ch++)
                    pixels[(ch * 28 + y) * 28 + x] = (raw[(y * 28 + x) * 3 + ch] / 255f - ImagePreprocessor.Mean[ch]) / ImagePreprocessor.Std[ch];
        using var model = VisionLanguageModel.Load(_b, ckpt);
        using var pass = model.Forward(VlmBatch.Single(ids, pixels, 1));
        var logits = model.FullLogits(pass);
        int v = model.Config.Llm.VocabSize;
        for (int t = 9; t < ids.Length; t++)
        {
            var row = logits.AsSpan((t - 1) * v, v).ToArray();
            double max = row.Max(), lse = max + Math.Log(row.Sum(z => Math.Exp(z - max)));
            // The kernel's fp32 log-sum-exp over 272 logits of size ~5: a few ulps (6e-7 each) of difference.
            Assert.True(Math.Abs(row[ids[t]] - lse - scored[t - 9]) <= 5e-6, $"token {t}: scored {scored[t - 9]}, reference {row[ids[t]] - lse}");
        }
    }

    [Theory]
    [InlineData("{\"text\": \"hello\"}", "rows.jsonl:1: give either input_ids")]
    [InlineData("{\"prompt\": \"hi\"}", "rows.jsonl:1: text rows need both 'prompt' and 'response'")]
    [InlineData("{\"input_ids\": [1, 2], \"score_from\": 0}", "rows.jsonl:1: score_from 0 must be in [1, 2]")]
    [InlineData("{\"input_ids\": [1, \"x\"]}", "rows.jsonl:1: input_ids[1] is not an integer")]
    [InlineData("[1, 2]", "rows.jsonl:1: not a JSON object")]
    public void Score_BadRows_NameFileAndLine(string row, string message)
    {
        var e = Assert.Throws<InvalidDataException>(() => ScoreCommand.ParseRow(row, "rows.jsonl", 1));
        Assert.StartsWith(message, e.Message);
    }

    [Fact]
    public void Score_TextRows_ScoreTheResponseAfterTheChatPrompt()
    {
        var ckpt = Path.Combine(_dir, "m");
        InitCommand.Run(Config("tiny"), ckpt, seed: 2);
        var tok = R1V2.Native.Engine.Text.TextTokenizer.Load(ckpt);
        var prompt = tok.Encode(new R1V2.Native.Engine.Text.ChatTemplate(4).Render([new("user", "2+2?")]));
        var response = tok.Encode("4</think>4");
        File.WriteAllText(Path.Combine(_dir, "rows.jsonl"),
            "{\"prompt\": \"2+2?\", \"response\": \"4</think>4\"}\n" + $"{{\"input_ids\": [{string.Join(",", prompt.Concat(response))}], \"score_from\": {prompt.Length}}}\n");
        ScoreCommand.Run(ckpt, Path.Combine(_dir, "rows.jsonl"), Path.Combine(_dir, "out.jsonl"), "cpu");
        var lines = File.ReadAllLines(Path.Combine(_dir, "out.jsonl"));
        Assert.Equal(response.Length, JsonNode.Parse(lines[0])!["logprobs"]!.AsArray().Count);
        Assert.Equal(lines[1], lines[0]); // the text row is exactly the ids row
    }

    [Fact]
    public void Score_ImageTokenMismatch_NamesTheLine()
    {
        var ckpt = Path.Combine(_dir, "m");
        InitCommand.Run(Config("tiny"), ckpt, seed: 1);
        File.WriteAllText(Path.Combine(_dir, "rows.jsonl"), "{\"input_ids\": [1, 261, 261, 3]}\n");
        var e = Assert.Throws<InvalidDataException>(() => ScoreCommand.Run(ckpt, Path.Combine(_dir, "rows.jsonl"), Path.Combine(_dir, "o.jsonl"), "cpu"));
        Assert.Contains("rows.jsonl:1: the batch has 2 <IMG_CONTEXT> tokens but 0 image tiles", e.Message);
    }

    [Fact]
    public void ImageTiling_ExactSizeIsOneTile_WideImagePicksTheClosestGrid()
    {
        var pre = new ImagePreprocessor(448);
        Assert.Equal((1, 1), pre.Grid(448, 448));
        Assert.Equal((2, 1), pre.Grid(900, 460));
        Assert.Equal((3, 1), pre.Grid(1344, 448));
        // Ratio ties between 1x1, 2x2, 3x3: a later grid wins while the area exceeds half of its tiles (0.5 x 448^2 x i j).
        Assert.Equal((2, 2), pre.Grid(800, 800));   // 640000 > 401408 but not > 903168
        Assert.Equal((3, 3), pre.Grid(1000, 1000)); // 1000000 > 903168
        using var wide = new Image<Rgb24>(900, 460);
        var (pixels, tiles) = pre.Tile(wide);
        Assert.Equal(3, tiles); // 2 tiles + thumbnail
        Assert.Equal(3 * 3 * 448 * 448, pixels.Length);
    }
}
