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

    /// <summary>
    /// The paper's hybrid signal for preference pairs: each sampled response's rule + format reward plus
    /// <paramref name="weight"/> x the reward model's transformed score (<see cref="RewardModelScaling"/>: all the
    /// groups' scores transformed together; standardised, the term counts only above the threshold in standard
    /// deviations). The reward model scores prompt + response + &lt;|im_end|&gt; in one packed pass, a prompt's rows once.
    /// </summary>
    public static List<SampledGroup> WithRewardModel(IReadOnlyList<SampledGroup> groups, RewardModel rm, TextTokenizer tokenizer, double weight,
        RewardModelScaling scaling, int batchSequences = 64)
    {
        if (groups.Count == 0) return [];
        var chat = new ChatRunner(rm.Vlm, tokenizer, new GeneratorOptions(64, MaxBatch: 1));
        int imEnd = tokenizer.RequireToken("<|im_end|>");
        var sequences = new List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)>();
        foreach (var g in groups)
        {
            var (ids, pixels, tiles) = chat.Prompt([new ChatTurn("user", g.Prompt.Question, g.Prompt.Images)]);
            foreach (var response in g.Responses) sequences.Add((ids, [.. tokenizer.Encode(response), imEnd], pixels, tiles));
        }
        // Scored batchSequences at a time (a pass holds every sequence's activations); transformed together after.
        var raw = sequences.Chunk(Math.Max(1, batchSequences)).SelectMany(c => rm.ScoreSequences(c)).Select(x => (double)x).ToArray();
        var terms = scaling.ApplyStep(raw);
        var result = new List<SampledGroup>();
        int at = 0;
        foreach (var g in groups)
        {
            var rewards = g.Rewards.Select(r =>
            {
                double term = weight * terms[at], score = raw[at++];
                return r with { RewardModelRaw = score, RewardModel = term, Total = r.Total - r.RewardModel + term };
            }).ToList();
            result.Add(g with { Rewards = rewards });
        }
        return result;
    }

    /// <summary>Preference pairs (best vs worst non-empty response of each group) whose reward margin is at least <paramref name="margin"/>.</summary>
    public static List<(SampledGroup Group, int Chosen, int Rejected)> Pairs(IEnumerable<SampledGroup> groups, double margin)
    {
        var pairs = new List<(SampledGroup, int, int)>();
        foreach (var g in groups)
        {
            // An empty response (the sampler stopped at once) cannot be trained on as either side of a pair.
            int best = -1, worst = -1;
            for (int i = 0; i < g.Rewards.Count; i++)
            {
                if (g.Responses[i].Length == 0) continue;
                if (best < 0 || g.Rewards[i].Total > g.Rewards[best].Total) best = i;
                if (worst < 0 || g.Rewards[i].Total < g.Rewards[worst].Total) worst = i;
            }
            if (best >= 0 && best != worst && g.Rewards[best].Total - g.Rewards[worst].Total >= margin) pairs.Add((g, best, worst));
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
