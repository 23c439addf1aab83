using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;

namespace R1V2.Native.Trainer;

/// <summary>
/// How an evaluation samples: k responses per prompt at the given sampling settings and seed. Prompts decode together
/// until about <paramref name="BatchSequences"/> sequences run at once; each prompt's seed is its own, so the responses
/// do not depend on the batch.
/// </summary>
public sealed record EvalSettings(int Samples = 1, int MaxNewTokens = 256, float Temperature = 0.6f, float TopP = 0.95f, ulong Seed = 1,
    string? ClaimPattern = null, int CacheBlocks = 4096, int BatchSequences = 256);

/// <summary>Accuracy on the prompts of one question type.</summary>
public sealed record EvalTypeResult(string Type, int Prompts, double PassAt1);

/// <summary>
/// pass@1 averaged over k samples (the mean over prompts of each prompt's share of correct samples, with the standard
/// error of that mean), the share of well-formed responses (closed reasoning, then an answer), the hallucination rate
/// (share of samples, among prompts whose images are described, that claim what is not there) and accuracy per type.
/// </summary>
public sealed record EvalResult(string Model, string Data, int Prompts, int SamplesPerPrompt, double PassAt1, double PassAt1StdError, double FormatRate,
    double? HallucinationRate, int GroundingChecks, double MeanResponseTokens, IReadOnlyList<EvalTypeResult> ByType, EvalSettings Settings, double Seconds)
{
    /// <summary>
    /// Digit questions with their scene's digits known (<see cref="Tasks.DigitScenes.Reading"/>): the share of samples that
    /// claim exactly the scene's digits, and the share whose answer follows from the digits they claim (right or wrong).
    /// Null when no prompt is such a question.
    /// </summary>
    public double? ReadsExactlyRate { get; init; }
    public double? FollowsReadingRate { get; init; }
    public int ReadingChecks { get; init; }

    /// <summary>
    /// With k samples per prompt: the share of prompts that at least one sample answers right (pass@k), and the share
    /// whose most frequent answer is right (majority of k, <see cref="Evaluation.MajorityIsRight"/>). Sharpening the sampling
    /// alone moves pass@1 toward the majority; beyond it, the model has to prefer answers it now gives less often.
    /// </summary>
    /// Null in evaluations written before they were measured.
    public double? PassAtK { get; init; }
    public double? MajorityAtK { get; init; }
}

/// <summary>The mean per-prompt difference in pass@1 between two evaluations of the same prompts, with its standard error.</summary>
public sealed record PairedDifference(double Difference, double StdError, int Prompts);

/// <summary>One scored response (samples.jsonl beside the summary).</summary>
public sealed record EvalSample(int Prompt, int Sample, string? Type, string Answer, string Response, bool Correct, bool WellFormed, bool? Grounded,
    bool? ReadsExactly = null, bool? FollowsReading = null);

/// <summary>`engine eval`: samples responses with the paged generator and scores them with the rule verifier.</summary>
public static class Evaluation
{
    private const string ClaimPatternName = "the claim pattern (--claim-pattern)";

    public static (EvalResult Result, List<EvalSample> Samples) Run(VisionLanguageModel model, TextTokenizer tokenizer, IReadOnlyList<PromptRow> prompts,
        EvalSettings s, string modelName = "", string dataName = "")
    {
        if (s.Samples < 1) throw new ArgumentException("samples must be at least 1");
        if (s.BatchSequences < 1) throw new ArgumentException($"the eval batch must be at least 1 sequence, got {s.BatchSequences}");
        if (s.CacheBlocks < 1) throw new ArgumentException($"the KV cache needs at least 1 block, got {s.CacheBlocks}");
        if (prompts.Count == 0) throw new ArgumentException("no prompts to evaluate");
        if (s.ClaimPattern is not null) Grounding.ClaimRegex(s.ClaimPattern, ClaimPatternName); // a bad pattern fails before any sampling
        var clock = Stopwatch.StartNew();
        var groups = PromptSampling.Sample(model, tokenizer, prompts, s.Samples, new SamplingParams(s.Temperature, TopP: s.TopP), s.MaxNewTokens, s.Seed,
            (_, _) => new RewardBreakdown(0, 0, 0, 0, 0), s.CacheBlocks, s.BatchSequences);
        return Score(groups.Select(g => (g.Prompt, g.Responses)).ToList(), s, text => tokenizer.Encode(text).Length, modelName, dataName, clock);
    }

