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
        var sequences = new List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)>();
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
            float[]? pixels = counts.Sum() > 0 ? [.. rowPixels] : null;
            foreach (var response in responses) sequences.Add((prompt, [.. tokenizer.Encode(response), _imEnd], pixels, counts.Sum()));
        }
        var (batch, starts) = VlmBatch.Pack(sequences, model.ImageContextId);
        // Positions whose targets are the response (and its end token).
        return (batch, starts.Select((start, i) => (start, start + sequences[i].Response.Length)).ToList());
    }

    /// <summary>The sum of per-token log-probs over a span.</summary>
    public static double Sum(float[] logp, (int Start, int End) span)
    {
        double s = 0;
        for (int t = span.Start; t < span.End; t++) s += logp[t];
        return s;
    }
}
