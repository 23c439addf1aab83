using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Trainer.Rewards;

/// <summary>
/// Rule-based answer checking: the final answer is the last <c>\boxed{...}</c> (balanced braces), else the last
/// <c>Answer:</c> line; it is compared with the reference as a number (integers, decimals with thousands separators,
/// fractions, percentages, <c>\frac</c>/<c>\dfrac</c>/<c>\tfrac</c>, <c>\sqrt</c> of numbers, a leading minus), as a
/// multiple-choice letter when choices are given, or as normalised text.
/// </summary>
public static partial class AnswerVerifier
{
    /// <summary>
    /// The answer part of a generated response, the one definition that the training reward, evaluation, pair building
    /// and the prompt pre-filter share: the text after the first <c>&lt;/think&gt;</c> (up to <c>&lt;|im_end|&gt;</c>).
    /// The generation prompt opens the thinking block, so a response that never closes it has no answer part ("") and a
    /// <c>\boxed{}</c> inside the thinking counts nowhere.
    /// </summary>
    public static string AnswerPart(string response)
    {
        var split = ChatTemplate.Split(response);
        return split.ThinkingClosed ? split.Answer : "";
    }

    /// <summary>The final answer a response gives in its answer part (<see cref="AnswerPart"/>), or null.</summary>
    public static string? FinalAnswer(string response) => ExtractAnswer(AnswerPart(response));

    /// <summary>1 when a generated response's final answer (<see cref="FinalAnswer"/>) matches the reference, else 0.</summary>
    public static double ScoreResponse(string response, string reference, IReadOnlyList<string>? choices = null) =>
        FinalAnswer(response) is { } answer && Equivalent(answer, reference, choices) ? 1.0 : 0.0;

    /// <summary>The response's final answer, or null when it states none.</summary>
    public static string? ExtractAnswer(string response)
    {
        int at = response.LastIndexOf("\\boxed", StringComparison.Ordinal);
        while (at >= 0)
        {
            int open = response.IndexOf('{', at);
            if (open >= 0 && response[(at + 6)..open].Trim().Length == 0)
            {
                int depth = 0;
                for (int i = open; i < response.Length; i++)
                {
                    if (response[i] == '{') depth++;
                    else if (response[i] == '}' && --depth == 0) return response[(open + 1)..i].Trim();
                }
            }
            at = at > 0 ? response.LastIndexOf("\\boxed", at - 1, StringComparison.Ordinal) : -1;
        }
        var lines = response.Split('\n');
        for (int i = lines.Length - 1; i >= 0; i--)
        {
            var m = AnswerLine().Match(lines[i]);
            if (m.Success) return m.Groups[1].Value.Trim().TrimEnd('.').Trim();
        }
        return null;
    }

    [GeneratedRegex(@"^\s*\**\s*(?:final\s+)?answer\s*\**\s*[:：]\s*\**\s*(.+)$", RegexOptions.IgnoreCase)]
    private static partial Regex AnswerLine();

    /// <summary>1 when <paramref name="response"/>'s final answer matches <paramref name="reference"/>, else 0.</summary>
    public static double Score(string response, string reference, IReadOnlyList<string>? choices = null)
    {
        var answer = ExtractAnswer(response);
        return answer is not null && Equivalent(answer, reference, choices) ? 1.0 : 0.0;
    }

    public static bool Equivalent(string answer, string reference, IReadOnlyList<string>? choices = null)
    {
        if (choices is { Count: > 0 })
        {
            var a = ChoiceLetter(answer, choices);
            var r = ChoiceLetter(reference, choices);
            if (a is not null && r is not null) return a == r;
        }
        var x = ParseNumber(answer);
        var y = ParseNumber(reference);
        if (x is not null && y is not null)
            return Close(x.Value.Value, y.Value.Value) || (x.Value.Percent && Close(x.Value.Value / 100, y.Value.Value)) || (y.Value.Percent && Close(x.Value.Value, y.Value.Value / 100));
        return NormaliseText(answer) == NormaliseText(reference);
    }

    private static bool Close(double a, double b) => Math.Abs(a - b) <= 1e-6 * Math.Max(1, Math.Abs(b));

