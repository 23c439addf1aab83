using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Tests.Text;

public sealed class BpeTrainerTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-bpe-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Merges_TakeTheMostFrequentPairFirst_AndStopWhenNoPairRepeats()
    {
        // Pieces "ab", " ab", " ab", " cd": (a, b) occurs 3 times, then (Ġ, ab) twice, then nothing twice.
        var merges = BpeTrainer.Train(["ab ab ab cd"], 10);
        Assert.Equal([("a", "b"), ("\u0120", "ab")], merges);
        Assert.Equal([("a", "b")], BpeTrainer.Train(["ab ab ab cd"], 1)); // the budget
        Assert.Empty(BpeTrainer.Train(["<think></think>"], 10));      // special tokens are not text
    }

    [Fact]
    public void LearnedTokenizer_RoundTripsText_AndShortensTheCorpus()
    {
        string[] corpus = ["What is the sum of the digits in the image?", "I see the digits 5, 7. 5 + 7 = 12.</think>\\boxed{12}",
            "Is the digit 3 in the image? Answer yes or no.", "I see the digit 4. 3 is not among them.</think>\\boxed{no}"];
        var corpusFile = Path.Combine(_dir, "corpus.txt");
        File.WriteAllLines(corpusFile, Enumerable.Repeat(corpus, 5).SelectMany(x => x));
        var config = Path.Combine(_dir, "config.json");
        File.WriteAllText(config, File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json")).Replace("\"vocab_size\": 272", "\"vocab_size\": 400"));
        InitCommand.Run(config, Path.Combine(_dir, "ckpt"), seed: 1, tokenizerCorpus: corpusFile);
        var tok = TextTokenizer.Load(Path.Combine(_dir, "ckpt"));
        foreach (var text in corpus.Append("unseen text: 98 + 1 = 99, ünïcödé"))
            Assert.Equal(text, tok.Decode(tok.Encode(text)));
        int bytes = corpus.Sum(t => System.Text.Encoding.UTF8.GetByteCount(t)), tokens = corpus.Sum(t => tok.Encode(t).Length);
        Assert.True(tokens * 2 < bytes, $"{tokens} tokens for {bytes} bytes"); // single bytes would be one token each
        var the = Assert.Single(tok.Encode(" the"));                              // a learned token, numbered after the special tokens
        Assert.InRange(the, TokenizerWriter.MinimumVocabulary, 399);
        Assert.Equal(256 + Array.IndexOf(TokenizerWriter.SpecialTokens, "</think>"), tok.RequireToken("</think>"));
        // The same corpus gives the same tokenizer.
        InitCommand.Run(config, Path.Combine(_dir, "again"), seed: 1, tokenizerCorpus: corpusFile);
        Assert.Equal(File.ReadAllText(Path.Combine(_dir, "ckpt", "tokenizer.json")), File.ReadAllText(Path.Combine(_dir, "again", "tokenizer.json")));
    }

    [Fact]
    public void TooManyMergesForTheVocabulary_IsAClearError()
    {
        var e = Assert.Throws<ArgumentException>(() => TokenizerWriter.Write(_dir, TokenizerWriter.MinimumVocabulary, [("a", "b")]));
        Assert.Contains("vocab_size", e.Message);
    }
}
