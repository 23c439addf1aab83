using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace R1V2.Native.Tests.Cli;

/// <summary>The tiny checkpoint talks: generate with an image end to end, the chat loop, and tokenize.</summary>
[Collection("cpu")]
public sealed class GenerateCommandTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-gen-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private string TinyCheckpoint()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 5);
        return ckpt;
    }

    private string Image()
    {
        var path = Path.Combine(_dir, "img.png");
        using var img = new Image<Rgb24>(56, 28); // two tiles and a thumbnail at 28 px
        img[3, 4] = new Rgb24(255, 0, 0);
        img.SaveAsPng(path);
        return path;
    }

    [Fact]
    public void TinyCheckpoint_GeneratesTextWithAnImage_EndToEndOnCpu()
    {
        var ckpt = TinyCheckpoint();
        using var model = VisionLanguageModel.Load(fx.Backend, ckpt);
        var runner = new ChatRunner(model, TextTokenizer.Load(ckpt), new GeneratorOptions(CacheBlocks: 64));
        var turns = new[] { new ChatTurn("user", "What is in the picture?", [Image()]) };
        var (ids, _, tiles) = runner.Prompt(turns);
        Assert.Equal(3, tiles);
        Assert.Equal(3 * model.Config.TokensPerTile, ids.Count(t => t == model.ImageContextId));
        var streamed = new System.Text.StringBuilder();
        var reply = runner.Respond(turns, new SamplingParams(0.8f, TopP: 0.95f), seed: 1, maxNewTokens: 12, onText: (_, t) => streamed.Append(t)).Single();
        Assert.InRange(reply.Tokens.Length, 1, 12);
        Assert.Equal(runner.Text(reply), streamed.ToString());
        Assert.All(reply.LogProbs, lp => Assert.True(lp <= 0 && float.IsFinite(lp)));
    }

    [Fact]
    public void StopStrings_EndTheSampleOnceTheTextContainsThem()
    {
        var ckpt = TinyCheckpoint();
        using var model = VisionLanguageModel.Load(fx.Backend, ckpt);
        var tok = TextTokenizer.Load(ckpt);
        var gen = new Generator(model, tok, new GeneratorOptions(CacheBlocks: 32));
        var prompt = tok.Encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        var free = gen.Generate([new GenerationRequest(prompt, MaxNewTokens: 10)]).Single();
        var stop = tok.Decode(free.Tokens[..4]);
        var stopped = gen.Generate([new GenerationRequest(prompt, MaxNewTokens: 10, StopStrings: [stop])]).Single();
        Assert.Equal(FinishReason.StopString, stopped.Finish);
        Assert.True(stopped.Tokens.Length <= 4);
        Assert.Equal(free.Tokens[..stopped.Tokens.Length], stopped.Tokens);
        Assert.Contains(stop, stopped.Text);
    }

    [Fact]
    public void ChatLoop_AttachesImages_ReportsBadPaths_AndExits()
    {
        var ckpt = TinyCheckpoint();
        using var model = VisionLanguageModel.Load(fx.Backend, ckpt);
        var runner = new ChatRunner(model, TextTokenizer.Load(ckpt), new GeneratorOptions(CacheBlocks: 64));
        var input = new StringReader($"/image {Image()}\nhello there\n/image /no/such.png\nsecond turn\n/reset\n/exit\n");
        var output = new StringWriter();
        Assert.Equal(0, GenerateCommand.Loop(runner, input, output, new SamplingParams(0.7f), 3, 6));
        var text = output.ToString();
        Assert.Contains("(attached", text);
        Assert.Contains("no such file: /no/such.png", text);
        Assert.Contains("(conversation cleared)", text);
    }

    [SkippableFact]
    public void Tokenize_EncodesAndDecodes_WithTheRealQwenTokenizer()
    {
        TestPaths.RequireNpmData(TestPaths.QwenTokenizer);
        Assert.Equal("[9707,11,220,99489,0]", TokenizeCommand.Run(TestPaths.QwenTokenizer, "Hello, 世界!", decode: false));
        Assert.Equal("Hello, 世界!", TokenizeCommand.Run(TestPaths.QwenTokenizer, "[9707, 11, 220, 99489, 0]", decode: true));
    }
}
