using System.Text.Json;
using R1V2.Native.Cli;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;
using R1V2.Native.Trainer.Tasks;

namespace R1V2.Native.Tests.Trainer;

[Collection("cpu")]
public sealed class EvaluationTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-eval-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private (string Model, string Data) Setup()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 5);
        new DigitScenes(MnistDigits.Embedded(), DigitSplit.HeldOut).WriteDataset(Path.Combine(_dir, "digits"), 6, seed: 2);
        return (ckpt, Path.Combine(_dir, "digits", "prompts.jsonl"));
    }

    [Fact]
    public void Metrics_AreTheAggregatesOfTheScoredSamples_AndReproduceFromTheSeed()
    {
        var (ckpt, data) = Setup();
        var dataset = new PromptDataset(data, 0, shuffle: false);
        var prompts = Enumerable.Range(0, dataset.Count).Select(dataset.Read).ToList();
        using var model = VisionLanguageModel.Load(fx.Backend, ckpt);
        var tok = TextTokenizer.Load(ckpt);
        var settings = new EvalSettings(Samples: 3, MaxNewTokens: 6, Temperature: 1f, TopP: 1f, Seed: 4, ClaimPattern: EvalCommand.DigitClaimPattern);
        var (r, samples) = Evaluation.Run(model, tok, prompts, settings);
        Assert.Equal(18, samples.Count);
        foreach (var s in samples)
        {
            Assert.Equal(AnswerVerifier.Score(s.Response, prompts[s.Prompt].Answer) > 0, s.Correct);
            Assert.Equal(new FormatReward().Score(s.Response) == 1.0, s.WellFormed);
            Assert.NotNull(s.Grounded); // every digit prompt knows its image
        }
        var perPrompt = samples.GroupBy(s => s.Prompt).Select(g => g.Average(s => s.Correct ? 1.0 : 0.0)).ToList();
        Assert.Equal(perPrompt.Average(), r.PassAt1, 12);
        Assert.Equal(samples.Average(s => s.WellFormed ? 1.0 : 0.0), r.FormatRate, 12);
        Assert.Equal(samples.Average(s => s.Grounded!.Value ? 0.0 : 1.0), r.HallucinationRate!.Value, 12);
        Assert.Equal(18, r.GroundingChecks);
        Assert.Equal(prompts.GroupBy(p => p.Type).Count(), r.ByType.Count);
        Assert.Equal(6, r.ByType.Sum(t => t.Prompts));

        var (again, againSamples) = Evaluation.Run(model, tok, prompts, settings);
        Assert.Equal(samples.Select(s => s.Response), againSamples.Select(s => s.Response));
        Assert.Equal(r.PassAt1, again.PassAt1);

        // Each prompt samples from its own seed: one prompt per generator batch or all six at once, the same responses.
        var sampling = new Engine.Backends.SamplingParams(1f, TopP: 1f);
        RewardBreakdown None(string _, PromptRow __) => new(0, 0, 0, 0, 0);
        var alone = PromptSampling.Sample(model, tok, prompts, 3, sampling, 6, 4, None, batchSequences: 3);
        var together = PromptSampling.Sample(model, tok, prompts, 3, sampling, 6, 4, None, batchSequences: 64);
        Assert.Equal(alone.SelectMany(g => g.Responses), together.SelectMany(g => g.Responses));
        Assert.True(alone.SelectMany(g => g.Responses).Distinct().Count() > 6, "the samples should differ");

        // Bad settings fail before any sampling, naming what is wrong.
        Assert.Contains("the claim pattern (--claim-pattern) is not a valid regex",
            Assert.Throws<ArgumentException>(() => Evaluation.Run(model, tok, prompts, settings with { ClaimPattern = "I see ([0-9]" })).Message);
        Assert.Contains("the claim pattern (--claim-pattern) needs a group",
            Assert.Throws<ArgumentException>(() => Evaluation.Run(model, tok, prompts, settings with { ClaimPattern = "I see" })).Message);
        Assert.Contains("eval batch", Assert.Throws<ArgumentException>(() => Evaluation.Run(model, tok, prompts, settings with { BatchSequences = 0 })).Message);

        var files = Evaluation.Write(Path.Combine(_dir, "out"), r, samples);
        Assert.Equal(18, File.ReadAllLines(files.Single(f => f.EndsWith("samples.jsonl"))).Length);
        Assert.Equal(r.PassAt1, JsonDocument.Parse(File.ReadAllText(files.Single(f => f.EndsWith("eval.json")))).RootElement.GetProperty("PassAt1").GetDouble());
    }

    [Fact]
    public void Score_HandCheckedAggregates()
    {
        PromptRow Row(int i, string answer, string type, int[] digits) => new(i, "q", answer, [], null, digits, null, type);
        var s = new EvalSettings(Samples: 2, ClaimPattern: DigitScenes.ClaimPattern);
        var groups = new List<(PromptRow, IReadOnlyList<string>)>
        {
            // Sum of 5 and 7: one right and grounded, one wrong that claims an absent 8.
            (Row(0, "12", "sum", [5, 7]), ["I see the digits 5, 7. 5 + 7 = 12.</think>\\boxed{12}", "I see the digits 5, 8. 5 + 8 = 13.</think>\\boxed{13}"]),
            // Presence of 3: one right; one unfinished (no </think>): its "Answer:" line is still thinking, so it has no answer
            // and is not well formed.
            (Row(1, "yes", "present", [3]), ["I see the digit 3. 3 is among them.</think>\\boxed{yes}", "I see the digit 3.\nAnswer: yes"]),
            // Largest: both wrong.
            (Row(2, "9", "largest", [9, 1]), ["I see the digits 9, 1. The largest is 1.</think>\\boxed{1}", "I see the digits 9, 1.</think>"]),
        };
        var (r, samples) = Evaluation.Score(groups, s, text => text.Length);
        Assert.Equal([true, false, true, false, false, false], samples.Select(x => x.Correct));
        Assert.Equal((0.5 + 0.5 + 0) / 3, r.PassAt1, 12);
        double m = 1.0 / 3, se = Math.Sqrt(((0.5 - m) * (0.5 - m) * 2 + m * m) / 2 / 3); // sample std over prompts / sqrt(n)
        Assert.Equal(se, r.PassAt1StdError, 12);
        Assert.Equal(4.0 / 6, r.FormatRate, 12);        // the unfinished one and the empty answer are not well formed
        Assert.Equal(1.0 / 6, r.HallucinationRate!.Value, 12);
        Assert.Equal([("largest", 0.0), ("present", 0.5), ("sum", 0.5)], r.ByType.Select(t => (t.Type, t.PassAt1)));
        Assert.Equal(groups.SelectMany(g => g.Item2).Average(t => (double)t.Length), r.MeanResponseTokens, 12);
    }

    [Fact]
    public void Score_ReadingChecks_HandChecked()
    {
        PromptRow Row(int i, string question, string answer, string type, int[]? digits) => new(i, question, answer, [], null, null, null, type) { Digits = digits };
        const string sum = "What is the sum of the digits in the image?", largest = "What is the largest digit in the image?";
        var groups = new List<(PromptRow, IReadOnlyList<string>)>
        {
            // Read right and added right; read 8 for the 7 and added what it read (wrong, yet it follows its reading).
            (Row(0, sum, "12", "sum", [5, 7]), ["I see the digits 5, 7. 5 + 7 = 12.</think>\\boxed{12}", "I see the digits 5, 8. 5 + 8 = 13.</think>\\boxed{13}"]),
            // Read right and concluded right; misread the 9 as a 4 and still answered 9: right, but not from its reading.
            (Row(1, largest, "9", "largest", [9, 1]), ["I see the digits 9, 1. The largest is 9.</think>\\boxed{9}", "I see the digits 4, 1. The largest is 9.</think>\\boxed{9}"]),
            // No claim at all: neither reads nor follows; then read right and concluded right.
            (Row(2, "Is the digit 3 in the image? Answer yes or no.", "yes", "present", [3]), ["</think>\\boxed{yes}", "I see the digit 3. 3 is among them.</think>\\boxed{yes}"]),
            // Not checked: no scene digits, or a type that is not a digit question.
            (Row(3, sum, "4", "sum", null), ["I see the digit 4.</think>\\boxed{4}"]),
            (Row(4, "Which animal?", "cat", "animals", [1]), ["I see the digit 1.</think>\\boxed{cat}"]),
        };
        var (r, samples) = Evaluation.Score(groups, new EvalSettings(Samples: 2), text => text.Length);
        Assert.Equal([true, false, true, false, false, true, null, null], samples.Select(x => x.ReadsExactly));
        Assert.Equal([true, true, true, false, false, true, null, null], samples.Select(x => x.FollowsReading));
        Assert.Equal([true, false, true, true, true, true, true, true], samples.Select(x => x.Correct));
        Assert.Equal(6, r.ReadingChecks);
        Assert.Equal(3.0 / 6, r.ReadsExactlyRate!.Value, 12);
        Assert.Equal(4.0 / 6, r.FollowsReadingRate!.Value, 12);

        var unchecked_ = Evaluation.Score(groups.Skip(3).ToList(), new EvalSettings(), text => text.Length).Result;
        Assert.Equal((0, null, null), (unchecked_.ReadingChecks, unchecked_.ReadsExactlyRate, unchecked_.FollowsReadingRate));
        Assert.DoesNotContain("reads the scene's digits", Evaluation.Markdown(unchecked_));
        var md = Evaluation.Markdown(r);
        Assert.Contains("| reads the scene's digits exactly (6 digit-question samples) | 0.500 |", md);
        Assert.Contains("| answer follows from the digits it claims (right or wrong) | 0.667 |", md);
    }

    [Fact]
    public void PassAtKAndMajority_HandChecked()
    {
        PromptRow Row(int i, string answer, IReadOnlyList<string>? choices = null) => new(i, "q", answer, [], choices, null, null, "sum");
        static string Boxed(string a) => $"done</think>\\boxed{{{a}}}";
        var groups = new List<(PromptRow, IReadOnlyList<string>)>
        {
            (Row(0, "12"), [Boxed("12"), Boxed("13"), Boxed("12.0"), Boxed("13")]),  // 12 and 12.0 are one answer: 2 votes, tie with 13 -> the first given (12), right
            (Row(1, "7"), [Boxed("5"), Boxed("7"), Boxed("5"), Boxed("9")]),         // 5 wins: wrong; some sample right
            (Row(2, "4"), ["no answer", "no answer", Boxed("4"), "still none"]),      // the unanswered group (3) wins: wrong
            (Row(3, "2"), [Boxed("3"), Boxed("3"), Boxed("1"), Boxed("0")]),         // never right
            (Row(4, "B", ["cat", "dog"]), [Boxed("dog"), Boxed("(B)"), Boxed("A"), Boxed("cat")]), // choices: "dog" is B: 2 votes, right
        };
        var (r, _) = Evaluation.Score(groups, new EvalSettings(Samples: 4), text => text.Length);
        Assert.Equal((2 + 1 + 1 + 0 + 2) / 4.0 / 5, r.PassAt1, 12);
        Assert.Equal(4.0 / 5, r.PassAtK!.Value, 12);
        Assert.Equal(2.0 / 5, r.MajorityAtK!.Value, 12);
        Assert.False(Evaluation.MajorityIsRight([Boxed("13"), Boxed("12"), Boxed("12"), Boxed("13")], Row(0, "12"))); // the tie now goes to 13
        Assert.False(Evaluation.MajorityIsRight([], Row(0, "12")));
        var md = Evaluation.Markdown(r);
        Assert.Contains("| pass@4 (any sample right) | 0.800 |", md);
        Assert.Contains("| majority of 4 samples right | 0.400 |", md);
        Assert.DoesNotContain("pass@1 (any", Evaluation.Markdown(r with { SamplesPerPrompt = 1 }));
        // An evaluation written before these were measured reads back without them, not as zeros.
        var old = JsonSerializer.Deserialize<EvalResult>(JsonSerializer.Serialize(r).Replace("\"PassAtK\":0.8,", "").Replace(",\"MajorityAtK\":0.4", ""))!;
        Assert.Equal((null, null), (old.PassAtK, old.MajorityAtK));
        Assert.DoesNotContain("any sample right", Evaluation.Markdown(old));
    }

    [Fact]
    public void Markdown_ShowsEveryMetricAndType()
    {
        var r = new EvalResult("m", "d.jsonl", 4, 2, 0.625, 0.1, 0.75, 0.125, 8, 12.5,
            [new EvalTypeResult("sum", 2, 0.5), new EvalTypeResult("present", 2, 0.75)], new EvalSettings(2), 1.0);
        var md = Evaluation.Markdown(r);
        Assert.Contains("| pass@1 (mean over 2 samples) | 0.625 ± 0.100 |", md);
        Assert.Contains("| format rate | 0.750 |", md);
        Assert.Contains("| hallucination rate (8 checked samples) | 0.125 |", md);
        Assert.Contains("| sum | 2 | 0.500 |", md);
        Assert.Contains("| present | 2 | 0.750 |", md);
    }

    [Fact]
    public void EvalCommand_WritesTheSummary()
    {
        var (ckpt, data) = Setup();
        var output = Path.Combine(_dir, "cli");
        Assert.Equal(0, Program.Main(["eval", "--model", ckpt, "--data", data, "--limit", "2", "--max-new-tokens", "4", "--backend", "cpu", "--out", output]));
        var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "eval.json"))).RootElement;
        Assert.Equal(2, json.GetProperty("Prompts").GetInt32());
        Assert.True(File.Exists(Path.Combine(output, "eval.md")));
    }
    [Fact]
    public void PairedDifference_IsTheMeanPerPromptGain_WithItsStandardError()
    {
        static List<EvalSample> Of(params bool[][] prompts) =>
            prompts.SelectMany((p, i) => p.Select((c, k) => new EvalSample(i, k, "sum", "1", "", c, true, null))).ToList();
        // Per-prompt pass rates: baseline 1/2, 0, 1; other 1, 1/2, 1 -> differences 1/2, 1/2, 0.
        var baseline = Of([true, false], [false, false], [true, true]);
        var other = Of([true, true], [true, false], [true, true]);
        var (d, se, n) = Evaluation.PairedDifference(baseline, other);
        Assert.Equal(3, n);
        Assert.Equal(1.0 / 3, d, 12);
        // Sample variance of (1/2, 1/2, 0) around 1/3 is (1/36 + 1/36 + 4/36) / 2 = 1/12; SE = sqrt(1/12 / 3) = 1/6.
        Assert.Equal(1.0 / 6, se, 12);
        Assert.Throws<ArgumentException>(() => Evaluation.PairedDifference(baseline, Of([true, true])));
    }
}
