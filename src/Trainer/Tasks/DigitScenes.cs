using System.Text.Json;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace R1V2.Native.Trainer.Tasks;

/// <summary>The kinds of question asked about a scene of digits.</summary>
public enum DigitQuestionType { Sum, Largest, Count, Present, LeftToRight }

public static class DigitQuestionTypes
{
    /// <summary>The name used in datasets and reports: sum, largest, count, present, left_to_right.</summary>
    public static string Name(this DigitQuestionType t) => t == DigitQuestionType.LeftToRight ? "left_to_right" : t.ToString().ToLowerInvariant();

    public static DigitQuestionType Parse(string name) => TryParse(name, out var t)
        ? t : throw new ArgumentException($"unknown digit question type '{name}' (sum, largest, count, present, left_to_right)");

    public static bool TryParse(string name, out DigitQuestionType type)
    {
        foreach (var t in Enum.GetValues<DigitQuestionType>())
            if (t.Name() == name) { type = t; return true; }
        type = default;
        return false;
    }
}

/// <summary>One visual question: a canvas with 1-4 handwritten digits, the question, and its verifiable answer.</summary>
/// <param name="Digits">The digits on the canvas from left to right.</param>
/// <param name="Canvas">Grey pixels, row-major, <paramref name="CanvasSize"/> squared.</param>
/// <param name="Sources">The <see cref="DigitImage"/> drawn for each digit (its split and source index), for audits.</param>
public sealed record DigitTaskItem(string Question, string Answer, DigitQuestionType Type, int[] Digits, byte[] Canvas, int CanvasSize, DigitImage[] Sources)
{
    /// <summary>The digit in each cell of the layout grid, row by row (<see cref="DigitScenes.GridCells"/> squared; -1: empty).</summary>
    public int[] Cells { get; init; } = [];

    /// <summary>
    /// Whether <see cref="Trace"/> works through the digits one at a time (a running sum, a yes or no per digit) instead of stating the step in one line; largest and left-to-right questions read the same either way.
    /// </summary>
    public bool Worked { get; init; }

    /// <summary>
    /// A templated reasoning trace ending in the answer, as the model writes it after the generation prompt (which
    /// opens <c>&lt;think&gt;</c>): first what the image shows ("I see the digits 5, 7." left to
    /// right, the claim the grounding check reads), then the step the question needs, then <c>\boxed{answer}</c>.
    /// </summary>
    public string Trace()
    {
        var seen = $"I see the digit{(Digits.Length > 1 ? "s" : "")} {string.Join(", ", Digits)}.";
        int asked = Question.FirstOrDefault(char.IsAsciiDigit) - '0';
        var step = Type switch
        {
            DigitQuestionType.Sum when Worked && Digits.Length > 2 => " " + string.Join(", ", RunningSums()) + ".",
            DigitQuestionType.Sum => Digits.Length == 1 ? $" The sum is {Answer}." : $" {string.Join(" + ", Digits)} = {Answer}.",
            DigitQuestionType.Largest => $" The largest is {Answer}.",
            DigitQuestionType.Count when Worked => $" Counting {asked}s: {Marks(asked)}. {asked} appears {Answer} time{(Answer == "1" ? "" : "s")}.",
            DigitQuestionType.Count => $" {asked} appears {Answer} time{(Answer == "1" ? "" : "s")}.",
            DigitQuestionType.Present when Worked => $" Looking for {asked}: {Marks(asked)}."
                + (Answer == "yes" ? $" {asked} is among them." : $" {asked} is not among them."),
            DigitQuestionType.Present => Answer == "yes" ? $" {asked} is among them." : $" {asked} is not among them.",
            _ => "",
        };
        return $"{seen}{step}</think>\\boxed{{{Answer}}}"; // the generation prompt already opened <think>
    }

    /// <summary>"a + b = s" for each digit after the first, s the running total: 9 + 6 = 15, 15 + 6 = 21.</summary>
    private IEnumerable<string> RunningSums()
    {
        int total = Digits[0];
        foreach (var d in Digits.Skip(1)) yield return $"{total} + {d} = {total += d}";
    }

    /// <summary>Each digit marked yes or no as it is or is not the asked one: 7 no, 6 yes.</summary>
    private string Marks(int asked) => string.Join(", ", Digits.Select(d => $"{d} {(d == asked ? "yes" : "no")}"));

    /// <summary>
    /// The question with the scene's digits given as text instead of the image ("Digits: 5 7." on the line before):
    /// the language warm-up's prompt, which teaches the decoder the traces and to use digits it finds in its context.
    /// </summary>
    public string TextPrompt => $"Digits: {string.Join(" ", Digits)}.\n{Question}";

