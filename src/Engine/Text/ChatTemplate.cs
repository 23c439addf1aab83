using System.Text;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Engine.Text;

/// <summary>One chat turn; <see cref="ImageTiles"/> gives the tile count of each image attached to it, in order.</summary>
public sealed record ChatMessage(string Role, string Content, IReadOnlyList<int>? ImageTiles = null);

/// <summary>A response split at the end of its reasoning.</summary>
public sealed record ReasonedResponse(string Thinking, string Answer, bool ThinkingClosed);

/// <summary>
/// The InternVL / R1V2 chat format: ChatML turns (<c>&lt;|im_start|&gt;role\n...&lt;|im_end|&gt;\n</c>); each
/// <c>&lt;image&gt;</c> in a turn becomes <c>&lt;img&gt;</c> + <c>&lt;IMG_CONTEXT&gt;</c> x (tokens per tile x tiles) +
/// <c>&lt;/img&gt;</c> (images without a placeholder are put first, one per line); the generation prompt opens the
/// assistant turn and its thinking.
/// </summary>
public sealed class ChatTemplate(int tokensPerTile, string generationPrompt = ChatTemplate.DefaultGenerationPrompt)
{
    public const string DefaultGenerationPrompt = "<|im_start|>assistant\n<think>\n";
    public const string ImagePlaceholder = "<image>";

    public int TokensPerTile { get; } = tokensPerTile;
    public string GenerationPrompt { get; } = generationPrompt;

    public string Render(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt = true)
    {
        var sb = new StringBuilder();
        foreach (var m in messages)
        {
            var tiles = m.ImageTiles ?? [];
            var content = m.Content;
            int placeholders = Count(content, ImagePlaceholder);
            if (placeholders == 0 && tiles.Count > 0)
                content = string.Concat(Enumerable.Repeat(ImagePlaceholder + "\n", tiles.Count)) + content;
            else if (placeholders != tiles.Count)
                throw new ArgumentException($"the {m.Role} turn has {placeholders} {ImagePlaceholder} placeholders but {tiles.Count} images");
            sb.Append("<|im_start|>").Append(m.Role).Append('\n');
            int image = 0, at = 0;
            for (int i = content.IndexOf(ImagePlaceholder, StringComparison.Ordinal); i >= 0; i = content.IndexOf(ImagePlaceholder, at, StringComparison.Ordinal))
            {
                sb.Append(content, at, i - at);
                sb.Append("<img>");
                for (int k = 0; k < TokensPerTile * tiles[image]; k++) sb.Append(TokenizerFiles.ImageContext);
                sb.Append("</img>");
                image++;
                at = i + ImagePlaceholder.Length;
            }
            sb.Append(content, at, content.Length - at);
            sb.Append("<|im_end|>\n");
        }
        if (addGenerationPrompt) sb.Append(GenerationPrompt);
        return sb.ToString();
    }

    /// <summary>Splits a generated response at <c>&lt;/think&gt;</c> (a leading <c>&lt;think&gt;</c> is dropped).</summary>
    public static ReasonedResponse Split(string response)
    {
        var text = response.StartsWith("<think>", StringComparison.Ordinal) ? response["<think>".Length..] : response;
        int end = text.IndexOf("</think>", StringComparison.Ordinal);
        if (end < 0) return new ReasonedResponse(text.Trim(), "", ThinkingClosed: false);
        var answer = text[(end + "</think>".Length)..];
        int stop = answer.IndexOf("<|im_end|>", StringComparison.Ordinal);
        if (stop >= 0) answer = answer[..stop];
        return new ReasonedResponse(text[..end].Trim(), answer.Trim(), ThinkingClosed: true);
    }

    private static int Count(string s, string what)
    {
        int n = 0;
        for (int i = s.IndexOf(what, StringComparison.Ordinal); i >= 0; i = s.IndexOf(what, i + what.Length, StringComparison.Ordinal)) n++;
        return n;
    }
}