    /// <summary>Scores given responses: the rule verifier, the format reward and the grounding check per sample, then the aggregates.</summary>
    public static (EvalResult Result, List<EvalSample> Samples) Score(IReadOnlyList<(PromptRow Prompt, IReadOnlyList<string> Responses)> groups, EvalSettings s,
        Func<string, int> length, string modelName = "", string dataName = "", Stopwatch? clock = null)
    {
        var format = new FormatReward();
        var grounding = new Grounding(groups.SelectMany(g => g.Prompt.ImageObjects ?? []), s.ClaimPattern, ClaimPatternName);
        var samples = new List<EvalSample>();
        var perPrompt = new List<(string? Type, double Pass)>();
        int anyRight = 0, majorityRight = 0;
        long tokens = 0;
        int checks = 0, ungrounded = 0;
        foreach (var (prompt, responses) in groups)
        {
            int correct = 0;
            for (int k = 0; k < responses.Count; k++)
            {
                var text = responses[k];
                bool ok = AnswerVerifier.ScoreResponse(text, prompt.Answer, prompt.Choices) > 0, formed = format.Score(text) == format.WellFormed;
                bool? grounded = grounding.Check(text, prompt);
                if (grounded is { } gr) { checks++; if (!gr) ungrounded++; }
                var reading = Tasks.DigitScenes.Reading(text, prompt);
                correct += ok ? 1 : 0;
                tokens += length(text);
                samples.Add(new EvalSample(prompt.Index, k, prompt.Type, prompt.Answer, text, ok, formed, grounded, reading?.ReadsExactly, reading?.FollowsReading));
            }
            perPrompt.Add((prompt.Type, correct / (double)responses.Count));
            if (correct > 0) anyRight++;
            if (MajorityIsRight(responses, prompt)) majorityRight++;
        }
        double mean = perPrompt.Average(p => p.Pass);
        double se = perPrompt.Count > 1 ? Math.Sqrt(perPrompt.Sum(p => (p.Pass - mean) * (p.Pass - mean)) / (perPrompt.Count - 1) / perPrompt.Count) : 0;
        var byType = perPrompt.Where(p => p.Type is not null).GroupBy(p => p.Type!).OrderBy(t => t.Key, StringComparer.Ordinal)
            .Select(t => new EvalTypeResult(t.Key, t.Count(), t.Average(p => p.Pass))).ToList();
        var read = samples.Where(x => x.ReadsExactly is not null).ToList();
        var result = new EvalResult(modelName, dataName, groups.Count, s.Samples, mean, se, samples.Average(x => x.WellFormed ? 1.0 : 0.0),
            checks == 0 ? null : ungrounded / (double)checks, checks, tokens / (double)samples.Count, byType, s, clock?.Elapsed.TotalSeconds ?? 0)
        {
            ReadingChecks = read.Count, ReadsExactlyRate = read.Count == 0 ? null : read.Average(x => x.ReadsExactly == true ? 1.0 : 0.0),
            FollowsReadingRate = read.Count == 0 ? null : read.Average(x => x.FollowsReading == true ? 1.0 : 0.0),
            PassAtK = anyRight / (double)groups.Count, MajorityAtK = majorityRight / (double)groups.Count,
        };
        return (result, samples);
    }

    /// <summary>
    /// Whether the most frequent of the responses' answers is right: answers grouped by the verifier's equivalence,
    /// responses without an answer forming one group that is never right, a tie going to the group given first.
    /// </summary>
    public static bool MajorityIsRight(IReadOnlyList<string> responses, PromptRow prompt)
    {
        var votes = new List<(string? Answer, int Count)>();
        foreach (var text in responses)
        {
            var answer = AnswerVerifier.FinalAnswer(text);
            int at = votes.FindIndex(v => answer is null ? v.Answer is null : v.Answer is not null && AnswerVerifier.Equivalent(answer, v.Answer, prompt.Choices));
            if (at < 0) votes.Add((answer, 1));
            else votes[at] = (votes[at].Answer, votes[at].Count + 1);
        }
        if (votes.Count == 0) return false;
        var top = votes.MaxBy(v => v.Count); // the first of equal counts
        return top.Answer is not null && AnswerVerifier.Equivalent(top.Answer, prompt.Answer, prompt.Choices);
    }

