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
        var scored = hybrid.ScoreStep(["sum</think>\\boxed{7}", "sum</think>\\boxed{8}"], [new RewardContext("7"), new RewardContext("7")], [6, -3]);
        var (r, below) = (scored[0], scored[1]);
        Assert.Equal(new RewardBreakdown(1, 6, 1.0, 1, 3.0), r); // 0.5 x clip(6) = 1
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
        // Raw scores near 0 (as a Bradley-Terry head gives): a raw threshold of 0.75 would pass none of them. Step 1 has no
        // history and is standardised by its own scores; step 2 by step 1's.
        double[] step1 = [-0.3, -0.1, 0.1, -0.2], step2 = [0.0, 0.35, -0.05, 0.2];
        var s = new RewardModelScaling(RewardModelTransform.Standardise, threshold: 0.75);
        var got1 = s.ApplyStep(step1);
        var got2 = s.ApplyStep(step2);
        static double[] Expected(double[] stats, double[] scores)
        {
            double mean = stats.Average(), sd = Math.Sqrt(stats.Sum(x => (x - mean) * (x - mean)) / (stats.Length - 1));
            return scores.Select(x => (x - mean) / sd).Select(z => z > 0.75 ? z : 0).ToArray();
        }
        Assert.Equal(Expected(step1, step1), got1, (a, b) => Math.Abs(a - b) < 1e-9);
        Assert.Equal(Expected(step1, step2), got2, (a, b) => Math.Abs(a - b) < 1e-9);
        Assert.Contains(got2, z => z > 0.75);   // 0.35 and 0.2 stand out from the scores of step 1
        Assert.Contains(got2, z => z == 0);
    }

    [Fact]
    public void RewardModelStandardisation_UsesTheStatisticsOfEarlierSteps_AndUpdatesThemOncePerStep()
    {
        var s = new RewardModelScaling(RewardModelTransform.Standardise);
        s.ApplyStep([2, 4]);                            // history: mean 3, m2 2
        Assert.Equal((2L, 3.0, 2.0), s.State);
        var z = s.ApplyStep([9, 9, 3]);                  // std sqrt(2) from before the step
        Assert.Equal([6 / Math.Sqrt(2), 6 / Math.Sqrt(2), 0], z, (a, b) => Math.Abs(a - b) < 1e-6);
        var all = new[] { 2.0, 4, 9, 9, 3 };
        double mean = all.Average();
        Assert.Equal(mean, s.State.Mean, 12);
        Assert.Equal(all.Sum(x => (x - mean) * (x - mean)), s.State.M2, 9);
        var copy = new RewardModelScaling(RewardModelTransform.Standardise);
        copy.Restore(s.State);
        Assert.Equal(s.ApplyStep([1, 5]), copy.ApplyStep([1, 5]));
        // A history without spread standardises nothing (a difference over a std of 0 would be unbounded).
        var flat = new RewardModelScaling(RewardModelTransform.Standardise);
        Assert.Equal([0.0, 0.0], flat.ApplyStep([0.3, 0.3]));
        Assert.Equal([0.0, 0.0], flat.ApplyStep([0.3, 0.9]));
        Assert.NotEqual(0, flat.ApplyStep([0.9, 0.1])[0]);           // now the history has spread
    }

    [Fact]
    public void IdenticalResponses_GetIdenticalRewardsAndZeroAdvantage_OnEveryStep_WithTheBufferOn()
    {
        // Ten steps of four groups of 8: in each group every response is the same text with the same raw reward-model
        // score (well above the running mean in some groups). Per-sample standardisation gave them rewards from about
        // +1.45 to -1.41 standard deviations apart; the whole-step transform gives each group one reward.
        var hybrid = new HybridReward(new FormatReward(), rewardModelWeight: 0.25, new RewardModelScaling(RewardModelTransform.Standardise, threshold: 1));
        var buffer = new R1V2.Native.Trainer.Ssb.SelectiveSampleBuffer(64, 8, 3);
        var rng = new Random(5);
        for (int step = 0; step < 10; step++)
        {
            var texts = new List<string>();
            var scores = new List<double>();
            for (int g = 0; g < 4; g++)
            {
                double raw = rng.NextDouble() * 4 - 2 + (g == 0 ? 3 : 0);
                string text = rng.Next(2) == 0 ? "sum</think>\\boxed{7}" : "sum</think>\\boxed{8}";
                for (int i = 0; i < 8; i++) { texts.Add(text); scores.Add(raw); }
            }
            var rewards = hybrid.ScoreStep(texts, texts.Select(_ => new RewardContext("7")).ToList(), scores).Select(r => r.Total).ToList();
            for (int g = 0; g < 4; g++) Assert.Single(rewards.Skip(8 * g).Take(8).Distinct());
            var advantages = R1V2.Native.Trainer.Grpo.GrpoMath.Advantages(rewards, 8, R1V2.Native.Trainer.Grpo.AdvantageMode.MeanStd);
            Assert.All(advantages, a => Assert.Equal(0, a));
            var rollouts = advantages.Select((a, i) => new R1V2.Native.Trainer.Ssb.Rollout(i / 8, [1], null, 0, [2], [-1f], rewards[i], a, step)).ToList();
            var batch = buffer.Build(rollouts, rollouts.Count, step);
            Assert.Empty(batch.Samples);                 // nothing to train on, nothing stored for replay
            Assert.Equal(0, buffer.Count);
        }
    }

    [Theory]
    [InlineData(-0.5)]
    [InlineData(-1)]
    public void NegativeRewardModelThreshold_IsRejected_WithTheKeyAndTheReason(double t)
    {
        var e = Assert.Throws<InvalidDataException>(() => R1V2.Native.Trainer.Config.TrainConfig.Load(null, [$"reward.rm_threshold={t}"]));
        Assert.Contains("reward.rm_threshold must be >= 0", e.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => new RewardModelScaling(RewardModelTransform.Identity, threshold: t));
        // -inf (no threshold) and t >= 0 are monotone maps: a higher score never earns less.
        foreach (var scaling in new[] { new RewardModelScaling(), new RewardModelScaling(RewardModelTransform.Identity, threshold: 0.5) })
        {
            double[] raw = [-3, -1, -0.4, 0, 0.4, 0.5, 0.6, 2];
            var terms = scaling.ApplyStep(raw);
            for (int i = 1; i < raw.Length; i++) Assert.True(terms[i] >= terms[i - 1], $"{scaling.Describe()}: f({raw[i]}) = {terms[i]} < f({raw[i - 1]}) = {terms[i - 1]}");
        }
        Assert.Equal("f(s) [f(s) > 0.5] with f(s) = s", new RewardModelScaling(RewardModelTransform.Identity, threshold: 0.5).Describe());
    }

    [Fact]
    public void BoxedInsideTheThinking_CountsInNoneOfRewardEvalPairsAndPrefilter()
    {
        var row = new R1V2.Native.Trainer.Data.PromptRow(0, "What is the sum of the digits in the image?", "7", [], null, [3, 4], Type: "sum") { Digits = [3, 4] };
        string[] thinkingOnly =
        [
            "I see the digits 3, 4. 3 + 4 = \\boxed{7}",                   // never closes its thinking
            "I see the digits 3, 4. \\boxed{7} so</think>the answer is 8", // boxed before </think>, a wrong answer after
            "I see the digits 3, 4. \\boxed{7}</think>",                   // nothing after </think>
        ];
        foreach (var text in thinkingOnly)
        {
            Assert.Null(AnswerVerifier.FinalAnswer(text));
            Assert.Equal(0, new HybridReward(new FormatReward()).Score(text, new RewardContext("7")).Rule);                       // training reward
            Assert.Equal(0, R1V2.Native.Trainer.GrpoTrainer.RewardFrom(new R1V2.Native.Trainer.Config.TrainConfig().Reward, false)
                .Score(text, R1V2.Native.Trainer.GrpoTrainer.ContextOf(row)).Rule);
            Assert.Equal(0, R1V2.Native.Trainer.PromptSampling.RuleAndFormat(text, row).Rule);                                    // build-pairs, prefilter
            var eval = R1V2.Native.Trainer.Evaluation.Score([(row, (IReadOnlyList<string>)[text, text])], new R1V2.Native.Trainer.EvalSettings(), t => t.Length).Result;
            Assert.Equal(0, eval.PassAt1);                                                                                          // engine eval
            Assert.False(R1V2.Native.Trainer.Evaluation.MajorityIsRight([text, text], row));
            Assert.Equal(false, R1V2.Native.Trainer.Tasks.DigitScenes.Reading(text, row)?.FollowsReading);
        }
        const string answered = "I see the digits 3, 4. 3 + 4 = 7.</think>\\boxed{7}";
        Assert.Equal(1, R1V2.Native.Trainer.PromptSampling.RuleAndFormat(answered, row).Rule);
        Assert.Equal(1, R1V2.Native.Trainer.Evaluation.Score([(row, (IReadOnlyList<string>)[answered])], new R1V2.Native.Trainer.EvalSettings(), t => t.Length).Result.PassAt1);
        Assert.True(R1V2.Native.Trainer.Evaluation.MajorityIsRight([answered], row));
    }
}
