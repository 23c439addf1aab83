using R1V2.Native.Trainer.Data;

namespace R1V2.Native.Tests.Trainer;

public sealed class DatasetTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-data-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Parquet_RoundTripsQuestionsAnswersChoicesAndImageBytes()
    {
        var path = Path.Combine(_dir, "prompts.parquet");
        byte[] png = [0x89, 0x50, 0x4E, 0x47, 1, 2, 3, 4, 5];
        ParquetRows.WritePrompts(path,
        [
            new ParquetPromptRecord { Question = "What is 2+3?", Answer = "5" },
            new ParquetPromptRecord { Question = "Which digit is shown?", Answer = "B", Image = png, Choices = ["1", "7"], ImageDigits = [7], ImageObjects = ["sign"] },
            new ParquetPromptRecord { Question = "q2", Answer = "2" },
        ], rowGroupSize: 2);
        var data = new PromptDataset(path, seed: 0, shuffle: false);
        Assert.Equal(3, data.Count); // two row groups
        var a = data.Read(0);
        Assert.Equal(("What is 2+3?", "5", 0), (a.Question, a.Answer, a.Images.Count));
        var b = data.Read(1);
        Assert.Equal(1, b.Index);
        Assert.Equal(["1", "7"], b.Choices!);
        Assert.Equal([7], b.ImageDigits!);
        Assert.Equal(["sign"], b.ImageObjects!);
        Assert.Equal(["sign"], data.ObjectWords); // collected while the rows were validated
        Assert.Equal(png, File.ReadAllBytes(Assert.Single(b.Images)));
        Assert.Equal("q2", data.Read(2).Question);
        var order = data.Next(5).Select(r => r.Index).ToList();
        Assert.Equal([0, 1, 2, 0, 1], order); // unshuffled epochs wrap in file order
    }

    [Fact]
    public void Parquet_RowWithoutAnswer_NamesFileAndRow_OrIsSkippedWhenAsked()
    {
        var path = Path.Combine(_dir, "bad.parquet");
        ParquetRows.WritePrompts(path,
        [
            new ParquetPromptRecord { Question = "q0", Answer = "1" },
            new ParquetPromptRecord { Question = "q1", Answer = null },
            new ParquetPromptRecord { Question = "q2", Answer = "2" },
        ]);
        var e = Assert.Throws<InvalidDataException>(() => new PromptDataset(path, 0));
        Assert.Contains("bad.parquet", e.Message);
        Assert.Contains("row 1", e.Message);
        var skipped = new PromptDataset(path, 0, shuffle: false, skipBadRows: true);
        Assert.Equal((2, 1), (skipped.Count, skipped.SkippedRows));
        Assert.Equal("q2", skipped.Read(1).Question);
    }

    public sealed class HfImage
    {
        [System.Text.Json.Serialization.JsonPropertyName("bytes")] public byte[]? Bytes { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("path")] public string? Path { get; set; }
    }

    public sealed class HfRow
    {
        [System.Text.Json.Serialization.JsonPropertyName("problem")] public string? Problem { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("answer")] public string? Answer { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("images")] public List<HfImage>? Images { get; set; }
    }

    [Fact]
    public void Parquet_HfImageStructs_WithBytesOrAPathRelativeToTheFile()
    {
        var path = Path.Combine(_dir, "hf.parquet");
        File.WriteAllBytes(Path.Combine(_dir, "side.png"), [9, 8, 7]);
        ParquetRows.Write(path, new[]
        {
            new HfRow { Problem = "p0", Answer = "a0", Images = [new HfImage { Bytes = [1, 2, 3], Path = "ignored.png" }, new HfImage { Path = "side.png" }] },
            new HfRow { Problem = "p1", Answer = "a1", Images = [new HfImage { Path = "missing.png" }] },
        });
        var e = Assert.Throws<InvalidDataException>(() => new PromptDataset(path, 0));
        Assert.Contains("row 1", e.Message);
        Assert.Contains("missing.png", e.Message);
        var data = new PromptDataset(path, 0, shuffle: false, skipBadRows: true);
        var row = data.Read(0);
        Assert.Equal("p0", row.Question); // "problem" is accepted as the question column
        Assert.Equal(2, row.Images.Count);
        Assert.Equal([1, 2, 3], File.ReadAllBytes(row.Images[0]));
        Assert.Equal(Path.Combine(_dir, "side.png"), row.Images[1]);
    }

    [Fact]
    public void Parquet_PreferencePairs()
    {
        var path = Path.Combine(_dir, "pairs.parquet");
        ParquetRows.WritePairs(path,
        [
            new ParquetPairRecord { Prompt = "p", Chosen = "good", Rejected = "bad", Image = [5, 5] },
            new ParquetPairRecord { Prompt = "p", Chosen = "", Rejected = "bad" },
        ]);
        Assert.Contains("must not be empty", Assert.Throws<InvalidDataException>(() => new PreferenceDataset(path, 0)).Message);
        var pairs = new PreferenceDataset(path, 0, shuffle: false, skipBadRows: true);
        Assert.Equal((1, 1), (pairs.Count, pairs.SkippedRows));
        var pair = pairs.Read(0);
        Assert.Equal(("good", "bad"), (pair.Chosen, pair.Rejected));
        Assert.Equal([5, 5], File.ReadAllBytes(Assert.Single(pair.Images)));
    }

    [Fact]
    public void Jsonl_SceneDigits_AreReadInOrder_AndABadDigitNamesTheLine()
    {
        var path = Path.Combine(_dir, "digits.jsonl");
        File.WriteAllLines(path, ["{\"question\":\"q\",\"answer\":\"1\",\"digits\":[7,1,7]}", "{\"question\":\"q\",\"answer\":\"1\"}"]);
        var data = new PromptDataset(path, 0, shuffle: false);
        Assert.Equal([7, 1, 7], data.Read(0).Digits!);
        Assert.Null(data.Read(1).Digits);
        File.AppendAllLines(path, ["{\"question\":\"q\",\"answer\":\"1\",\"digits\":[12]}"]);
        var e = Assert.Throws<InvalidDataException>(() => new PromptDataset(path, 0));
        Assert.Contains("digits.jsonl", e.Message);
        Assert.Contains("3", e.Message);
        Assert.Contains("'digits' holds single digits", e.Message);
    }

    [Fact]
    public void Parquet_NotAParquetFile_IsAClearError()
    {
        var path = Path.Combine(_dir, "junk.parquet");
        File.WriteAllText(path, "question,answer\n1,2\n");
        var e = Assert.Throws<InvalidDataException>(() => new PromptDataset(path, 0));
        Assert.Contains("junk.parquet", e.Message);
    }

    [Fact]
    public void Jsonl_BadRow_NamesLine_AndShuffleIsAPermutationPerEpoch()
    {
        var path = Path.Combine(_dir, "p.jsonl");
        File.WriteAllLines(path, Enumerable.Range(0, 5).Select(i => $"{{\"question\":\"q{i}\",\"answer\":{i}}}").Append("{\"question\":\"x\"}"));
        var e = Assert.Throws<InvalidDataException>(() => new PromptDataset(path, 0));
        Assert.Contains("p.jsonl", e.Message);
        Assert.Contains("6", e.Message); // 1-based line of the bad row
        var data = new PromptDataset(path, seed: 3, skipBadRows: true);
        Assert.Equal(5, data.Count);
        var epoch = data.Next(5).Select(r => r.Index).Order().ToList();
        Assert.Equal([0, 1, 2, 3, 4], epoch);
        var pos = data.Position;
        var next = data.Next(3).Select(r => r.Index).ToList();
        data.Seek(pos);
        Assert.Equal(next, data.Next(3).Select(r => r.Index).ToList()); // resumable position
    }
}
