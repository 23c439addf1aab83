using R1V2.Native.Trainer.Rewards;

namespace R1V2.Native.Tests.Trainer;

public sealed class RewardTests
{
    [Theory]
    [InlineData("so the total is \\boxed{42}.", "42")]
    [InlineData("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}")]
    [InlineData("\\boxed {x^{2} + 1}", "x^{2} + 1")]
    [InlineData("reasoning...\nAnswer: 7.\n", "7")]
    [InlineData("**Final Answer:** B", "B")]
    [InlineData("no answer given here", null)]
    public void ExtractAnswer_TakesTheLastBoxedOrAnswerLine(string response, string? expected)
    {
        Assert.Equal(expected, AnswerVerifier.ExtractAnswer(response));
    }

    [Theory]
    [InlineData("0.5", "1/2", true)]
    [InlineData("\\frac{1}{2}", "0.5", true)]
    [InlineData("\\dfrac{3}{4}", "75%", true)]
    [InlineData("50%", "50", true)]
    [InlineData("1,000", "1000", true)]
    [InlineData("-3", "\u22123", true)]
    [InlineData("2\\sqrt{2}", "2.8284271247", true)]
    [InlineData("\\sqrt 9", "3", true)]
    [InlineData("$12$", "12.0", true)]
    [InlineData("12", "13", false)]
    [InlineData("0.333", "1/3", false)]
    [InlineData("\\text{ Paris }", "paris", true)]
    [InlineData("New  York", "new york.", true)]
    [InlineData("London", "Paris", false)]
    public void Equivalent_ComparesNumbersAndText(string answer, string reference, bool equal)
    {
        Assert.Equal(equal, AnswerVerifier.Equivalent(answer, reference));
    }

    [Theory]
    [InlineData("(B)", "B", true)]
    [InlineData("b.", "B", true)]
    [InlineData("option C", "B", false)]
    [InlineData("a circle", "A", true)]
    [InlineData("a square", "A", false)]
    public void MultipleChoice_ByLetterOrChoiceText(string answer, string reference, bool equal)
    {
        Assert.Equal(equal, AnswerVerifier.Equivalent(answer, reference, ["A circle", "A square", "A line"]));
        Assert.Equal(equal ? 1.0 : 0.0, AnswerVerifier.Score($"thinking</think>\\boxed{{{answer}}}", reference, ["A circle", "A square", "A line"]));
    }

    [Theory]
    [InlineData("count them</think>\nThe answer is \\boxed{3}.", 1.0)]
    [InlineData("<think>count</think>  ", 0.0)]
    [InlineData("still counting", -1.0)]
    [InlineData("a</think>b</think>c", -1.0)]
    [InlineData("<think>a</think><think>b</think>c", -1.0)]
    public void FormatReward_RequiresClosedReasoningAndAnAnswer(string response, double expected)
    {
        Assert.Equal(expected, new FormatReward().Score(response));
    }

    [Fact]
    public void HybridReward_SumsRuleFormatAndWeightedRewardModel_AboveTheThreshold()
    {
        var hybrid = new HybridReward(new FormatReward(), rewardModelWeight: 0.5, new RewardModelScaling(RewardModelTransform.Clip, -2, 2, threshold: 0));
        var r = hybrid.Score("sum</think>\\boxed{7}", new RewardContext("7"), rewardModelScore: 6);
        Assert.Equal(new RewardBreakdown(1, 6, 1.0, 1, 3.0), r); // 0.5 x clip(6) = 1
        var below = hybrid.Score("sum</think>\\boxed{8}", new RewardContext("7"), rewardModelScore: -3);
        Assert.Equal(0, below.RewardModel);   // at or below the threshold: no contribution
        Assert.Equal(1.0, below.Total);       // format only
    }

    [Fact]
    public void HybridReward_AddsWeightedReasoningAndGroundingChecks_OnlyWhereTheyApply()
    {
        var hybrid = new HybridReward(new FormatReward(), reasoningWeight: 0.5, groundingWeight: 0.25);
        var checks = new RewardContext("7") { FollowsPremises = _ => true, MatchesImage = _ => false };
        var r = hybrid.Score("sum</think>\\boxed{7}", checks);
        Assert.Equal((1.0, 0.5, 0.0, 2.5), (r.Rule, r.Reasoning, r.Grounding, r.Total)); // rule 1 + format 1 + 0.5 x followed + 0.25 x 0
        var unchecked_ = hybrid.Score("sum</think>\\boxed{7}", new RewardContext("7") { FollowsPremises = _ => null });
        Assert.Equal((0.0, 0.0, 2.0), (unchecked_.Reasoning, unchecked_.Grounding, unchecked_.Total)); // null: no check for this prompt
        var unweighted = new HybridReward(new FormatReward()).Score("sum</think>\\boxed{7}", checks);
        Assert.Equal(new RewardBreakdown(1, 0, 0, 1, 2), unweighted);
    }

