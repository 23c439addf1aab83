using System.Text.Json;
using R1V2.Native.Cli;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Checkpoints;

namespace R1V2.Native.Tests.Cli;

/// <summary>
/// One error model: a problem with the user's input prints `error: message` and exits 1, anything else prints
/// `internal error: ...` and exits 2, an interruption exits 130; no exception ends the process.
/// </summary>
[Collection("cpu")]
public sealed class ErrorModelTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-errors-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    public static TheoryData<Exception, int, string> Kinds() => new()
    {
        { new CheckpointException("model.safetensors: tensor 'x' is F64, expected F32 or BF16"), 1, "error: model.safetensors: tensor 'x'" },
        { new R1V2.Native.Engine.InputException("rows.jsonl:3: no 'question'"), 1, "error: rows.jsonl:3" },
        { new InvalidDataException("config.json: hidden_size must be positive"), 1, "error: config.json" },
        { new FileNotFoundException("tokenizer not found: /x/tokenizer.json"), 1, "error: tokenizer not found" },
        { new DirectoryNotFoundException("no directory /x"), 1, "error: no directory" },
        { new ArgumentException("--samples must be at least 1"), 1, "error: --samples" },
        { new FormatException("'abc' is not a number"), 1, "error: 'abc'" },
        { new IOException("No space left on device"), 1, "error: No space left on device" },
        { new JsonException("'}' is invalid after a value"), 1, "error: '}'" },
        { new AggregateException(new CheckpointException("shard 2: truncated")), 1, "error: shard 2: truncated" },
        { new OperationCanceledException("interrupted during mpo"), 130, "interrupted: interrupted during mpo" },
        { new NullReferenceException("Object reference not set"), 2, "internal error: NullReferenceException: Object reference not set (R1V2_TRACE=1 shows the trace)" },
        { new IndexOutOfRangeException("Index was outside the bounds"), 2, "internal error: IndexOutOfRangeException" },
        { new InvalidOperationException("Sequence contains no elements"), 2, "internal error: InvalidOperationException" },
    };

    [Theory]
    [MemberData(nameof(Kinds))]
    public void EveryKindOfException_EndsWithItsExitCodeAndOneLine(Exception e, int code, string start)
    {
        var error = new StringWriter();
        Assert.Equal(code, Program.Report(e, error, trace: false));
        var text = error.ToString();
        Assert.StartsWith(start, text);
        Assert.Single(text.TrimEnd().Split('\n'));              // the message alone, no stack trace
        var traced = new StringWriter();
        Program.Report(e, traced, trace: true);
        var shown = e is AggregateException a ? a.InnerExceptions[0] : e;
        Assert.Contains(shown.GetType().FullName!, traced.ToString());   // R1V2_TRACE=1 adds the exception with its trace
    }

    [Theory]
    [InlineData("generate")]
    [InlineData("score")]
    [InlineData("tokenize")]
    [InlineData("eval")]
    [InlineData("build-pairs")]
    [InlineData("prefilter")]
    [InlineData("train-grpo")]
    [InlineData("train-mpo")]
    public void EveryModelCommand_GivenABrokenCheckpoint_ReportsTheFileAndExitsOne(string command)
    {
        // A checkpoint whose weights file is a truncated header: every command that loads a model must say which
        // file is broken and exit 1 (CheckpointException once aborted the process).
        var ckpt = Path.Combine(_dir, "broken");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 1);
        File.WriteAllBytes(Path.Combine(ckpt, "model.safetensors"), [0x40, 0, 0, 0, 0, 0, 0, 0, (byte)'{', (byte)'"']);
        var prompts = Path.Combine(_dir, "prompts.jsonl");
        File.WriteAllText(prompts, JsonSerializer.Serialize(new { question = "2 + 2?", answer = "4" }) + "\n");
        var pairs = Path.Combine(_dir, "pairs.jsonl");
        File.WriteAllLines(pairs, Enumerable.Range(0, 5).Select(i => JsonSerializer.Serialize(new { prompt = $"p{i}", chosen = "yes", rejected = "no" })));
        var rows = Path.Combine(_dir, "rows.jsonl");
        File.WriteAllText(rows, "{\"input_ids\": [1, 2, 3]}\n");
        var outFile = Path.Combine(_dir, "out.jsonl");
        string[] args = command switch
        {
            "generate" => ["generate", "--model", ckpt, "--prompt", "hi", "--max-new-tokens", "2"],
            "score" => ["score", "--model", ckpt, "--data", rows, "--out", outFile],
            "tokenize" => ["tokenize", "--model", ckpt, "hello"],
            "eval" => ["eval", "--model", ckpt, "--data", prompts, "--out", Path.Combine(_dir, "eval")],
            "build-pairs" => ["build-pairs", "--model", ckpt, "--data", prompts, "--out", outFile],
            "prefilter" => ["prefilter", "--model", ckpt, "--data", prompts, "--out", outFile],
            "train-grpo" => ["train", "--stage", "grpo", "--set", $"model={ckpt}", "--set", $"data.path={prompts}", "--out", Path.Combine(_dir, "grpo")],
            _ => ["train", "--stage", "mpo", "--set", $"model={ckpt}", "--set", $"data.path={pairs}", "--out", Path.Combine(_dir, "mpo")],
        };
        var error = new StringWriter();
        var saved = Console.Error;
        Console.SetError(error);
        int code;
        try { code = Program.Main(args); }
        finally { Console.SetError(saved); }
        if (command == "tokenize")
        {
            Assert.Equal(0, code);                              // tokenizing reads only tokenizer.json
            return;
        }
        Assert.Equal(1, code);
        Assert.StartsWith("error: ", error.ToString());
        Assert.Contains("model.safetensors", error.ToString());
    }

    [Fact]
    public void NothingInTheSources_EndsTheProcessOrBypassesTheReport()
    {
        // Program.Main catches every exception and hands it to Program.Report; nothing else may end the process or turn
        // System.CommandLine's own handler (which prints a trace) back on.
        var sources = Directory.GetFiles(Path.Combine(TestPaths.RepositoryRoot, "src"), "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}") && !f.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}"));
        foreach (var file in sources)
        {
            var text = File.ReadAllText(file);
            Assert.False(text.Contains("Environment.Exit(") || text.Contains("Environment.FailFast("), $"{file} ends the process itself");
            Assert.False(text.Contains("EnableDefaultExceptionHandler = true"), $"{file} turns the default exception handler on");
        }
        var program = File.ReadAllText(Path.Combine(TestPaths.RepositoryRoot, "src", "Cli", "Program.cs"));
        Assert.Contains("EnableDefaultExceptionHandler = false", program);
        Assert.Contains("catch (Exception e)\n        {\n            return Report(", program.Replace("\r", ""));
    }

    [Theory]
    [InlineData("llm_config", 1000000000)]
    [InlineData("vision_config", 2000000000)]
    public async Task AHugeLayerCount_FailsAtOnceOnTheFirstMissingLayer(string section, int layers)
    {
        var ckpt = Path.Combine(_dir, "huge");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 1);
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(ckpt, "config.json")))!;
        config[section]!["num_hidden_layers"] = layers;
        File.WriteAllText(Path.Combine(ckpt, "config.json"), config.ToJsonString());
        using var backend = new R1V2.Native.Engine.Backends.Cpu.CpuBackend();
        var load = Task.Run(() => R1V2.Native.Engine.Models.VisionLanguageModel.Load(backend, ckpt));
        var first = await Task.WhenAny(load, Task.Delay(TimeSpan.FromSeconds(60)));
        Assert.True(first == load, "loading hung instead of failing on the first missing layer");
        var e = await Assert.ThrowsAsync<CheckpointException>(() => load);
        Assert.Contains($"{section}.num_hidden_layers is {layers} but the checkpoint holds 2 such layers", e.Message);
    }

    [Fact]
    public void ScoringAnEmptyFile_IsAnError()
    {
        var ckpt = Path.Combine(_dir, "m");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 1);
        var empty = Path.Combine(_dir, "empty.jsonl");
        File.WriteAllText(empty, "\n\n");
        var e = Assert.Throws<InvalidDataException>(() => ScoreCommand.Run(ckpt, empty, Path.Combine(_dir, "o.jsonl"), "cpu"));
        Assert.Equal($"{empty}: no rows to score (the file is empty)", e.Message);
        Assert.False(File.Exists(Path.Combine(_dir, "o.jsonl")));
    }
}
