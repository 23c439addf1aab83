using System.Text;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Engine.Generation;

/// <summary>One turn of a conversation with the image files attached to it.</summary>
public sealed record ChatTurn(string Role, string Content, IReadOnlyList<string> Images);

/// <summary>
/// Conversations with a checkpoint: renders the chat template with each turn's images tiled and expanded, generates
/// with the paged generator until &lt;|im_end|&gt; (or &lt;|endoftext|&gt;), and streams text as whole characters
/// (a token may end inside a UTF-8 character; text is released only once it decodes cleanly).
/// </summary>
public sealed class ChatRunner
{
    private readonly VisionLanguageModel _model;
    private readonly TextTokenizer _tokenizer;
    private readonly ChatTemplate _template;
    private readonly ImagePreprocessor _images;
    private readonly GeneratorOptions? _options;

    public ChatRunner(VisionLanguageModel model, TextTokenizer tokenizer, GeneratorOptions? options = null, string generationPrompt = ChatTemplate.DefaultGenerationPrompt,
        int maxTiles = 12)
    {
        _model = model;
        _tokenizer = tokenizer;
        _template = new ChatTemplate(model.Config.TokensPerTile, generationPrompt);
        _images = new ImagePreprocessor(model.Config.ForceImageSize, 1, maxTiles);
        _options = options;
        StopTokens = new[] { "<|im_end|>", "<|endoftext|>" }.Select(tokenizer.TokenId).Where(id => id is not null).Select(id => id!.Value).ToArray();
        if (StopTokens.Count == 0) throw new InvalidDataException($"{tokenizer.Source}: neither <|im_end|> nor <|endoftext|> is a token: generation could not stop");
    }

    public IReadOnlyList<int> StopTokens { get; }

    /// <summary>The prompt ids and pixel values for a conversation (the assistant turn opened).</summary>
    public (int[] Ids, float[]? Pixels, int Tiles) Prompt(IReadOnlyList<ChatTurn> turns)
    {
        var messages = new List<ChatMessage>();
        var pixels = new List<float>();
        int tiles = 0;
        foreach (var turn in turns)
        {
            var counts = new List<int>();
            foreach (var path in turn.Images)
            {
                var (p, n) = _images.Load(path);
                pixels.AddRange(p);
                counts.Add(n);
                tiles += n;
            }
            messages.Add(new ChatMessage(turn.Role, turn.Content, counts));
        }
        var ids = _tokenizer.Encode(_template.Render(messages));
        return (ids, tiles > 0 ? [.. pixels] : null, tiles);
    }

    /// <summary>Generates the assistant's reply; <paramref name="onText"/> receives it piece by piece as it is produced.</summary>
    public IReadOnlyList<GeneratedSample> Respond(IReadOnlyList<ChatTurn> turns, SamplingParams sampling, ulong seed, int maxNewTokens, int samples = 1,
        IReadOnlyList<string>? stopStrings = null, Action<int, string>? onText = null)
    {
        var (ids, pixels, tiles) = Prompt(turns);
        var generator = new Generator(_model, _tokenizer, _options);
        var streams = new Dictionary<int, (List<int> Tokens, int Emitted)>();
        void OnToken(TokenEvent e)
        {
            if (onText is null) return;
            if (!streams.TryGetValue(e.Sample, out var s)) s = ([], 0);
            if (StopTokens.Contains(e.Token)) return;
            s.Tokens.Add(e.Token);
            var text = _tokenizer.Decode(s.Tokens);
            int clean = text.EndsWith('\uFFFD') ? text.TrimEnd('\uFFFD').Length : text.Length; // an unfinished UTF-8 character waits
            if (clean > s.Emitted) onText(e.Sample, text[s.Emitted..clean]);
            streams[e.Sample] = (s.Tokens, Math.Max(s.Emitted, clean));
        }
        var request = new GenerationRequest(ids, pixels, tiles, sampling, seed, maxNewTokens, StopTokens, stopStrings, samples);
        return generator.Generate([request], OnToken);
    }

    /// <summary>The reply text without a final stop token.</summary>
    public string Text(GeneratedSample s) =>
        _tokenizer.Decode(s.Tokens.Where((t, i) => !(i == s.Tokens.Length - 1 && StopTokens.Contains(t))));

    /// <summary>Continues a conversation's history with the reply's answer (its reasoning is not carried forward).</summary>
    public static ChatTurn AssistantTurn(string reply)
    {
        var split = ChatTemplate.Split(reply);
        var sb = new StringBuilder(split.ThinkingClosed ? split.Answer : reply.Trim());
        return new ChatTurn("assistant", sb.ToString(), []);
    }
}
