using System.Text;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Tests.Text;

/// <summary>The tokenizer against the real Qwen2.5 tokenizer.json and the ids its JS implementation gives (fixture).</summary>
public sealed class TokenizerTests
{
    private static readonly Lazy<TextTokenizer> Qwen = new(() => TextTokenizer.Load(TestPaths.QwenTokenizer));

    public static TheoryData<int> Cases()
    {
        var data = new TheoryData<int>();
        int n = JsonNode.Parse(File.ReadAllText(FixturePath))!["cases"]!.AsArray().Count;
        for (int i = 0; i < n; i++) data.Add(i);
        return data;
    }

    private static string FixturePath => Path.Combine(AppContext.BaseDirectory, "fixtures", "tokenizer", "qwen2_5_cases.json");

    [Fact]
    public void Fixture_HasAtLeastFiftyStrings()
    {
        Assert.True(Cases().Count >= 50);
    }

    [SkippableTheory]
    [MemberData(nameof(Cases))]
    public void Encode_MatchesTheJsQwenTokenizer_AndDecodeRoundTrips(int index)
    {
        TestPaths.RequireNpmData(TestPaths.QwenTokenizer);
        var c = JsonNode.Parse(File.ReadAllText(FixturePath))!["cases"]![index]!;
        var text = c["text"]!.GetValue<string>();
        var expected = c["ids"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        var ids = Qwen.Value.Encode(text);
        Assert.True(expected.SequenceEqual(ids), $"\"{text}\": expected [{string.Join(",", expected)}], got [{string.Join(",", ids)}]");
        Assert.Equal(text.Normalize(NormalizationForm.FormC), Qwen.Value.Decode(ids));
    }

    [SkippableFact]
    public void SpecialTokens_HaveTheirQwenIds()
    {
        TestPaths.RequireNpmData(TestPaths.QwenTokenizer);
        Assert.Equal(151643, Qwen.Value.TokenId("<|endoftext|>"));
        Assert.Equal(151644, Qwen.Value.TokenId("<|im_start|>"));
        Assert.Equal(151645, Qwen.Value.TokenId("<|im_end|>"));
        Assert.Equal(151665, Qwen.Value.VocabularySize);
    }

    [Fact]
    public void BuiltInByteTokenizer_RoundTripsAnyText_AndKeepsSpecialTokensWhole()
    {
        var dir = Directory.CreateTempSubdirectory("r1v2-tok-").FullName;
        try
        {
            TokenizerWriter.Write(dir, 272);
            var tok = TextTokenizer.Load(dir);
            const string text = "<|im_start|>user\nÜber 3 ✨ digits: 42 <image>?<|im_end|>";
            var ids = tok.Encode(text);
            Assert.Equal(257, ids[0]);
            Assert.Equal(258, ids[^1]);
            Assert.Equal(text, tok.Decode(ids));
            Assert.Equal(Encoding.UTF8.GetByteCount("user\nÜber 3 ✨ digits: 42 <image>?"), ids.Length - 2); // one id per byte between the specials
            Assert.Equal(261, tok.RequireToken(TokenizerFiles.ImageContext));
        }
        finally { Directory.Delete(dir, true); }
    }
}
