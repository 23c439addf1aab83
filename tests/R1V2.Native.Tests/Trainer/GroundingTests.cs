using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;

namespace R1V2.Native.Tests.Trainer;

public sealed class GroundingTests
{
    private static PromptRow Row(IReadOnlyList<int>? digits, IReadOnlyList<string>? objects) => new(0, "q", "a", [], null, digits, objects);

    [Fact]
    public void Digits_AnAnswerNamingAnAbsentDigitIsUngrounded()
    {
        Assert.True(Grounding.ClaimsOnlyPresentDigits("the image shows 3 and 7", [3, 7]));
        Assert.True(Grounding.ClaimsOnlyPresentDigits("no digits at all", [1]));
        Assert.False(Grounding.ClaimsOnlyPresentDigits("I see a 4", [3, 7]));
        Assert.False(Grounding.ClaimsOnlyPresentDigits("37 and 8", [3, 7]));
    }

    [Fact]
    public void Objects_MatchWholeWordsPluralsAndPhrases_FromTheVocabulary()
    {
        var g = new Grounding(["cat", "Dog", "traffic light", "bus", "cat"]);
        Assert.Equal(4, g.VocabularySize); // trimmed, lower-cased, distinct
        Assert.Equal(["cat", "dog"], g.ClaimedObjects("Two CATS and a dog.").Order());
        Assert.Equal(["bus", "traffic light"], g.ClaimedObjects("a buses stop at the traffic\n lights").Order());
        Assert.Empty(g.ClaimedObjects("category, hotdog, catalogue")); // no matches inside other words
        var row = Row(null, ["cat", "sofa"]);
        Assert.True(g.Check("</think>a cat on a sofa", row));
        Assert.False(g.Check("</think>a cat and a dog", row));
        Assert.True(g.Check("</think>an armchair", row)); // words outside the vocabulary are not claims
        Assert.Null(g.Check("</think>a dog", Row(null, null)));
        Assert.False(g.Check("</think>cat number 5", Row([3], ["cat"])));
        Assert.True(g.Check("</think>cat number 3", Row([3], ["cat"])));
    }

    [Fact]
    public void ClaimPattern_TakesDigitClaimsFromTheReasoning_NotFromAComputedAnswer()
    {
        var g = new Grounding([], @"I see the digits? ([0-9](?:, [0-9])*)");
        var row = Row([5, 7], null);
        Assert.True(g.Check("<think>I see the digits 5, 7. 5 + 7 = 12.</think> \\boxed{12}", row)); // 12 is a sum, not a claim
        Assert.False(g.Check("<think>I see the digits 5, 8. 5 + 8 = 13.</think> \\boxed{13}", row));
        Assert.True(g.Check("<think>no listing</think> 9", row));                                // nothing claimed
        var plain = new Grounding([]);
        Assert.False(plain.Check("<think>I see 5, 7</think> 12", row));                          // without a pattern: the answer's digits
        Assert.True(plain.Check("<think>unfinished 9", row));                                     // no answer yet, no claim
        Assert.True(plain.Check("9", row));                                                       // the prompt opens the thinking: unfinished, no answer
        Assert.False(plain.Check("</think>9", row));                                              // the answer part names 9
        Assert.Throws<ArgumentException>(() => new Grounding([], "no group"));
        Assert.Throws<ArgumentException>(() => new Grounding([], "(unclosed"));
    }

    private static GrpoStepMetrics Step(int step, double reward, double? hallucination) =>
        new(step, 0, reward, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, hallucination, 0, 0, null);

    [Fact]
    public void Monitor_WarnsOnlyWhenRewardRisesWhileGroundingFalls()
    {
        var c = new TrainConfig.MonitorConfig { Window = 3, RewardRise = 0.1, GroundingDrop = 0.05 };
        var hacking = Enumerable.Range(0, 6).Select(i => Step(i, i < 3 ? 0.2 : 0.5, i < 3 ? 0.1 : 0.3)).ToList();
        Assert.Contains("possible reward hacking", RewardHackingMonitor.Check(hacking, c));
        var honest = Enumerable.Range(0, 6).Select(i => Step(i, i < 3 ? 0.2 : 0.5, 0.1)).ToList();
        Assert.Null(RewardHackingMonitor.Check(honest, c));
        var flat = Enumerable.Range(0, 6).Select(i => Step(i, 0.2, i < 3 ? 0.1 : 0.3)).ToList();
        Assert.Null(RewardHackingMonitor.Check(flat, c));
        Assert.Null(RewardHackingMonitor.Check(hacking.Take(5).ToList(), c)); // needs two full windows
        Assert.Null(RewardHackingMonitor.Check(hacking.Select(m => m with { HallucinationRate = null }).ToList(), c)); // nothing known
    }
}