    /// <summary>The letter of a multiple-choice answer: "B", "(B)", "B.", "option B", or the text of a choice.</summary>
    public static string? ChoiceLetter(string text, IReadOnlyList<string> choices)
    {
        var t = StripLatex(text).Trim();
        var m = Letter().Match(t);
        if (m.Success)
        {
            int index = char.ToUpperInvariant(m.Groups[1].Value[0]) - 'A';
            if (index >= 0 && index < choices.Count) return ((char)('A' + index)).ToString();
        }
        for (int i = 0; i < choices.Count; i++)
            if (NormaliseText(t) == NormaliseText(choices[i])) return ((char)('A' + i)).ToString();
        return null;
    }

    [GeneratedRegex(@"^(?:option|choice)?\s*\(?([A-Za-z])\)?[.:]?$", RegexOptions.IgnoreCase)]
    private static partial Regex Letter();

    /// <summary>A number (and whether it was written as a percentage), or null when the text is not one.</summary>
    public static (double Value, bool Percent)? ParseNumber(string text)
    {
        var t = StripLatex(text).Replace(" ", "").Replace("\u2212", "-");
        bool percent = t.EndsWith('%');
        if (percent) t = t[..^1];
        var v = Evaluate(t);
        return v is null ? null : (v.Value, percent);
    }

    private static double? Evaluate(string t)
    {
        if (t.Length == 0) return null;
        if (t[0] == '-') return -Evaluate(t[1..]);
        if (t[0] == '+') return Evaluate(t[1..]);
        var frac = FracPattern().Match(t);
        if (frac.Success && frac.Length == t.Length)
        {
            var a = Evaluate(frac.Groups[1].Value);
            var b = Evaluate(frac.Groups[2].Value);
            return a is null || b is null || b == 0 ? null : a / b;
        }
        var sqrt = SqrtPattern().Match(t);
        if (sqrt.Success && sqrt.Length == t.Length)
        {
            var coefficient = sqrt.Groups[1].Value.Length == 0 ? 1 : Evaluate(sqrt.Groups[1].Value);
            var radicand = Evaluate(sqrt.Groups[2].Success && sqrt.Groups[2].Length > 0 ? sqrt.Groups[2].Value : sqrt.Groups[3].Value);
            return coefficient is null || radicand is null || radicand < 0 ? null : coefficient * Math.Sqrt(radicand.Value);
        }
        int slash = t.IndexOf('/');
        if (slash > 0)
        {
            var a = Evaluate(t[..slash]);
            var b = Evaluate(t[(slash + 1)..]);
            return a is null || b is null || b == 0 ? null : a / b;
        }
        if (ThousandsPattern().IsMatch(t)) t = t.Replace(",", "");
        return double.TryParse(t, NumberStyles.AllowDecimalPoint | NumberStyles.AllowExponent, CultureInfo.InvariantCulture, out var d) ? d : null;
    }

    [GeneratedRegex(@"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")]
    private static partial Regex FracPattern();

    [GeneratedRegex(@"^([0-9.]*)\\sqrt(?:\{([^{}]+)\}|([0-9.]+))")]
    private static partial Regex SqrtPattern();

    [GeneratedRegex(@"^\d{1,3}(,\d{3})+(\.\d+)?$")]
    private static partial Regex ThousandsPattern();

    /// <summary>Drops $ delimiters, \text{...}, \left/\right, \! and \, spacing, and a trailing period.</summary>
    private static string StripLatex(string s)
    {
        var t = s.Trim().Trim('$').Trim();
        t = TextCommand().Replace(t, "$1");
        t = t.Replace("\\left", "").Replace("\\right", "").Replace("\\!", "").Replace("\\,", "").Replace("\\%", "%").Replace("^\\circ", "");
        return t.TrimEnd('.').Trim();
    }

    [GeneratedRegex(@"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")]
    private static partial Regex TextCommand();

    public static string NormaliseText(string s)
    {
        var t = StripLatex(s).ToLowerInvariant();
        var sb = new StringBuilder();
        bool space = false;
        foreach (var ch in t)
        {
            if (char.IsWhiteSpace(ch)) { space = sb.Length > 0; continue; }
            if (space) { sb.Append(' '); space = false; }
            sb.Append(ch);
        }
        return sb.ToString();
    }
}
