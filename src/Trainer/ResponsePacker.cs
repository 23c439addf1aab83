using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Trainer;

/// <summary>
/// Packs prompts (a user turn with images) and responses into one variable-length batch for teacher forcing: each
/// response becomes its own sequence, prompt + response + &lt;|im_end|&gt;, with targets on the response (and the end
/// token) only. The spans give, per sequence, the positions whose targets are the response.
/// </summary>
public sealed class ResponsePacker(VisionLanguageModel model, TextTokenizer tokenizer)
{
    private readonly ChatTemplate _template = new(model.Config.TokensPerTile);
    private readonly ImagePreprocessor _images = new(model.Config.ForceImageSize);
    private readonly int _imEnd = tokenizer.RequireToken("<|im_end|>");

    public (VlmBatch Batch, List<(int Start, int End)> Spans) Pack(IEnumerable<(string Prompt, IReadOnlyList<string> Images, IReadOnlyList<string> Responses)> rows)
    {
        var ids = new List<int>();
        var targets = new List<int>();
        var cu = new List<int> { 0 };
        var pixels = new List<float>();
        var imageRows = new List<int>();
        var spans = new List<(int, int)>();
        int tiles = 0;
        foreach (var (promptText, images, responses) in rows)
        {
            var counts = new List<int>();
            var rowPixels = new List<float>();
            foreach (var img in images)
            {
                var (px, n) = _images.Load(img);
                rowPixels.AddRange(px);
                counts.Add(n);
            }
            var prompt = tokenizer.Encode(_template.Render([new ChatMessage("user", promptText, counts)]));
            foreach (var response in responses)
            {
                int offset = ids.Count;
                for (int k = 0; k < prompt.Length; k++) if (prompt[k] == model.ImageContextId) imageRows.Add(offset + k);
                int[] seq = [.. prompt, .. tokenizer.Encode(response), _imEnd];
                ids.AddRange(seq);
                for (int t = 0; t < seq.Length; t++) targets.Add(t + 1 < seq.Length && t + 1 >= prompt.Length ? seq[t + 1] : Backend.IgnoreIndex);
                spans.Add((offset + prompt.Length - 1, offset + seq.Length - 1)); // positions whose targets are the response
                cu.Add(ids.Count);
                pixels.AddRange(rowPixels);
                tiles += counts.Sum();
            }
        }
        return (new VlmBatch([.. ids], [.. targets], [.. cu], tiles > 0 ? [.. pixels] : null, tiles, [.. imageRows]), spans);
    }

    /// <summary>The sum of per-token log-probs over a span.</summary>
    public static double Sum(float[] logp, (int Start, int End) span)
    {
        double s = 0;
        for (int t = span.Start; t < span.End; t++) s += logp[t];
        return s;
    }
}
