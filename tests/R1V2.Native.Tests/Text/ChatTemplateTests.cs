using R1V2.Native.Engine.Text;

namespace R1V2.Native.Tests.Text;

public sealed class ChatTemplateTests
{
    [Fact]
    public void Render_ExpandsEachImageToItsContextTokens_AndOpensTheAssistantThinking()
    {
        var t = new ChatTemplate(tokensPerTile: 2);
        var text = t.Render([
            new ChatMessage("system", "Be brief."),
            new ChatMessage("user", "First <image> then <image>?", [1, 3]),
        ]);
        const string ctx = "<IMG_CONTEXT>";
        Assert.Equal("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFirst <img>" + string.Concat(Enumerable.Repeat(ctx, 2)) +
            "</img> then <img>" + string.Concat(Enumerable.Repeat(ctx, 6)) + "</img>?<|im_end|>\n<|im_start|>assistant\n<think>\n", text);
    }

    [Fact]
    public void Render_PutsImagesWithoutPlaceholdersFirst_AndChecksCounts()
    {
        var t = new ChatTemplate(1, generationPrompt: "<|im_start|>assistant\n");
        Assert.Equal("<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat digit?<|im_end|>\n<|im_start|>assistant\n",
            t.Render([new ChatMessage("user", "What digit?", [1])]));
        var e = Assert.Throws<ArgumentException>(() => t.Render([new ChatMessage("user", "<image> and <image>", [1])]));
        Assert.Contains("2 <image> placeholders but 1 images", e.Message);
    }

    [Theory]
    [InlineData("<think>\nadd them\n</think>\nThe sum is 7.<|im_end|>", "add them", "The sum is 7.", true)]
    [InlineData("count\n</think> \\boxed{3}", "count", "\\boxed{3}", true)]
    [InlineData("still thinking...", "still thinking...", "", false)]
    public void Split_SeparatesThinkingFromTheAnswer(string response, string thinking, string answer, bool closed)
    {
        Assert.Equal(new ReasonedResponse(thinking, answer, closed), ChatTemplate.Split(response));
    }
}