    /// <summary>
    /// The paired difference of pass@1 between two evaluations of the same prompts: the mean over prompts of (other's
    /// per-prompt pass rate - baseline's) and its standard error. Pairing removes the prompts' shared difficulty from the
    /// error, so this is the measure of whether one stage beats another.
    /// </summary>
    public static PairedDifference PairedDifference(IReadOnlyList<EvalSample> baseline, IReadOnlyList<EvalSample> other)
    {
        static Dictionary<int, double> PerPrompt(IEnumerable<EvalSample> samples) =>
            samples.GroupBy(x => x.Prompt).ToDictionary(g => g.Key, g => g.Average(x => x.Correct ? 1.0 : 0.0));
        var a = PerPrompt(baseline);
        var b = PerPrompt(other);
        if (a.Count == 0 || a.Count != b.Count || a.Keys.Any(k => !b.ContainsKey(k)))
            throw new ArgumentException($"a paired difference needs the same prompts in both evaluations ({a.Count} and {b.Count} prompts)");
        var d = a.Keys.Order().Select(k => b[k] - a[k]).ToList();
        double mean = d.Average();
        double se = d.Count > 1 ? Math.Sqrt(d.Sum(x => (x - mean) * (x - mean)) / (d.Count - 1) / d.Count) : 0;
        return new PairedDifference(mean, se, d.Count);
    }

    public static List<EvalSample> ReadSamples(string path) =>
        File.ReadLines(path).Select((l, i) => JsonSerializer.Deserialize<EvalSample>(l) ?? throw new InvalidDataException($"{path}:{i + 1}: not an evaluation sample")).ToList();

    /// <summary>Writes eval.json, eval.md and samples.jsonl into <paramref name="directory"/>; returns the paths.</summary>
    public static IReadOnlyList<string> Write(string directory, EvalResult r, IEnumerable<EvalSample> samples)
    {
        Directory.CreateDirectory(directory);
        var json = Path.Combine(directory, "eval.json");
        File.WriteAllText(json, JsonSerializer.Serialize(r, new JsonSerializerOptions { WriteIndented = true }));
        var lines = Path.Combine(directory, "samples.jsonl");
        File.WriteAllLines(lines, samples.Select(x => JsonSerializer.Serialize(x)));
        var md = Path.Combine(directory, "eval.md");
        File.WriteAllText(md, Markdown(r));
        return [json, md, lines];
    }

    public static string Markdown(EvalResult r)
    {
        var inv = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        sb.AppendLine($"# Evaluation of {r.Model}").AppendLine();
        sb.AppendLine(string.Format(inv, "{0} prompts from {1}, {2} sample(s) each (temperature {3}, top-p {4}, seed {5}, at most {6} new tokens).",
            r.Prompts, r.Data, r.SamplesPerPrompt, r.Settings.Temperature, r.Settings.TopP, r.Settings.Seed, r.Settings.MaxNewTokens)).AppendLine();
        sb.AppendLine("| metric | value |").AppendLine("| --- | --- |");
        sb.AppendLine(string.Format(inv, "| pass@1 (mean over {0} samples) | {1:F3} ± {2:F3} |", r.SamplesPerPrompt, r.PassAt1, r.PassAt1StdError));
        if (r.SamplesPerPrompt > 1 && r.PassAtK is not null)
        {
            sb.AppendLine(string.Format(inv, "| pass@{0} (any sample right) | {1:F3} |", r.SamplesPerPrompt, r.PassAtK));
            sb.AppendLine(string.Format(inv, "| majority of {0} samples right | {1:F3} |", r.SamplesPerPrompt, r.MajorityAtK));
        }
        sb.AppendLine(string.Format(inv, "| format rate | {0:F3} |", r.FormatRate));
        sb.AppendLine(r.HallucinationRate is { } h ? string.Format(inv, "| hallucination rate ({0} checked samples) | {1:F3} |", r.GroundingChecks, h) : "| hallucination rate | - (no image contents known) |");
        if (r.ReadsExactlyRate is { } re && r.FollowsReadingRate is { } fr)
        {
            sb.AppendLine(string.Format(inv, "| reads the scene's digits exactly ({0} digit-question samples) | {1:F3} |", r.ReadingChecks, re));
            sb.AppendLine(string.Format(inv, "| answer follows from the digits it claims (right or wrong) | {0:F3} |", fr));
        }
        sb.AppendLine(string.Format(inv, "| mean response length (tokens) | {0:F1} |", r.MeanResponseTokens));
        if (r.ByType.Count > 0)
        {
            sb.AppendLine().AppendLine("| question type | prompts | pass@1 |").AppendLine("| --- | --- | --- |");
            foreach (var t in r.ByType) sb.AppendLine(string.Format(inv, "| {0} | {1} | {2:F3} |", t.Type, t.Prompts, t.PassAt1));
        }
        sb.AppendLine().AppendLine("± is the standard error of the mean over prompts.");
        return sb.ToString();
    }
}