    /// <summary>The canvas as a PNG file.</summary>
    public void SavePng(string path)
    {
        using var image = Image.LoadPixelData<L8>(Canvas, CanvasSize, CanvasSize);
        image.SaveAsPng(path);
    }
}

/// <summary>
/// Composes scenes of 1 to <c>maxDigits</c> handwritten digits from one split of <see cref="MnistDigits"/> on a square
/// canvas (each digit scaled and placed at random in its own cell of a 4 x 4 grid, in distinct columns, so left to right
/// is well defined) and asks a verifiable question:
/// the sum, the largest digit, how many times a digit appears, whether a digit is present, or the digits from left to
/// right. Everything is drawn from the caller's seeded <see cref="Random"/>, so a seed gives the same items.
/// </summary>
public sealed class DigitScenes(MnistDigits source, DigitSplit split, int canvasSize = 64, int maxDigits = 4)
{
    public const string LeftToRightSeparator = ", ";

    /// <summary>Where a trace says what it sees ("I see the digits 5, 7"): the digits it claims, for the grounding check.</summary>
    public const string ClaimPattern = @"I see the digits? ([0-9](?:, [0-9])*)";

    /// <summary>Cells per side of the layout grid.</summary>
    public const int GridCells = 4;

    public int CanvasSize => canvasSize;
    public DigitSplit Split => split;

    public DigitTaskItem Sample(Random rng, DigitQuestionType? type = null)
    {
        if (canvasSize < 8 * GridCells || canvasSize % GridCells != 0 || maxDigits < 1 || maxDigits > GridCells)
            throw new ArgumentException($"the canvas must be a multiple of {GridCells} pixels, at least {8 * GridCells}, and a scene holds 1-{GridCells} digits");
        int n = rng.Next(1, maxDigits + 1);
        var digits = new int[n];
        for (int i = 0; i < n; i++) digits[i] = rng.Next(10);
        var (canvas, sources, cells) = Compose(rng, digits);
        var kind = type ?? (DigitQuestionType)rng.Next(5);
        var (question, answer) = Ask(rng, kind, digits);
        return new DigitTaskItem(question, answer, kind, digits, canvas, canvasSize, sources) { Cells = cells };
    }

    private static (string Question, string Answer) Ask(Random rng, DigitQuestionType kind, int[] digits)
    {
        // Count and presence ask about a digit that is there half the time (only they draw one, so the stream stays as it was).
        int d = kind is DigitQuestionType.Count or DigitQuestionType.Present ? (rng.Next(2) == 0 ? digits[rng.Next(digits.Length)] : rng.Next(10)) : 0;
        var question = kind switch
        {
            DigitQuestionType.Sum => "What is the sum of the digits in the image?",
            DigitQuestionType.Largest => "What is the largest digit in the image?",
            DigitQuestionType.Count => $"How many times does the digit {d} appear in the image?",
            DigitQuestionType.Present => $"Is the digit {d} in the image? Answer yes or no.",
            _ => "Read the digits in the image from left to right.",
        };
        return (question, AnswerFor(kind, question, digits));
    }

    /// <summary>The answer to a question of this task about these digits (left to right).</summary>
    public static string AnswerFor(DigitQuestionType kind, string question, IReadOnlyList<int> digits)
    {
        int asked = question.FirstOrDefault(char.IsAsciiDigit) - '0';
        return kind switch
        {
            DigitQuestionType.Sum => digits.Sum().ToString(),
            DigitQuestionType.Largest => digits.Max().ToString(),
            DigitQuestionType.Count => digits.Count(x => x == asked).ToString(),
            DigitQuestionType.Present => digits.Contains(asked) ? "yes" : "no",
            _ => string.Join(LeftToRightSeparator, digits),
        };
    }

    /// <summary>The digits a response or trace says it sees (<see cref="ClaimPattern"/>), left to right; null when it claims none.</summary>
    public static int[]? ClaimedDigits(string response)
    {
        var claim = System.Text.RegularExpressions.Regex.Match(response, ClaimPattern);
        return claim.Success ? claim.Groups[1].Value.Split(", ").Select(int.Parse).ToArray() : null;
    }

