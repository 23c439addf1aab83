using System.Text;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;

namespace R1V2.Native.Tests.Fuzz;

/// <summary>
/// One harness per parser: the bytes of one input through the parser as the engine uses it. The property: an input
/// either parses or fails with the documented error family (`Program.IsInputError`: the engine's InputException
/// family and .NET's input exceptions), never with another exception and never hanging. The committed corpus under
/// tests/fuzz/corpus/TARGET is replayed through them on every test run (<see cref="CorpusReplayTests"/>).
/// </summary>
public static class Harnesses
{
    public static readonly IReadOnlyDictionary<string, Action<byte[], string>> Targets = new Dictionary<string, Action<byte[], string>>
    {
        ["safetensors"] = (bytes, dir) =>
        {
            var path = Path.Combine(dir, "model.safetensors");
            File.WriteAllBytes(path, bytes);
            using var file = SafetensorsFile.Open(path);
            foreach (var name in file.Tensors.Keys) file.ReadFloats(name);
        },
        ["config"] = (bytes, dir) =>
        {
            var path = Path.Combine(dir, "config.json");
            File.WriteAllBytes(path, bytes);
            VlmConfig.Load(path);
        },
        ["tokenizer"] = (bytes, dir) =>
        {
            File.WriteAllBytes(Path.Combine(dir, "tokenizer.json"), bytes);
            var tokenizer = TextTokenizer.Load(dir);
            var ids = tokenizer.Encode("Hello <|im_start|>user\\nWhat is 2 + 2?<think>x</think>\\boxed{4} héllo 数字");
            tokenizer.Decode(ids);
        },
        ["chat"] = (bytes, _) =>
        {
            // A user message as the chat template renders it (<image> markers become image-token runs).
            var text = Encoding.UTF8.GetString(bytes);
            new ChatTemplate(4).Render([new ChatMessage("user", text, [1, 2, 1])]);
            ChatTemplate.Split(text);
        },
        ["jsonl"] = (bytes, dir) =>
        {
            var path = Path.Combine(dir, "rows.jsonl");
            File.WriteAllBytes(path, bytes);
            var prompts = new PromptDataset(path, 1);
            prompts.Next(Math.Min(prompts.Count, 4));
        },
        ["pairs"] = (bytes, dir) =>
        {
            var path = Path.Combine(dir, "pairs.jsonl");
            File.WriteAllBytes(path, bytes);
            var pairs = new PreferenceDataset(path, 1);
            pairs.Next(Math.Min(pairs.Count, 4));
        },
        ["yaml"] = (bytes, dir) =>
        {
            var path = Path.Combine(dir, "run.yaml");
            File.WriteAllBytes(path, bytes);
            TrainConfig.Load(path);
        },
        ["image"] = (bytes, dir) =>
        {
            var path = Path.Combine(dir, "image.png");
            File.WriteAllBytes(path, bytes);
            new ImagePreprocessor(28, maxTiles: 4).Load(path);
        },
    };

    /// <summary>Whether an exception is one the engine documents for bad input.</summary>
    public static bool Documented(Exception e) => R1V2.Native.Cli.Program.IsInputError(e);

    /// <summary>
    /// The most one input may allocate: above the largest documented need (an image at the preprocessor's 64 Mi-pixel
    /// limit, as fp32 RGB, 768 MiB); a parser that sizes a buffer from a header it has not checked goes past it.
    /// </summary>
    public const long MaxAllocatedBytes = 1L << 30;

    /// <summary>Runs a target on one input, then fails if it allocated more than <see cref="MaxAllocatedBytes"/> (on this thread).</summary>
    public static void Run(string target, byte[] bytes, string dir)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        try { Targets[target](bytes, dir); }
        finally
        {
            long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            if (allocated > MaxAllocatedBytes) throw new AllocationLimitException($"{target}: one input allocated {allocated} bytes, over the {MaxAllocatedBytes}-byte limit");
        }
    }
}

/// <summary>A harness input that allocated more than the limit: a finding, like a crash.</summary>
public sealed class AllocationLimitException(string message) : Exception(message);
