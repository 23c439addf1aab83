using System.Text;
using System.Text.RegularExpressions;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Engine.Text;

/// <summary>
/// Learns byte-level BPE merges from a corpus, for a tokenizer sized to a task: the text is split at the special
/// tokens and by the Qwen2 pre-tokenizer pattern, each piece becomes its bytes (as GPT-2 byte symbols), and the most
/// frequent adjacent pair (ties broken by ordinal order, so the result depends only on the corpus) is merged,
/// repeatedly, until the merge budget is spent or no pair occurs twice.
/// </summary>
public static class BpeTrainer
{
    public static List<(string Left, string Right)> Train(IEnumerable<string> corpus, int maxMerges)
    {
        if (maxMerges < 0) throw new ArgumentOutOfRangeException(nameof(maxMerges));
        var symbols = TokenizerWriter.ByteSymbols();
        var split = new Regex(TextTokenizer.Qwen2Pattern, RegexOptions.CultureInvariant);
        var specials = new Regex(string.Join("|", TokenizerWriter.SpecialTokens.Select(Regex.Escape)), RegexOptions.CultureInvariant);
        var counts = new Dictionary<string, long>(StringComparer.Ordinal);
        foreach (var text in corpus)
            foreach (var part in specials.Split(text.Normalize(NormalizationForm.FormC)))
                foreach (Match m in split.Matches(part))
                {
                    var word = string.Concat(Encoding.UTF8.GetBytes(m.Value).Select(b => symbols[b]));
                    counts[word] = counts.GetValueOrDefault(word) + 1;
                }
        var words = counts.Select(kv => (Symbols: kv.Key.Select(c => c.ToString()).ToList(), Count: kv.Value)).ToList();
        var merges = new List<(string, string)>();
        while (merges.Count < maxMerges)
        {
            var pairs = new Dictionary<(string, string), long>();
            foreach (var (s, c) in words)
                for (int i = 0; i + 1 < s.Count; i++) pairs[(s[i], s[i + 1])] = pairs.GetValueOrDefault((s[i], s[i + 1])) + c;
            if (pairs.Count == 0) break;
            var best = pairs.OrderByDescending(p => p.Value).ThenBy(p => p.Key.Item1, StringComparer.Ordinal).ThenBy(p => p.Key.Item2, StringComparer.Ordinal).First();
            if (best.Value < 2) break;
            var (a, b) = best.Key;
            merges.Add((a, b));
            foreach (var (s, _) in words)
                for (int i = 0; i + 1 < s.Count; i++)
                    if (s[i] == a && s[i + 1] == b) { s[i] = a + b; s.RemoveAt(i + 1); }
        }
        return merges;
    }
}
