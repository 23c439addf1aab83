using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Tests.Models;
using R1V2.Native.Trainer.Grpo;
using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Rollouts from the generator through a GRPO update of the VLM.</summary>
[Collection("cpu")]
public sealed class GrpoUpdateTests(CpuFixture fx)
{
    [Fact]
    public void GeneratorLogProbs_AreTheUpdatesOldLogProbs_AndUpdatesRaiseTheAdvantageWeightedLikelihood()
    {
        var (prompt, pixels, dir) = FirstFixturePrompt();
        using var model = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.AdapterAndLlm);

        const int g = 6;
        var settings = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, Temperature: 1f);
        var samples = new Generator(model, options: new GeneratorOptions(CacheBlocks: 64, BlockSize: 4))
            .Generate([new GenerationRequest(prompt, pixels, 1, new SamplingParams(1f), Seed: 11, MaxNewTokens: 5, Samples: g)]);
        // A reward the samples disagree on: how many of their tokens fall in the lower half of the vocabulary.
        var rewards = samples.Select(s => (double)s.Tokens.Count(t => t < 150)).ToArray();
        var advantages = GrpoMath.Advantages(rewards, g, AdvantageMode.MeanStd);
        Assert.Contains(advantages, a => Math.Abs(a) > 0.1);
        var rollouts = samples.Select((s, i) => new Rollout(0, prompt, pixels, 1, s.Tokens, s.LogProbs, rewards[i], advantages[i], 0)).ToList();

        // Packed teacher forcing at the sampling temperature gives back every rollout's sampling log-probs (the
        // reference model's log-probs for the KL term are computed this way).
        var (packed, starts) = Rollout.Pack(rollouts, model.ImageContextId);
        using (var pass = model.Forward(packed, withLoss: false))
        {
            var lp = FusedGrpoLoss.TokenLogProbs(fx.Backend, pass.Hidden, model.LmHead, packed.Targets, 1f, 100);
            for (int i = 0; i < g; i++)
                for (int k = 0; k < rollouts[i].Response.Length; k++)
                    Assert.True(Math.Abs(rollouts[i].OldLogProbs[k] - lp[starts[i] + k]) < 1e-4, $"rollout {i} token {k}");
        }

        var update = new GrpoUpdate(model, settings);
        foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
        var first = update.Accumulate(rollouts);
        // Same weights as at sampling: every ratio is 1 (the generator's log-probs are the training log-probs).
        Assert.True(Math.Abs(first.MeanRatio - 1) < 1e-4, $"mean ratio {first.MeanRatio}");
        Assert.True(Math.Abs(first.MeanLogProbChange) < 1e-4, $"mean log-prob change {first.MeanLogProbChange}");
        Assert.Equal(g * 5, first.Tokens);
        Assert.Null(first.Kl);
        // A reference 0.3 nats above the policy on every token: k3 = e^0.3 - 0.3 - 1 per token.
        foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
        var shifted = update.Accumulate(rollouts, rollouts.Select(r => r.OldLogProbs.Select(x => x + 0.3f).ToArray()).ToList());
        Assert.True(Math.Abs(shifted.Kl!.Value - (Math.Exp(0.3) - 1.3)) < 2e-4, $"k3 {shifted.Kl}");
        foreach (var p in model.Parameters.Trainable) p.ZeroGrad();

        double Objective()
        {
            // sum_i A_i log pi(y_i) at the current weights, through a plain scoring forward.
            double total = 0;
            foreach (var r in rollouts)
            {
                var ids = r.PromptIds.Concat(r.Response).ToArray();
                using var pass = model.Forward(VlmBatch.Single(ids, r.Pixels, r.Tiles, lossFrom: r.PromptIds.Length));
                total += r.Advantage * pass.LogProbs.Sum(x => (double)x);
            }
            return total;
        }
        double before = Objective();
        using var opt = new AdamWOptimizer(fx.Backend, model.Parameters.Trainable, new AdamWSettings(3e-3f));
        opt.Step(3e-3f);
        for (int step = 0; step < 2; step++)
        {
            opt.ZeroGrad();
            update.Accumulate(rollouts);
            opt.Step(3e-3f);
        }
        double after = Objective();
        Assert.True(after > before + 0.05, $"the advantage-weighted log-likelihood should rise: {before:F4} -> {after:F4}");
    }
    [Theory]
    [InlineData(LossAggregation.SequenceMeanTokenMean)]
    [InlineData(LossAggregation.TokenMean)]
    public void IdenticalRollouts_RunOnce_WithTheGradientOfEveryCopy(LossAggregation aggregation)
    {
        var (prompt, pixels, dir) = FirstFixturePrompt();
        using var model = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.AdapterAndLlm);
        var samples = new Generator(model, options: new GeneratorOptions(CacheBlocks: 64, BlockSize: 4))
            .Generate([new GenerationRequest(prompt, pixels, 1, new SamplingParams(1f), Seed: 5, MaxNewTokens: 4, Samples: 2)]);
        Assert.False(samples[0].Tokens.SequenceEqual(samples[1].Tokens));
        var a = new Rollout(0, prompt, pixels, 1, samples[0].Tokens, samples[0].LogProbs, 0, 1.2, 0);
        var b = new Rollout(0, prompt, pixels, 1, samples[1].Tokens, samples[1].LogProbs, 0, -0.7, 0);
        var update = new GrpoUpdate(model, new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, Temperature: 1f), aggregation);

        (GrpoUpdateStats Stats, float[][] Grads) Run(IReadOnlyList<Rollout> rollouts)
        {
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            var stats = update.Accumulate(rollouts);
            return (stats, [.. model.Parameters.Trainable.Select(p => p.Grad!.ToFloatArray())]);
        }
        var ga = Run([a]).Grads;
        var gb = Run([b]).Grads;
        var (stats, merged) = Run([a, b, a, a with { }, b]); // a three times (one a copy of the record), b twice
        Assert.Equal((5, 2), (stats.Sequences, stats.Distinct));
        Assert.Equal(3 * a.Response.Length + 2 * b.Response.Length, stats.Tokens);
        // The loss is a mean over every copy: per sequence (each sequence 1/5) or per token (each token 1/N).
        double wa = aggregation == LossAggregation.SequenceMeanTokenMean ? 3 / 5.0 : 3.0 * a.Response.Length / stats.Tokens;
        double wb = aggregation == LossAggregation.SequenceMeanTokenMean ? 2 / 5.0 : 2.0 * b.Response.Length / stats.Tokens;
        for (int i = 0; i < merged.Length; i++)
            Check.Close(ga[i].Zip(gb[i], (x, y) => wa * x + wb * y).ToArray(), merged[i], 1e-6, 1e-4, $"gradient {i}");
        // A rollout differing only in its advantage is another sequence.
        Assert.Equal(3, Run([a, a with { Advantage = 0.5 }, b]).Stats.Distinct);
    }

    [Theory]
    [InlineData(LossAggregation.SequenceMeanTokenMean)]
    [InlineData(LossAggregation.TokenMean)]
    public void AccumulatedHalves_WithTheWholeBatchsWeights_EqualOneUpdateOfTheBatch(LossAggregation aggregation)
    {
        // Four rollouts of lengths 6, 2, 5 and 1 (prefixes of sampled responses with their log-probs): one update of all
        // four against two accumulated updates of two each, given the weights of the whole batch. Each half normalised
        // by itself (before the fix) gives a different gradient: twice as large, and for token_mean weighted per half.
        var (prompt, pixels, dir) = FirstFixturePrompt();
        using var model = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.AdapterAndLlm);
        var samples = new Generator(model, options: new GeneratorOptions(CacheBlocks: 64, BlockSize: 4))
            .Generate([new GenerationRequest(prompt, pixels, 1, new SamplingParams(1f), Seed: 13, MaxNewTokens: 6, Samples: 4)]);
        int[] lengths = [6, 2, 5, 1];
        double[] advantages = [1.2, -0.3, -0.9, 0.6];
        var rollouts = samples.Select((s, i) => new Rollout(0, prompt, pixels, 1, s.Tokens[..lengths[i]], s.LogProbs[..lengths[i]], 0, advantages[i], 0)).ToList();
        var update = new GrpoUpdate(model, new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, Temperature: 1f), aggregation);
        float[][] Grads() => [.. model.Parameters.Trainable.Select(p => p.Grad!.ToFloatArray())];
        void Zero() { foreach (var p in model.Parameters.Trainable) p.ZeroGrad(); }

        Zero();
        double whole = update.Accumulate(rollouts).Loss;
        var once = Grads();
        Zero();
        var weights = GrpoMath.SequenceWeights(lengths, aggregation);
        double halves = update.Accumulate(rollouts[..2], null, weights[..2]).Loss + update.Accumulate(rollouts[2..], null, weights[2..]).Loss;
        var accumulated = Grads();
        Assert.Equal(whole, halves, 1e-6);
        for (int i = 0; i < once.Length; i++) Check.Close(once[i], accumulated[i], 1e-6, 1e-4, $"gradient {i}");
        Zero();
        update.Accumulate(rollouts[..2]);
        update.Accumulate(rollouts[2..]);
        var selfNormalised = Grads();
        Assert.True(Check.RelativeL2(TestData.ToDouble(once.SelectMany(g => g).ToArray()), selfNormalised.SelectMany(g => g).ToArray()) > 0.1,
            "each half normalised by itself should not match the whole batch");
    }

    [Fact]
    public void RolloutsOfOnePrompt_ShareItsRows_WithTheLossAndGradientOfPackingEachWhole()
    {
        var (prompt, pixels, dir) = FirstFixturePrompt();
        using var model = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.AdapterAndLlm);
        var samples = new Generator(model, options: new GeneratorOptions(CacheBlocks: 64, BlockSize: 4))
            .Generate([new GenerationRequest(prompt, pixels, 1, new SamplingParams(1f), Seed: 9, MaxNewTokens: 5, Samples: 4)]);
        double[] advantages = [1.1, -0.4, 0.7, -1.4];
        var rollouts = samples.Select((s, i) => new Rollout(0, prompt, pixels, 1, s.Tokens, s.LogProbs, 0, advantages[i], 0)).ToList();
        var settings = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, Temperature: 1f);

        (GrpoUpdateStats Stats, float[][] Grads) Run(bool share)
        {
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            var stats = new GrpoUpdate(model, settings) { SharePrompts = share }.Accumulate(rollouts);
            return (stats, [.. model.Parameters.Trainable.Select(p => p.Grad!.ToFloatArray())]);
        }
        var whole = Run(false);
        var shared = Run(true);
        Assert.Equal(whole.Stats.Loss, shared.Stats.Loss, 1e-6);
        Assert.Equal(whole.Stats.MeanRatio, shared.Stats.MeanRatio, 1e-6);
        for (int i = 0; i < whole.Grads.Length; i++) Check.Close(whole.Grads[i], shared.Grads[i], 1e-6, 1e-4, $"gradient {i}");
        Assert.Contains(shared.Grads, g => g.Any(x => x != 0));
    }

    [Fact]
    public void AHeadWiderThanItsTokenizer_GivesARatioOfOne_BeforeAnyUpdate()
    {
        // The fixture's head has 300 rows; a tokenizer of the 264 byte and special tokens leaves 36 padding rows. Sampling
        // draws from the tokenizer's ids and returns log softmax over them; the update's loss must normalise over the
        // same ids, or every ratio starts below 1 (the padding rows' probability mass).
        var (prompt, pixels, dir) = FirstFixturePrompt();
        using var model = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.AdapterAndLlm);
        var tokDir = Directory.CreateTempSubdirectory("r1v2-tok-").FullName;
        try
        {
            TokenizerWriter.Write(tokDir, TokenizerWriter.MinimumVocabulary);
            var tokenizer = Engine.Text.TextTokenizer.Load(tokDir);
            int limit = tokenizer.VocabularySize;
            Assert.True(limit < model.LmHead.Value.Dim(0), $"tokenizer {limit} vs head {model.LmHead.Value.Dim(0)}");
            var samples = new Generator(model, tokenizer, new GeneratorOptions(CacheBlocks: 64, BlockSize: 4))
                .Generate([new GenerationRequest(prompt, pixels, 1, new SamplingParams(0.7f), Seed: 3, MaxNewTokens: 6, Samples: 4)]);
            double[] adv = [1, -1, 0.5, -0.5];
            var rollouts = samples.Select((s, i) => new Rollout(0, prompt, pixels, 1, s.Tokens, s.LogProbs, 0, adv[i], 0)).ToList();
            var settings = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, Temperature: 0.7f);

            var (packed, starts) = Rollout.Pack(rollouts, model.ImageContextId);
            using (var pass = model.Forward(packed, withLoss: false))
            {
                var lp = FusedGrpoLoss.TokenLogProbs(fx.Backend, pass.Hidden, model.LmHead, packed.Targets, 0.7f, 100, limit);
                for (int i = 0; i < rollouts.Count; i++)
                    for (int k = 0; k < rollouts[i].Response.Length; k++)
                        Assert.True(Math.Abs(Math.Exp(lp[starts[i] + k] - rollouts[i].OldLogProbs[k]) - 1) < 1e-4, $"rollout {i} token {k}: ratio {Math.Exp(lp[starts[i] + k] - rollouts[i].OldLogProbs[k])}");
            }
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            var limited = new GrpoUpdate(model, settings, vocabChunk: 100, vocabLimit: limit).Accumulate(rollouts);
            Assert.True(Math.Abs(limited.MeanRatio - 1) < 1e-5 && limited.ClippedFraction == 0, $"ratio {limited.MeanRatio}, clipped {limited.ClippedFraction}");
            Assert.True(model.LmHead.Grad!.ToFloatArray()[(limit * model.LmHead.Value.Dim(1))..].All(x => x == 0), "padding rows get no gradient");
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            var everyRow = new GrpoUpdate(model, settings, vocabChunk: 100).Accumulate(rollouts);
            Assert.True(everyRow.MeanRatio < 1 - 1e-3, $"over every head row the ratio starts below 1: {everyRow.MeanRatio}");
        }
        finally { Directory.Delete(tokDir, true); }
    }

    [Fact]
    public void ClippedFractions_CountTheTokensWhoseClipIsActive_OnTheSideOfTheirAdvantage()
    {
        // Old log-probs shifted so that every ratio is 0.5 (below the band: only A < 0 clips) or 4 (above it: A > 0 clips,
        // A < 0 meets the dual clip at 3). Counting every ratio outside the band, as before, gives 1 in both cases.
        var (prompt, pixels, dir) = FirstFixturePrompt();
        using var model = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.AdapterAndLlm);
        var samples = new Generator(model, options: new GeneratorOptions(CacheBlocks: 64, BlockSize: 4))
            .Generate([new GenerationRequest(prompt, pixels, 1, new SamplingParams(1f), Seed: 21, MaxNewTokens: 5, Samples: 4)]);
        double[] adv = [1, -1, 0.5, -0.5];
        var settings = new GrpoLossSettings(EpsLow: 0.2f, EpsHigh: 0.28f, DualClip: 3f, Temperature: 1f);
        double negativeShare = samples.Where((_, i) => adv[i] < 0).Sum(x => x.Tokens.Length) / (double)samples.Sum(x => x.Tokens.Length);
        GrpoUpdateStats Run(double ratio)
        {
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            var rollouts = samples.Select((x, i) => new Rollout(0, prompt, pixels, 1, x.Tokens, x.LogProbs.Select(l => (float)(l - Math.Log(ratio))).ToArray(), 0, adv[i], 0)).ToList();
            return new GrpoUpdate(model, settings).Accumulate(rollouts);
        }
        var low = Run(0.5);
        Assert.Equal(negativeShare, low.ClippedFraction, 9);
        Assert.Equal(0, low.DualClippedFraction);
        var high = Run(4);
        Assert.Equal(1, high.ClippedFraction, 9);
        Assert.Equal(negativeShare, high.DualClippedFraction, 9);
    }

    /// <summary>The internvit6b fixture's first sequence as a prompt, its first tile's pixels, and the fixture's directory.</summary>
    private static (int[] Prompt, float[] Pixels, string Dir) FirstFixturePrompt()
    {
        var dir = VlmParityTests.FixtureDir("internvit6b");
        var inputs = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "inputs.json")))!.AsObject();
        int end = inputs["cu_seqlens"]![1]!.GetValue<int>();
        var prompt = inputs["input_ids"]!.AsArray().Select(x => x!.GetValue<int>()).Take(end).ToArray();
        using var e = SafetensorsFile.Open(Path.Combine(dir, "expected.safetensors"));
        return (prompt, e.ReadFloats("pixel_values")[..(3 * 28 * 28)], dir);
    }
}