    /// <summary>
    /// How a response read a digit scene: whether the digits it claims to see ("I see the digits 5, 7") are the scene's,
    /// in order, and whether its answer is the one those claimed digits imply (right or wrong: an answer that does not
    /// follow from the response's own reading came from elsewhere). Null for rows that are not digit questions with their
    /// digits known (no "digits" or no digit question type); a response that claims nothing neither reads nor follows.
    /// </summary>
    public static (bool ReadsExactly, bool FollowsReading)? Reading(string response, Data.PromptRow row)
    {
        if (row.Digits is null || row.Type is null || !DigitQuestionTypes.TryParse(row.Type, out var type)) return null;
        if (ClaimedDigits(response) is not { } claimed) return (false, false);
        bool follows = Rewards.AnswerVerifier.ScoreResponse(response, AnswerFor(type, row.Question, claimed)) > 0;
        return (claimed.SequenceEqual(row.Digits), follows);
    }

    /// <summary>
    /// The reward context of a prompt row: its answer and choices and, for a digit question, the reasoning check (the
    /// answer follows the digits the response claims) and, where the row gives its digits, the grounding check (the
    /// claimed digits are the scene's, in order).
    /// </summary>
    public static Rewards.RewardContext RewardContext(Data.PromptRow row) => new(row.Answer, row.Choices)
    {
        FollowsPremises = row.Type is not null && DigitQuestionTypes.TryParse(row.Type, out _) ? text => Reading(text, row with { Digits = row.Digits ?? [] })?.FollowsReading : null,
        MatchesImage = row.Digits is null || row.Type is null ? null : text => Reading(text, row)?.ReadsExactly,
        ImageAgreement = row.Digits is null || row.Type is null ? null : text => DigitsReadRight(text, row),
    };

    /// <summary>
    /// The share of a scene's digits a response names right, position by position; 0 when it claims no digits or a
    /// different number of them; null when the row is not a digit question or does not give its digits.
    /// </summary>
    public static double? DigitsReadRight(string response, Data.PromptRow row)
    {
        if (row.Digits is not { } digits || row.Type is null || !DigitQuestionTypes.TryParse(row.Type, out _)) return null;
        if (ClaimedDigits(response) is not { } claimed || claimed.Length != digits.Count || digits.Count == 0) return 0;
        return claimed.Zip(digits).Count(p => p.First == p.Second) / (double)digits.Count;
    }

    /// <summary>
    /// A wrong version of an item's trace, for the rejected side of a reward model's pair: half the time one digit is
    /// misread and the reasoning follows the wrong claim (a hallucination; the answer may still come out right), half
    /// the time the digits are read right and the conclusion is wrong.
    /// </summary>
    public static DigitTaskItem Rejected(DigitTaskItem item, Random rng)
    {
        if (rng.Next(2) == 0)
        {
            var misread = item.Digits.ToArray();
            int i = rng.Next(misread.Length);
            misread[i] = (misread[i] + 1 + rng.Next(9)) % 10;
            return item with { Digits = misread, Answer = AnswerFor(item.Type, item.Question, misread) };
        }
        string wrong = item.Type switch
        {
            DigitQuestionType.Sum => (int.Parse(item.Answer) is var sum && 1 + rng.Next(3) is var off && sum >= off && rng.Next(2) == 0 ? sum - off : sum + off).ToString(),
            DigitQuestionType.Largest => ((int.Parse(item.Answer) + 1 + rng.Next(9)) % 10).ToString(),
            DigitQuestionType.Count => (item.Answer == "0" || rng.Next(2) == 0 ? int.Parse(item.Answer) + 1 : int.Parse(item.Answer) - 1).ToString(),
            DigitQuestionType.Present => item.Answer == "yes" ? "no" : "yes",
            _ => string.Join(LeftToRightSeparator, item.Digits.Select((x, k) => k == item.Digits.Length - 1 ? (x + 1 + rng.Next(9)) % 10 : x)),
        };
        return item with { Answer = wrong };
    }

    /// <summary>
    /// Draws the digits left to right on a <see cref="GridCells"/> x <see cref="GridCells"/> grid of cells: each digit in
    /// its own column (random columns, in order), at a random row, scaled to 3/4 to all of a cell and jittered inside
    /// it. With configs/digits.json a cell is what one image token covers (a 2 x 2 group of 8-pixel patches after the
    /// pixel shuffle), so every digit lies whole in one image token.
    /// </summary>
    private (byte[] Canvas, DigitImage[] Sources, int[] Cells) Compose(Random rng, int[] digits)
    {
        int n = digits.Length, w = canvasSize, cell = w / GridCells;
        var sources = new DigitImage[n];
        var canvas = new byte[w * w];
        var cells = Enumerable.Repeat(-1, GridCells * GridCells).ToArray();
        // n distinct columns, in increasing order: a partial Fisher-Yates shuffle of 0..GridCells-1.
        var columns = Enumerable.Range(0, GridCells).ToArray();
        for (int i = 0; i < n; i++) { int k = rng.Next(i, GridCells); (columns[i], columns[k]) = (columns[k], columns[i]); }
        Array.Sort(columns, 0, n);
        for (int i = 0; i < n; i++)
        {
            var pool = source.Of(split, digits[i]);
            var image = sources[i] = pool[rng.Next(pool.Count)];
            int size = rng.Next((3 * cell + 3) / 4, cell + 1);
            int row = rng.Next(GridCells);
            int x = columns[i] * cell + rng.Next(cell - size + 1), y = row * cell + rng.Next(cell - size + 1);
            Draw(canvas, w, image.Pixels, x, y, size);
            cells[row * GridCells + columns[i]] = digits[i];
        }
        return (canvas, sources, cells);
    }

