using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Tests.Models;

namespace R1V2.Native.Tests.Generation;

/// <summary>Generation with the paged KV cache against full (uncached) forwards of the same model.</summary>
[Collection("cpu")]
public sealed class GeneratorTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    /// <summary>The 6B-style PyTorch fixture model (distinct logits, unlike a 0.02-std random init) and its image prompt.</summary>
    private (VisionLanguageModel Model, int[] Prompt, float[] Pixels) Fixture()
    {
        var dir = VlmParityTests.FixtureDir("internvit6b");
        var inputs = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "inputs.json")))!.AsObject();
        var ids = inputs["input_ids"]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        int firstEnd = inputs["cu_seqlens"]![1]!.GetValue<int>();
        using var expected = SafetensorsFile.Open(Path.Combine(dir, "expected.safetensors"));
        var pixels = expected.ReadFloats("pixel_values")[..(3 * 28 * 28)]; // the first sequence's single tile
        return (VisionLanguageModel.Load(_b, dir), ids[..firstEnd], pixels);
    }

    /// <summary>log softmax(logits / T) of the full forward's last position, in double.</summary>
    private double[] FullForwardLogProbs(VisionLanguageModel model, int[] ids, float[] pixels, double temperature)
    {
        using var pass = model.Forward(VlmBatch.Single(ids, pixels, 1));
        int v = model.Config.Llm.VocabSize;
        var row = model.FullLogits(pass)[((ids.Length - 1) * v)..(ids.Length * v)];
        double m = row.Max() / temperature, z = row.Sum(x => Math.Exp(x / temperature - m));
        return row.Select(x => x / temperature - m - Math.Log(z)).ToArray();
    }

    [Fact]
    public void GreedyWithTheCache_EqualsTheArgmaxOfAFullForward_AtEveryStep()
    {
        var (model, prompt, pixels) = Fixture();
        using var _ = model;
        var gen = new Generator(model, options: new GeneratorOptions(CacheBlocks: 16, BlockSize: 4));
        var result = gen.Generate([new GenerationRequest(prompt, pixels, 1, SamplingParams.Greedy, MaxNewTokens: 10)]).Single();
        Assert.Equal(10, result.Tokens.Length);
        Assert.Equal(FinishReason.Length, result.Finish);
        var context = prompt.ToList();
        for (int k = 0; k < result.Tokens.Length; k++)
        {
            var logp = FullForwardLogProbs(model, [.. context], pixels, 1.0);
            int argmax = Array.IndexOf(logp, logp.Max());
            Assert.True(argmax == result.Tokens[k], $"step {k}: cached greedy chose {result.Tokens[k]}, the full forward's argmax is {argmax}");
            Assert.True(Math.Abs(logp[argmax] - result.LogProbs[k]) < 1e-4, $"step {k}: log-prob {result.LogProbs[k]} vs {logp[argmax]}");
            context.Add(result.Tokens[k]);
        }
    }

    [Fact]
    public void SamplesOfOnePrompt_ShareItsBlocks_CopyOnWrite_AndEachMatchesAFullForward()
    {
        var (model, prompt, pixels) = Fixture();
        using var _ = model;
        var gen = new Generator(model, options: new GeneratorOptions(CacheBlocks: 32, BlockSize: 4));
        var request = new GenerationRequest(prompt, pixels, 1, new SamplingParams(Temperature: 1.5f), Seed: 7, MaxNewTokens: 6, Samples: 4);
        var samples = gen.Generate([request]);
        var stats = gen.LastStats!;
        Assert.Equal(4, samples.Count);
        Assert.Equal(prompt.Length, stats.PrefillTokens);              // one prefill for all four samples
        if (prompt.Length % 4 != 0) Assert.True(stats.CopiedBlocks >= 3, $"expected copy-on-write of the shared partial block, got {stats.CopiedBlocks}");
        Assert.True(samples.Select(s => string.Join(",", s.Tokens)).Distinct().Count() > 1, "different seeds should give different samples");
        foreach (var s in samples)
        {
            var context = prompt.ToList();
            for (int k = 0; k < s.Tokens.Length; k++)
            {
                var logp = FullForwardLogProbs(model, [.. context], pixels, 1.5);
                Assert.True(Math.Abs(logp[s.Tokens[k]] - s.LogProbs[k]) < 1e-4, $"sample {s.Sample} step {k}: log-prob {s.LogProbs[k]} vs full forward {logp[s.Tokens[k]]}");
                context.Add(s.Tokens[k]);
            }
        }
        var again = new Generator(model, options: new GeneratorOptions(CacheBlocks: 32, BlockSize: 4)).Generate([request]);
        Assert.Equal(samples.Select(s => s.Tokens), again.Select(s => s.Tokens)); // (seed, prompt) reproduces
    }

    [Fact]
    public void ContinuousBatching_AndPreemption_GiveTheSameCompletionsAsOneAtATime()
    {
        var (model, prompt, pixels) = Fixture();
        using var _ = model;
        var text = Enumerable.Range(0, 20).Select(i => (i * 37 + 5) % 250).ToArray(); // text-only prompts of several lengths
        var requests = Enumerable.Range(0, 5).Select(i => new GenerationRequest(text[..(2 + i * 2)], MaxNewTokens: 5 + i)).ToList();
        var alone = requests.Select(r => new Generator(model, options: new GeneratorOptions(CacheBlocks: 16, BlockSize: 4)).Generate([r]).Single().Tokens).ToList();

        var batched = new Generator(model, options: new GeneratorOptions(CacheBlocks: 64, BlockSize: 4, MaxBatch: 2));
        var results = batched.Generate(requests);
        Assert.Equal(alone, results.Select(r => r.Tokens));

        // A cache too small for all of them at once: the newest is preempted and recomputed.
        var tight = new Generator(model, options: new GeneratorOptions(CacheBlocks: 6, BlockSize: 4, MaxBatch: 5));
        var squeezed = tight.Generate(requests);
        Assert.True(tight.LastStats!.Preemptions > 0, "the small cache should force a preemption");
        Assert.Equal(alone, squeezed.Select(r => r.Tokens));
    }

    [Fact]
    public void StopTokens_StopStrings_AndLimits()
    {
        var (model, prompt, pixels) = Fixture();
        using var _ = model;
        var gen = new Generator(model, options: new GeneratorOptions(CacheBlocks: 16, BlockSize: 4));
        var free = gen.Generate([new GenerationRequest(prompt, pixels, 1, MaxNewTokens: 8)]).Single();
        int stopAt = free.Tokens[3];
        var stopped = gen.Generate([new GenerationRequest(prompt, pixels, 1, MaxNewTokens: 8, StopTokens: [stopAt])]).Single();
        Assert.Equal(FinishReason.StopToken, stopped.Finish);
        Assert.Equal(free.Tokens[..(Array.IndexOf(free.Tokens, stopAt) + 1)], stopped.Tokens);

        // A prompt the cache could never hold is refused before anything runs (a server answers it with a 400).
        var e = Assert.Throws<ArgumentException>(() =>
            new Generator(model, options: new GeneratorOptions(CacheBlocks: 2, BlockSize: 4)).Generate([new GenerationRequest(prompt, pixels, 1)]));
        Assert.Contains("cache blocks", e.Message);
        Assert.Throws<ArgumentException>(() => gen.Generate([new GenerationRequest(prompt, pixels, 1, MaxNewTokens: 0)]));
    }

    [Fact]
    public void TheLoop_AdmitsRequestsWhileOthersDecode_AndASeededSampleIsTheSameAloneOrAmongOthers()
    {
        var (model, prompt, pixels) = Fixture();
        using var _ = model;
        var options = new GeneratorOptions(CacheBlocks: 64, BlockSize: 4);
        var sampling = new SamplingParams(0.9f);
        GenerationRequest Request(ulong seed, int samples = 1, int max = 6) => new(prompt, pixels, 1, sampling, seed, max, Samples: samples);
        var alone = new Dictionary<ulong, int[][]>();
        foreach (ulong seed in new ulong[] { 1, 2, 3 })
            alone[seed] = new Generator(model, options: options).Generate([Request(seed, samples: seed == 2 ? 2 : 1)]).Select(x => x.Tokens).ToArray();

        using var loop = new GenerationLoop(model, options: options);
        var got = new Dictionary<int, List<GeneratedSample>>();
        int Submit(ulong seed) { int id = loop.Submit(Request(seed, samples: seed == 2 ? 2 : 1), onDone: x => (got.TryGetValue(x.Request, out var l) ? l : got[x.Request] = []).Add(x)); return id; }
        int a = Submit(1);
        loop.Step(); loop.Step();                      // a decodes alone for two steps
        int b = Submit(2);                             // joins mid-run with two samples sharing its prompt's blocks
        loop.Step();
        Assert.Equal(3, loop.RunningSamples);
        int c = Submit(3);
        int cancelled = Submit(3);
        loop.Step();
        loop.Cancel(cancelled);                        // a client went away: its blocks are free at once
        Assert.Equal(FinishReason.Cancelled, Assert.Single(got[cancelled]).Finish);
        while (!loop.Idle) loop.Step();
        Assert.Equal(0, loop.UsedBlocks);              // everything finished or cancelled freed its blocks
        Assert.Equal(alone[1], got[a].OrderBy(x => x.Sample).Select(x => x.Tokens));
        Assert.Equal(alone[2], got[b].OrderBy(x => x.Sample).Select(x => x.Tokens));
        Assert.Equal(alone[3], got[c].OrderBy(x => x.Sample).Select(x => x.Tokens));
    }
}
