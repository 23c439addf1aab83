using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Rewards;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer;

/// <summary>G sampled responses of one prompt with their rewards.</summary>
public sealed record SampledGroup(PromptRow Prompt, IReadOnlyList<string> Responses, IReadOnlyList<RewardBreakdown> Rewards);

/// <summary>
/// Offline uses of sampling + reward, outside a training step: the MPO pair builder (best and worst response of a
/// prompt when their reward margin passes a threshold) and the prompt pre-filter (drop prompts whose G samples all get
/// the same reward: they would only ever give zero advantage).
/// </summary>
public static class PromptSampling
{
    private static readonly HybridReward RuleAndFormatReward = new(new FormatReward());

    /// <summary>
    /// The rule + format reward of a response to a prompt row, as <c>engine build-pairs</c> and <c>engine prefilter</c>
    /// score it: the answer part after &lt;/think&gt; against the row's answer (<see cref="AnswerVerifier.AnswerPart"/>, the
    /// same definition as the training reward and evaluation).
    /// </summary>
    public static RewardBreakdown RuleAndFormat(string response, PromptRow prompt) =>
        RuleAndFormatReward.Score(response, new RewardContext(prompt.Answer, prompt.Choices));

    public static List<SampledGroup> Sample(VisionLanguageModel model, TextTokenizer tokenizer, IReadOnlyList<PromptRow> prompts, int samples,
        SamplingParams sampling, int maxNewTokens, ulong seed, Func<string, PromptRow, RewardBreakdown> reward, int cacheBlocks = 1024, int batchSequences = 64)
    {
        // Prompts are generated together until about batchSequences sequences decode at once (each prompt's seed is its
        // own, so the responses do not depend on the batching).
        int promptsPerBatch = Math.Max(1, batchSequences / Math.Max(samples, 1));
        var chat = new ChatRunner(model, tokenizer, new GeneratorOptions(cacheBlocks, MaxBatch: Math.Max(samples, 1) * promptsPerBatch));
        var groups = new List<SampledGroup>();
        foreach (var batch in prompts.Chunk(promptsPerBatch))
        {
            var requests = batch.Select(p =>
            {
                var (ids, pixels, tiles) = chat.Prompt([new ChatTurn("user", p.Question, p.Images)]);
                return new GenerationRequest(ids, pixels, tiles, sampling, seed + (ulong)p.Index * 1000003, maxNewTokens, chat.StopTokens, Samples: samples);
            }).ToList();
            var results = new Generator(model, tokenizer, new GeneratorOptions(cacheBlocks, MaxBatch: samples * batch.Length)).Generate(requests);
            for (int i = 0; i < batch.Length; i++)
            {
                var texts = results.Where(r => r.Request == i).OrderBy(r => r.Sample).Select(chat.Text).ToList();
                groups.Add(new SampledGroup(batch[i], texts, texts.Select(t => reward(t, batch[i])).ToList()));
            }
        }
        return groups;
    }

    /// <summary>Preference pairs (best vs worst of each group) whose reward margin is at least <paramref name="margin"/>.</summary>
    public static List<(SampledGroup Group, int Chosen, int Rejected)> Pairs(IEnumerable<SampledGroup> groups, double margin)
    {
        var pairs = new List<(SampledGroup, int, int)>();
        foreach (var g in groups)
        {
            int best = 0, worst = 0;
            for (int i = 1; i < g.Rewards.Count; i++)
            {
                if (g.Rewards[i].Total > g.Rewards[best].Total) best = i;
                if (g.Rewards[i].Total < g.Rewards[worst].Total) worst = i;
            }
            if (g.Rewards[best].Total - g.Rewards[worst].Total >= margin && best != worst) pairs.Add((g, best, worst));
        }
        return pairs;
    }

    public static void WritePairs(string path, IEnumerable<(SampledGroup Group, int Chosen, int Rejected)> pairs)
    {
        var lines = pairs.Select(p => JsonSerializer.Serialize(new
        {
            prompt = p.Group.Prompt.Question,
            images = p.Group.Prompt.Images,
            chosen = p.Group.Responses[p.Chosen],
            rejected = p.Group.Responses[p.Rejected],
            chosen_reward = p.Group.Rewards[p.Chosen].Total,
            rejected_reward = p.Group.Rewards[p.Rejected].Total,
        }));
        File.WriteAllLines(path + ".tmp", lines);
        File.Move(path + ".tmp", path, overwrite: true);
    }

    /// <summary>Writes the prompts whose samples disagree, as JSONL rows in the input format.</summary>
    public static int WriteInformative(string path, IEnumerable<SampledGroup> groups)
    {
        var kept = groups.Where(g => DynamicSampling.Informative(g.Rewards.Select(r => r.Total).ToList())).ToList();
        File.WriteAllLines(path + ".tmp", kept.Select(g => JsonSerializer.Serialize(new
        {
            question = g.Prompt.Question, answer = g.Prompt.Answer, images = g.Prompt.Images, choices = g.Prompt.Choices, image_digits = g.Prompt.ImageDigits, image_objects = g.Prompt.ImageObjects,
        })));
        File.Move(path + ".tmp", path, overwrite: true);
        return kept.Count;
    }
}
