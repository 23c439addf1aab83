using System.Text.RegularExpressions;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Data;

namespace R1V2.Native.Trainer;

/// <summary>
/// The visual-grounding check where the dataset knows what the image holds. A response is grounded when every digit
/// it claims is one of the row's <c>image_digits</c> and every object word its answer names (from the object
/// vocabulary: the configured <c>monitor.object_words</c> plus every <c>image_objects</c> entry in the dataset;
/// plurals in -s/-es count) is one of the row's <c>image_objects</c>. Digit claims are the digits of the answer (after
/// <c>&lt;/think&gt;</c>), or with a claim pattern the digits in its first group wherever it matches in the whole
/// response (e.g. "I see the digits 3, 7" in the reasoning; an answer such as a sum is then not a claim). Claims are
/// found by matching, so a negated mention ("no cat") counts as one: the rate is an upper bound, meant for trends.
/// </summary>
public sealed class Grounding
{
    private readonly List<(string Word, Regex Pattern)> _objects;
    private readonly Regex? _claims;

    /// <param name="patternName">What the errors call the claim pattern (the setting or flag it came from).</param>
    public Grounding(IEnumerable<string> objectVocabulary, string? claimPattern = null, string patternName = "monitor.claim_pattern")
    {
        _objects = objectVocabulary.Select(w => w.Trim().ToLowerInvariant()).Where(w => w.Length > 0).Distinct(StringComparer.Ordinal)
            .Select(w => (w, new Regex($@"(?<![\p{{L}}\p{{N}}]){Regex.Escape(w).Replace(@"\ ", @"\s+")}(?:s|es)?(?![\p{{L}}\p{{N}}])",
                RegexOptions.IgnoreCase | RegexOptions.CultureInvariant)))
            .ToList();
        if (claimPattern is not null) _claims = ClaimRegex(claimPattern, patternName);
    }

    /// <summary>The claim pattern compiled, or an error naming it when it is not a regex with a group for the digits.</summary>
    public static Regex ClaimRegex(string claimPattern, string patternName)
    {
        Regex claims;
        try { claims = new Regex(claimPattern, RegexOptions.CultureInvariant); }
        catch (ArgumentException e) { throw new ArgumentException($"{patternName} is not a valid regex: {e.Message}", e); }
        if (claims.GetGroupNumbers().Length < 2) throw new ArgumentException($"{patternName} needs a group holding the claimed digits");
        return claims;
    }

    public int VocabularySize => _objects.Count;

    /// <summary>True when every digit the text names is one the image holds (a text naming none is grounded).</summary>
    public static bool ClaimsOnlyPresentDigits(string text, IReadOnlyList<int> present) =>
        text.Where(char.IsAsciiDigit).Select(ch => ch - '0').All(present.Contains);

    /// <summary>The vocabulary's object words the text names.</summary>
    public IEnumerable<string> ClaimedObjects(string text) => _objects.Where(o => o.Pattern.IsMatch(text)).Select(o => o.Word);

    /// <summary>The answer part of a response (<see cref="Rewards.AnswerVerifier.AnswerPart"/>): after &lt;/think&gt;, nothing while thinking is unfinished.</summary>
    public static string AnswerPart(string response) => Rewards.AnswerVerifier.AnswerPart(response);

    /// <summary>The digits a response claims to see.</summary>
    public string DigitClaims(string response) => _claims is null
        ? AnswerPart(response)
        : string.Concat(_claims.Matches(response).Select(m => m.Groups[1].Value));

    /// <summary>Whether the response claims only what the row says the image holds; null when the row says nothing.</summary>
    public bool? Check(string response, PromptRow row)
    {
        if (row.ImageDigits is null && row.ImageObjects is null) return null;
        if (row.ImageDigits is { } digits && !ClaimsOnlyPresentDigits(DigitClaims(response), digits)) return false;
        if (row.ImageObjects is { } objects)
        {
            var present = objects.Select(o => o.Trim().ToLowerInvariant()).ToHashSet(StringComparer.Ordinal);
            if (ClaimedObjects(AnswerPart(response)).Any(o => !present.Contains(o))) return false;
        }
        return true;
    }
}