    [Fact]
    public void GroundingShareCredit_PaysTheShareOfDigitsReadRight()
    {
        var row = new R1V2.Native.Trainer.Data.PromptRow(0, "What is the sum of the digits in the image?", "16", [], null, [3, 5, 8, 0], Type: "sum") { Digits = [3, 5, 8, 0] };
        var context = R1V2.Native.Trainer.Tasks.DigitScenes.RewardContext(row);
        var share = new HybridReward(new FormatReward(), groundingWeight: 2, groundingCredit: GroundingCredit.Share);
        var exact = new HybridReward(new FormatReward(), groundingWeight: 2);
        string[] responses =
        [
            "I see the digits 3, 5, 8, 0. The sum is 16.</think>\\boxed{16}", // all four
            "I see the digits 3, 6, 8, 0. The sum is 17.</think>\\boxed{17}", // one misread
            "I see the digits 5, 3, 0, 8. The sum is 16.</think>\\boxed{16}", // right digits, wrong places
            "I see the digits 3, 5, 8. The sum is 16.</think>\\boxed{16}",    // one missed: a different count
            "The sum is 16.</think>\\boxed{16}",                              // no claim
        ];
        Assert.Equal([2.0, 1.5, 0.0, 0.0, 0.0], responses.Select(r => share.Score(r, context).Grounding));
        Assert.Equal([2.0, 0.0, 0.0, 0.0, 0.0], responses.Select(r => exact.Score(r, context).Grounding));
        Assert.Null(R1V2.Native.Trainer.Tasks.DigitScenes.RewardContext(new R1V2.Native.Trainer.Data.PromptRow(1, "What colour?", "red", [], null, null)).ImageAgreement);
        var bad = Assert.Throws<InvalidDataException>(() => R1V2.Native.Trainer.Config.TrainConfig.Load(null, ["reward.grounding_credit=partial"]));
        Assert.Contains("reward.grounding_credit must be exact or per_digit, not 'partial'", bad.Message);
    }

    [Fact]
    public void DigitRewardContext_ChecksTheAnswerAgainstTheClaimedDigits_AndTheClaimAgainstTheScene()
    {
        var row = new R1V2.Native.Trainer.Data.PromptRow(0, "How many times does the digit 5 appear in the image?", "1", [], null, [1, 5], Type: "count") { Digits = [5, 1] };
        var context = R1V2.Native.Trainer.Tasks.DigitScenes.RewardContext(row);
        Assert.Equal((true, true), (context.FollowsPremises!("I see the digits 5, 1. 5 appears 1 time.</think>\\boxed{1}"), context.MatchesImage!("I see the digits 5, 1. 5 appears 1 time.</think>\\boxed{1}")));
        Assert.Equal((false, true), (context.FollowsPremises!("I see the digits 5, 1. 5 appears 0 times.</think>\\boxed{0}"), context.MatchesImage!("I see the digits 5, 1.</think>\\boxed{0}")));
        // A misread followed consistently: the reasoning holds, the grounding does not.
        Assert.Equal((true, false), (context.FollowsPremises!("I see the digits 5, 5. 5 appears 2 times.</think>\\boxed{2}"), context.MatchesImage!("I see the digits 5, 5.</think>\\boxed{2}")));
        Assert.Equal(false, context.FollowsPremises!("\\boxed{1}")); // no claim: nothing to follow
        var other = R1V2.Native.Trainer.Tasks.DigitScenes.RewardContext(new R1V2.Native.Trainer.Data.PromptRow(1, "What colour is the car?", "red", [], null, null, Type: "chart"));
        Assert.Null(other.FollowsPremises);
        Assert.Null(other.MatchesImage);
    }

    [Fact]
    public void StandardisedScores_MeetTheThresholdInStandardDeviations_WhateverTheRawScale()
    {
        // Raw scores near 0 (as a Bradley-Terry head gives): a raw threshold of 0.75 would pass none of them.
        double[] raw = [-0.3, -0.1, 0.1, -0.2, 0.0, 0.35, -0.05, 0.2];
        var s = new RewardModelScaling(RewardModelTransform.Standardise, threshold: 0.75);
        var got = raw.Select(s.Apply).ToArray();
        for (int i = 0; i < raw.Length; i++)
        {
            var seen = raw[..(i + 1)];
            double mean = seen.Average(), sd = i == 0 ? 0 : Math.Sqrt(seen.Sum(x => (x - mean) * (x - mean)) / i);
            double z = i == 0 ? 0 : (raw[i] - mean) / (sd + 1e-8);
            Assert.Equal(z > 0.75 ? z : 0, got[i], 9);
        }
        Assert.Contains(got, z => z > 0.75);   // the 0.35 and 0.2 stand out from the scores before them
        Assert.Contains(got, z => z == 0);
    }

    [Fact]
    public void RewardModelStandardisation_UsesTheRunningMeanAndUnbiasedStd()
    {
        var s = new RewardModelScaling(RewardModelTransform.Standardise);
        Assert.Equal(0, s.Apply(2));                  // one score: no spread yet
        double z = s.Apply(4);                        // mean 3, std sqrt(2)
        Assert.Equal(1 / Math.Sqrt(2), z, 6);
        double z3 = s.Apply(9);                       // mean 5, var ((2-5)^2 + (4-5)^2 + (9-5)^2) / 2 = 13
        Assert.Equal(4 / Math.Sqrt(13), z3, 6);
        var copy = new RewardModelScaling(RewardModelTransform.Standardise);
        copy.Restore(s.State);
        Assert.Equal(s.State, copy.State);
    }
}
