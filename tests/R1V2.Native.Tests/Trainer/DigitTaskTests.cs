using R1V2.Native.Engine.Images;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;
using R1V2.Native.Trainer.Tasks;

namespace R1V2.Native.Tests.Trainer;

public sealed class DigitTaskTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-digits-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void EmbeddedSubset_Holds150Train100Reinforcement50ValidationAnd300HeldOutPerDigit_FromDisjointSourceImages()
    {
        var m = MnistDigits.Embedded();
        Assert.Equal(6000, m.All.Count);
        for (int d = 0; d < 10; d++)
        {
            var train = m.Of(DigitSplit.Train, d);
            var validation = m.Of(DigitSplit.Validation, d);
            var held = m.Of(DigitSplit.HeldOut, d);
            var rl = m.Of(DigitSplit.Reinforcement, d);
            Assert.Equal((150, 100, 50, 300), (train.Count, rl.Count, validation.Count, held.Count));
            var splits = new[] { train, rl, validation, held }.Select(x => x.Select(i => (i.Split, i.SourceIndex)).ToList()).ToList();
            Assert.Equal(600, splits.SelectMany(x => x.Select(i => i.SourceIndex)).Distinct().Count()); // disjoint source images
            Assert.Empty(train.Select(x => x.SourceIndex).Intersect(held.Select(x => x.SourceIndex)));
            Assert.Empty(train.Select(x => x.SourceIndex).Intersect(validation.Select(x => x.SourceIndex)));
            Assert.Empty(validation.Select(x => x.SourceIndex).Intersect(held.Select(x => x.SourceIndex)));
            Assert.All(validation, img => Assert.Equal(DigitSplit.Validation, img.Split));
            Assert.All(rl, img => Assert.Equal(DigitSplit.Reinforcement, img.Split));
            Assert.All(train.Concat(validation).Concat(held), img =>
            {
                Assert.Equal(784, img.Pixels.Length);
                Assert.Equal(0, img.Pixels[0]);                  // background corner
                Assert.InRange(img.Pixels.Count(p => p > 128), 20, 500); // some ink, not a filled square
            });
        }
        // No two images of a split are the same picture.
        Assert.Equal(6000, m.All.Select(x => Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(x.Pixels))).Distinct().Count());
    }

    [Fact]
    public void BadSubsetFile_IsAClearError()
    {
        using var ms = new MemoryStream();
        using (var z = new System.IO.Compression.GZipStream(ms, System.IO.Compression.CompressionLevel.Fastest, leaveOpen: true)) z.Write("R1MN\u0001\0\0\0\u0005\0\0\0"u8);
        ms.Position = 0;
        var e = Assert.Throws<InvalidDataException>(() => MnistDigits.Read(ms, "bad.gz"));
        Assert.Contains("bad.gz", e.Message);
    }

    [Fact]
    public void Scenes_AnswersFollowFromTheDigits_AndDrawOnlyFromTheirSplit()
    {
        var m = MnistDigits.Embedded();
        foreach (var split in new[] { DigitSplit.Train, DigitSplit.HeldOut })
        {
            var scenes = new DigitScenes(m, split);
            var rng = new Random(3);
            var counts = new int[5];
            for (int i = 0; i < 400; i++)
            {
                var item = scenes.Sample(rng);
                counts[(int)item.Type]++;
                Assert.InRange(item.Digits.Length, 1, 4);
                Assert.All(item.Sources, s => Assert.Equal(split, s.Split));
                Assert.Equal(item.Digits, item.Sources.Select(s => s.Label));
                Assert.True(item.Canvas.Count(p => p > 128) >= 10 * item.Digits.Length / 2, "the digits are drawn");
                string expected = item.Type switch
                {
                    DigitQuestionType.Sum => item.Digits.Sum().ToString(),
                    DigitQuestionType.Largest => item.Digits.Max().ToString(),
                    DigitQuestionType.Count => item.Digits.Count(d => d == Asked(item.Question)).ToString(),
                    DigitQuestionType.Present => item.Digits.Contains(Asked(item.Question)) ? "yes" : "no",
                    _ => string.Join(", ", item.Digits),
                };
                Assert.Equal(expected, item.Answer);
                Assert.Equal(1.0, AnswerVerifier.Score($"<think>...</think> \\boxed{{{item.Answer}}}", item.Answer));
            }
            Assert.All(counts, c => Assert.InRange(c, 50, 110)); // five types, about 80 each
        }
        Assert.False(AnswerVerifier.Equivalent("37", "3, 7"));     // reading order is not a number
        Assert.False(AnswerVerifier.Equivalent("7, 3", "3, 7"));
    }

    [Fact]
    public void Traces_EarnTheFullRuleAndFormatReward_AndClaimExactlyTheDigitsShown()
    {
        var scenes = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Train);
        var rng = new Random(8);
        var grounding = new R1V2.Native.Trainer.Grounding([], DigitScenes.ClaimPattern);
        for (int i = 0; i < 200; i++)
        {
            var item = scenes.Sample(rng);
            var trace = item.Trace();
            Assert.Equal(1.0, AnswerVerifier.Score(trace, item.Answer));
            Assert.Equal(1.0, new FormatReward().Score(trace));
            var row = new PromptRow(i, item.Question, item.Answer, [], null, item.Digits.Distinct().ToList());
            Assert.True(grounding.Check(trace, row));
            Assert.Equal(string.Concat(item.Digits), grounding.DigitClaims(trace).Replace(", ", ""));
            int absent = Enumerable.Range(0, 10).FirstOrDefault(d => !item.Digits.Contains(d), -1);
            if (absent >= 0) Assert.False(grounding.Check(trace.Replace($"see the digit{(item.Digits.Length > 1 ? "s" : "")} {item.Digits[0]}", $"see the digit{(item.Digits.Length > 1 ? "s" : "")} {absent}"), row));
        }
        var seven = new DigitTaskItem("What is the sum of the digits in the image?", "12", DigitQuestionType.Sum, [5, 7], [], 64, []);
        Assert.Equal("I see the digits 5, 7. 5 + 7 = 12.</think>\\boxed{12}", seven.Trace());
    }

    [Fact]
    public void WorkedTraces_GoThroughTheDigitsOneAtATime_AndEarnTheSameRewards()
    {
        static DigitTaskItem Item(string question, string answer, DigitQuestionType type, int[] digits) => new(question, answer, type, digits, [], 64, []) { Worked = true };
        Assert.Equal("I see the digits 9, 6, 6, 2. 9 + 6 = 15, 15 + 6 = 21, 21 + 2 = 23.</think>\\boxed{23}",
            Item("What is the sum of the digits in the image?", "23", DigitQuestionType.Sum, [9, 6, 6, 2]).Trace());
        Assert.Equal("I see the digits 5, 7. 5 + 7 = 12.</think>\\boxed{12}", Item("What is the sum of the digits in the image?", "12", DigitQuestionType.Sum, [5, 7]).Trace());
        Assert.Equal("I see the digits 7, 6, 6, 9. Counting 6s: 7 no, 6 yes, 6 yes, 9 no. 6 appears 2 times.</think>\\boxed{2}",
            Item("How many times does the digit 6 appear in the image?", "2", DigitQuestionType.Count, [7, 6, 6, 9]).Trace());
        Assert.Equal("I see the digits 3, 0. Looking for 0: 3 no, 0 yes. 0 is among them.</think>\\boxed{yes}",
            Item("Is the digit 0 in the image? Answer yes or no.", "yes", DigitQuestionType.Present, [3, 0]).Trace());
        Assert.Equal("I see the digit 4. The largest is 4.</think>\\boxed{4}", Item("What is the largest digit in the image?", "4", DigitQuestionType.Largest, [4]).Trace());

        var scenes = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Train);
        var rng = new Random(5);
        for (int i = 0; i < 200; i++)
        {
            var item = scenes.Sample(rng) with { Worked = true };
            var trace = item.Trace();
            Assert.Equal(1.0, AnswerVerifier.Score(trace, item.Answer));
            Assert.Equal(1.0, new FormatReward().Score(trace));
            Assert.Equal(item.Digits, DigitScenes.ClaimedDigits(trace));
            var row = new PromptRow(i, item.Question, item.Answer, [], null, item.Digits.Distinct().ToList(), Type: item.Type.Name()) { Digits = item.Digits };
            Assert.Equal((true, true), DigitScenes.Reading(trace, row));
        }
    }

    [Fact]
    public void WorkedTraceShare_ChangesOnlyTheTraces_NotTheScenes()
    {
        var scenes = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Train);
        string plain = Path.Combine(_dir, "plain"), mixed = Path.Combine(_dir, "mixed");
        scenes.WriteDataset(plain, 60, 4);
        var items = scenes.WriteDataset(mixed, 60, 4, workedShare: 0.5);
        Assert.Equal(File.ReadAllText(Path.Combine(plain, "prompts.jsonl")), File.ReadAllText(Path.Combine(mixed, "prompts.jsonl")));
        Assert.InRange(items.Count(x => x.Worked), 18, 42);
        var a = File.ReadAllLines(Path.Combine(plain, "sft.jsonl"));
        var b = File.ReadAllLines(Path.Combine(mixed, "sft.jsonl"));
        for (int i = 0; i < items.Count; i++)
        {
            bool differs = items[i].Worked && items[i].Type is DigitQuestionType.Count or DigitQuestionType.Present
                || items[i].Worked && items[i].Type == DigitQuestionType.Sum && items[i].Digits.Length > 2;
            Assert.Equal(!differs, a[i] == b[i]);
        }
    }

    [Fact]
    public void RejectedTraces_MisreadOneDigitOrConcludeWrongly_AndNeverMatchTheReference()
    {
        var scenes = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Train);
        var rng = new Random(21);
        var grounding = new R1V2.Native.Trainer.Grounding([], DigitScenes.ClaimPattern);
        int misread = 0, wrongConclusion = 0;
        for (int i = 0; i < 400; i++)
        {
            var item = scenes.Sample(rng);
            Assert.Equal(item.Answer, DigitScenes.AnswerFor(item.Type, item.Question, item.Digits));
            Assert.Equal(item.Type, DigitQuestionTypes.Parse(item.Type.Name()));
            var bad = DigitScenes.Rejected(item, rng);
            var trace = bad.Trace();
            Assert.NotEqual(item.Trace(), trace);
            Assert.Equal(1.0, new FormatReward().Score(trace));
            var claimed = grounding.DigitClaims(trace).Split(", ").Select(int.Parse).ToArray();
            Assert.Equal(item.Digits.Length, claimed.Length);
            int differing = claimed.Zip(item.Digits).Count(x => x.First != x.Second);
            if (differing == 1)
            {
                misread++; // the reasoning follows the wrong claim
                Assert.Equal(DigitScenes.AnswerFor(item.Type, item.Question, claimed), bad.Answer);
            }
            else
            {
                wrongConclusion++; // right claims, wrong answer
                Assert.Equal(0, differing);
                Assert.Equal(0.0, AnswerVerifier.Score(trace, item.Answer));
                Assert.DoesNotContain("-", bad.Answer);
            }
        }
        Assert.InRange(misread, 150, 250);
        Assert.InRange(wrongConclusion, 150, 250);
        Assert.Throws<ArgumentException>(() => DigitQuestionTypes.Parse("product"));
    }

    [Fact]
    public void SplitNames_RoundTrip_AndAnUnknownNameIsAnError()
    {
        Assert.Equal(["train", "held-out", "validation", "reinforcement"], Enum.GetValues<DigitSplit>().Select(x => x.Name()));
        Assert.All(Enum.GetValues<DigitSplit>(), x => Assert.Equal(x, DigitSplits.Parse(x.Name())));
        Assert.Equal(DigitSplit.HeldOut, DigitSplits.Parse("heldout"));
        Assert.Contains("'test'", Assert.Throws<ArgumentException>(() => DigitSplits.Parse("test")).Message);
    }

    [Fact]
    public void Scenes_PutEachDigitInItsOwnCell_InDistinctColumnsFromLeftToRight_AndInkNowhereElse()
    {
        var scenes = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Train, canvasSize: 64);
        var rng = new Random(21);
        const int g = DigitScenes.GridCells, cell = 64 / g;
        var columnsUsed = new HashSet<int>();
        for (int i = 0; i < 300; i++)
        {
            var item = scenes.Sample(rng);
            Assert.Equal(g * g, item.Cells.Length);
            Assert.Equal(item.Digits.Length, item.Cells.Count(c => c >= 0));
            // Column by column, at most one digit each; read left to right they are the scene's digits in order.
            var read = new List<int>();
            for (int col = 0; col < g; col++)
            {
                var inColumn = Enumerable.Range(0, g).Select(r => item.Cells[r * g + col]).Where(c => c >= 0).ToList();
                Assert.True(inColumn.Count <= 1, $"scene {i}: column {col} holds {inColumn.Count} digits");
                if (inColumn.Count == 1) { read.Add(inColumn[0]); columnsUsed.Add(col); }
            }
            Assert.Equal(item.Digits, read);
            // Ink only inside the cells that hold a digit, and some in each of them.
            for (int c = 0; c < g * g; c++)
            {
                int ink = 0;
                for (int y = c / g * cell; y < (c / g + 1) * cell; y++)
                    for (int x = c % g * cell; x < (c % g + 1) * cell; x++) ink += item.Canvas[y * 64 + x] > 0 ? 1 : 0;
                if (item.Cells[c] < 0) Assert.Equal(0, ink);
                else Assert.True(ink > 10, $"scene {i}: the {item.Cells[c]} in cell {c} has {ink} ink pixels");
            }
        }
        Assert.Equal(g, columnsUsed.Count);
    }

    [Fact]
    public void TextPrompts_StateTheDigits_AndTheTextDatasetPairsThemWithTheSameTraces()
    {
        var items = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Train).WriteDataset(Path.Combine(_dir, "t"), 12, seed: 4);
        var text = new SftDataset(Path.Combine(_dir, "t", "text-sft.jsonl"), 0, shuffle: false);
        var image = new SftDataset(Path.Combine(_dir, "t", "sft.jsonl"), 0, shuffle: false);
        Assert.Equal(12, text.Count);
        for (int i = 0; i < 12; i++)
        {
            var t = text.Read(i);
            Assert.Equal($"Digits: {string.Join(" ", items[i].Digits)}.\n{items[i].Question}", t.Prompt);
            Assert.Empty(t.Images);
            Assert.Equal(image.Read(i).Response, t.Response);
        }
        var seven = new DigitTaskItem("What is the sum of the digits in the image?", "12", DigitQuestionType.Sum, [5, 7], [], 64, []);
        Assert.Equal("Digits: 5 7.\nWhat is the sum of the digits in the image?", seven.TextPrompt);
    }

    private static int Asked(string question) => question.First(char.IsAsciiDigit) - '0';

    [Fact]
    public void Dataset_IsReproducibleFromItsSeed_AndReadsAsPrompts()
    {
        var scenes = new DigitScenes(MnistDigits.Embedded(), DigitSplit.HeldOut, canvasSize: 64);
        var a = scenes.WriteDataset(Path.Combine(_dir, "a"), 20, seed: 9);
        var b = scenes.WriteDataset(Path.Combine(_dir, "b"), 20, seed: 9);
        Assert.Equal(File.ReadAllLines(Path.Combine(_dir, "a", "prompts.jsonl")), File.ReadAllLines(Path.Combine(_dir, "b", "prompts.jsonl")));
        Assert.Equal(a.Select(x => x.Canvas), b.Select(x => x.Canvas));
        var c = scenes.WriteDataset(Path.Combine(_dir, "c"), 20, seed: 10);
        Assert.NotEqual(a.Select(x => x.Answer + x.Question), c.Select(x => x.Answer + x.Question));

        var data = new PromptDataset(Path.Combine(_dir, "a", "prompts.jsonl"), 0, shuffle: false);
        Assert.Equal(20, data.Count);
        var row = data.Read(0);
        Assert.Equal(a[0].Question, row.Question);
        Assert.Equal(a[0].Digits.Distinct().Order(), row.ImageDigits!);
        Assert.Equal(a[0].Digits, row.Digits!); // in order, for the reading check
        var (pixels, tiles) = new ImagePreprocessor(64).Load(Assert.Single(row.Images));
        Assert.Equal(1, tiles);
        Assert.Equal(3 * 64 * 64, pixels.Length);
    }

    [Fact]
    public void DigitsCommand_WritesTheDataset_AndRejectsAnUnknownSplit()
    {
        Assert.Equal(0, R1V2.Native.Cli.Commands.DigitsCommand.Run(Path.Combine(_dir, "cli"), "train", 5, 1, 64));
        var lines = File.ReadAllLines(Path.Combine(_dir, "cli", "prompts.jsonl"));
        Assert.Equal(5, lines.Length);
        Assert.Equal(5, new SftDataset(Path.Combine(_dir, "cli", "sft.jsonl"), 0).Count);
        Assert.All(lines, l => Assert.Matches("\"type\":\"(sum|largest|count|present|left_to_right)\"", l));
        Assert.Throws<ArgumentException>(() => R1V2.Native.Cli.Commands.DigitsCommand.Run(Path.Combine(_dir, "x"), "test", 5, 1, 64));
        Assert.Equal(0, R1V2.Native.Cli.Commands.DigitsCommand.Run(Path.Combine(_dir, "one"), "train", 20, 1, 64, maxDigits: 1));
        Assert.All(File.ReadAllLines(Path.Combine(_dir, "one", "prompts.jsonl")), l => Assert.Matches("\"digits\":\\[[0-9]\\]", l));
        Assert.Equal(0, R1V2.Native.Cli.Commands.DigitsCommand.Run(Path.Combine(_dir, "val"), "validation", 5, 1, 64));
        Assert.Equal(5, File.ReadAllLines(Path.Combine(_dir, "val", "prompts.jsonl")).Length);
        // Validation scenes draw only validation images.
        var items = new DigitScenes(MnistDigits.Embedded(), DigitSplit.Validation).WriteDataset(Path.Combine(_dir, "val2"), 20, 3);
        Assert.All(items.SelectMany(i => i.Sources), src => Assert.Equal(DigitSplit.Validation, src.Split));
    }
}
