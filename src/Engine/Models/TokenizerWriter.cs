using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace R1V2.Native.Engine.Models;

/// <summary>
/// Writes a byte-level BPE tokenizer in the Hugging Face tokenizer.json format for randomly initialised checkpoints:
/// the 256 byte symbols (GPT-2's byte-to-unicode table) as ids 0..255, the special tokens the chat template needs,
/// then the tokens of the given merges (none by default; <see cref="Text.BpeTrainer"/> learns them from a corpus), and
/// a tokenizer_config.json with the ChatML template.
/// </summary>
public static class TokenizerWriter
{
    public static readonly string[] SpecialTokens =
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", TokenizerFiles.ImageContext, "<think>", "</think>"];

    public static int MinimumVocabulary => 256 + SpecialTokens.Length;

    /// <summary>GPT-2's reversible byte -> printable character table, used by byte-level BPE vocabularies.</summary>
    public static char[] ByteSymbols()
    {
        var printable = new List<int>();
        for (int b = '!'; b <= '~'; b++) printable.Add(b);
        for (int b = 0xA1; b <= 0xAC; b++) printable.Add(b);
        for (int b = 0xAE; b <= 0xFF; b++) printable.Add(b);
        var table = new char[256];
        int extra = 0;
        for (int b = 0; b < 256; b++) table[b] = printable.Contains(b) ? (char)b : (char)(256 + extra++);
        return table;
    }

    public static void Write(string directory, int vocabSize, IReadOnlyList<(string Left, string Right)>? merges = null)
    {
        merges ??= [];
        if (vocabSize < MinimumVocabulary + merges.Count)
            throw new ArgumentException($"vocab_size {vocabSize} is below the {MinimumVocabulary} byte and special tokens plus {merges.Count} merges of the tokenizer");
        var vocab = new JsonObject();
        var symbols = ByteSymbols();
        for (int b = 0; b < 256; b++) vocab[symbols[b].ToString()] = b;
        for (int i = 0; i < merges.Count; i++)
        {
            var token = merges[i].Left + merges[i].Right;
            if (vocab.ContainsKey(token)) throw new ArgumentException($"merge {i} ('{merges[i].Left}' '{merges[i].Right}') repeats the token '{token}'");
            vocab[token] = MinimumVocabulary + i;
        }
        var added = new JsonArray();
        for (int i = 0; i < SpecialTokens.Length; i++)
            added.Add(new JsonObject
            {
                ["id"] = 256 + i, ["content"] = SpecialTokens[i], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                ["normalized"] = false, ["special"] = true,
            });
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = new JsonObject { ["type"] = "NFC" },
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new JsonArray(
                    new JsonObject { ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = Text.TextTokenizer.Qwen2Pattern }, ["behavior"] = "Isolated", ["invert"] = false },
                    new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = false }),
            },
            ["post_processor"] = null,
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = "", ["end_of_word_suffix"] = "",
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["vocab"] = vocab, ["merges"] = new JsonArray(merges.Select(m => (JsonNode)$"{m.Left} {m.Right}").ToArray()),
            },
        };
        var config = new JsonObject
        {
            ["tokenizer_class"] = "Qwen2Tokenizer",
            ["model_max_length"] = 32768,
            ["bos_token"] = null,
            ["eos_token"] = "<|im_end|>",
            ["pad_token"] = "<|endoftext|>",
            ["additional_special_tokens"] = new JsonArray(SpecialTokens.Select(s => (JsonNode)s).ToArray()),
            ["chat_template"] = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
                + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
        };
        var options = new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        WriteAtomic(Path.Combine(directory, "tokenizer.json"), tokenizer.ToJsonString(options));
        WriteAtomic(Path.Combine(directory, "tokenizer_config.json"), config.ToJsonString(options));
    }

    private static void WriteAtomic(string path, string text)
    {
        File.WriteAllText(path + ".tmp", text, new UTF8Encoding(false));
        File.Move(path + ".tmp", path, overwrite: true);
    }
}