    /// <summary>Bilinear resize of a 28 x 28 digit to size x size, drawn with max blending at (x0, y0).</summary>
    private static void Draw(byte[] canvas, int w, byte[] digit, int x0, int y0, int size)
    {
        const int s = DigitImage.Size;
        double scale = (double)s / size;
        for (int y = 0; y < size; y++)
        for (int x = 0; x < size; x++)
        {
            double sx = Math.Clamp((x + 0.5) * scale - 0.5, 0, s - 1), sy = Math.Clamp((y + 0.5) * scale - 0.5, 0, s - 1);
            int ix = Math.Min((int)sx, s - 2), iy = Math.Min((int)sy, s - 2);
            double fx = sx - ix, fy = sy - iy;
            double v = (1 - fy) * ((1 - fx) * digit[iy * s + ix] + fx * digit[iy * s + ix + 1])
                + fy * ((1 - fx) * digit[(iy + 1) * s + ix] + fx * digit[(iy + 1) * s + ix + 1]);
            int at = (y0 + y) * w + x0 + x;
            canvas[at] = Math.Max(canvas[at], (byte)Math.Round(v));
        }
    }

    /// <summary>
    /// Writes <paramref name="count"/> items as DIR/images/NNNNNN.png, DIR/prompts.jsonl (question, answer, images,
    /// image_digits: the distinct digits present, type; the prompt format of <see cref="Data.PromptDataset"/>) and
    /// DIR/sft.jsonl (prompt, images, response: the reasoning trace; the format of <see cref="Data.SftDataset"/>) and
    /// DIR/text-sft.jsonl (the same traces after <see cref="DigitTaskItem.TextPrompt"/>, no image). About
    /// <paramref name="workedShare"/> of the traces are worked (<see cref="DigitTaskItem.Worked"/>).
    /// </summary>
    public IReadOnlyList<DigitTaskItem> WriteDataset(string directory, int count, int seed, double workedShare = 0)
    {
        var images = Path.Combine(directory, "images");
        Directory.CreateDirectory(images);
        var rng = new Random(seed);
        // The trace style has its own stream, so the scenes of a seed do not depend on the share of worked traces.
        var styles = new Random(Engine.Seeds.ForRandom(seed, Engine.Seeds.Hash("trace_style")));
        var items = new List<DigitTaskItem>(count);
        var lines = new List<string>(count);
        for (int i = 0; i < count; i++)
        {
            var item = Sample(rng);
            if (workedShare > 0 && styles.NextDouble() < workedShare) item = item with { Worked = true };
            var name = $"{i:D6}.png";
            item.SavePng(Path.Combine(images, name));
            items.Add(item);
            lines.Add(JsonSerializer.Serialize(new
            {
                question = item.Question, answer = item.Answer, images = new[] { $"images/{name}" },
                image_digits = item.Digits.Distinct().Order().ToArray(), type = item.Type.Name(), digits = item.Digits, cells = item.Cells,
            }));
        }
        var path = Path.Combine(directory, "prompts.jsonl");
        File.WriteAllLines(path + ".tmp", lines);
        File.Move(path + ".tmp", path, overwrite: true);
        var sft = Path.Combine(directory, "sft.jsonl");
        File.WriteAllLines(sft + ".tmp", items.Select((item, i) => JsonSerializer.Serialize(new { prompt = item.Question, images = new[] { $"images/{i:D6}.png" }, response = item.Trace() })));
        File.Move(sft + ".tmp", sft, overwrite: true);
        var text = Path.Combine(directory, "text-sft.jsonl");
        File.WriteAllLines(text + ".tmp", items.Select(item => JsonSerializer.Serialize(new { prompt = item.TextPrompt, images = Array.Empty<string>(), response = item.Trace() })));
        File.Move(text + ".tmp", text, overwrite: true);
        return items;
    }
}
