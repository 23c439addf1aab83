using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Bench;

namespace R1V2.Native.Tests.Models;

/// <summary>Per-op profiling of a training step (`engine bench model --profile`) and of decoding (`engine bench generate --profile`).</summary>
public sealed class StepProfileTests
{
    [Fact]
    public void ProfiledStep_CountsEveryOpOfTheModel_AndTheirTimesFitInTheStep()
    {
        var config = VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"));
        using var b = new CpuBackend();
        var t = StepBenchmark.Run(b, config, "tiny", StepShape.Uniform(2, 48, 1), TrainableParts.All, steps: 2, peakFlops: null, profile: true);
        var ops = t.Ops!.ToDictionary(o => o.Op);
        int vit = config.Vision.NumLayers, llm = config.Llm.NumLayers;
        // One attention forward and backward per layer of either tower, every step.
        Assert.Equal(vit + llm, ops["attention_forward"].Calls);
        Assert.Equal(vit + llm, ops["attention_backward"].Calls);
        // The LM head walks the vocabulary in chunks, once for the log-probs and once for their gradient: no [T, V] logits.
        int chunks = (config.Llm.VocabSize + ChunkedLmHead.DefaultChunk - 1) / ChunkedLmHead.DefaultChunk;
        Assert.Equal(chunks, ops["chunk_lse_update"].Calls);
        Assert.Equal(chunks, ops["chunk_logit_grad"].Calls);
        Assert.False(ops.ContainsKey("cross_entropy_forward"));
        Assert.True(ops["gemm"].Calls >= 4 * (vit + llm), $"{ops["gemm"].Calls} GEMMs");
        Assert.All(t.Ops!, o => Assert.True(o.Milliseconds >= 0));
        Assert.True(t.Ops!.Sum(o => o.Milliseconds) <= t.ProfiledStepMilliseconds!.Value * 1.001, "op times exceed the step");
        Assert.Equal(t.Ops!.OrderByDescending(o => o.Milliseconds).Select(o => o.Op), t.Ops!.Select(o => o.Op));
        Assert.Null(b.Profile); // profiling ends with the benchmark
        var plain = StepBenchmark.Run(b, config, "tiny", StepShape.Uniform(2, 48, 1), TrainableParts.All, steps: 1, peakFlops: null);
        Assert.Null(plain.Ops);
    }

    [Theory]
    [InlineData(BenchStage.Sft)]
    [InlineData(BenchStage.Mpo)]
    [InlineData(BenchStage.Grpo)]
    [InlineData(BenchStage.Rm)]
    public void StageBenchmarks_ScoreTheResponseRows_AndTheirLossPathStaysBelowFullLogits(BenchStage stage)
    {
        // The small config with a 4096-row vocabulary: [T, V] logits (5 MB) dwarf the hidden states' gradient (0.3 MB).
        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "configs", "small.json")))!;
        json["llm_config"]!["vocab_size"] = 4096;
        var path = Path.Combine(Path.GetTempPath(), $"small-v4096-{Environment.ProcessId}.json");
        File.WriteAllText(path, json.ToJsonString());
        var config = VlmConfig.Load(path);
        File.Delete(path);
        using var b = new CpuBackend();
        var shape = StepShape.Uniform(2, 160, 1);
        var t = StepBenchmark.Run(b, config, "small", shape, TrainableParts.Adapter, steps: 1, peakFlops: null, stage: stage);
        Assert.Equal(stage.ToString().ToLowerInvariant(), t.Stage);
        int text = 160 - (config.TokensPerTile + 2);
        Assert.Equal(stage == BenchStage.Rm ? 0 : 2 * (text / 2), t.ScoredTokens);   // each sequence's last half of text tokens
        Assert.True(t.LossPeakBytes > 0);
        if (stage != BenchStage.Rm)
        {
            // O(rows x chunk): the scored rows' fp32 logits chunk, their gathered states and gradient, and d hidden [T, D].
            int d = config.Llm.HiddenSize, tokens = shape.TextTokens, r = t.ScoredTokens, chunk = Math.Min(config.Llm.VocabSize, ChunkedLmHead.DefaultChunk);
            long bound = (long)r * chunk * 4 + (long)r * d * 4 * 3 + (long)tokens * d * 4 + r * 32L + 65536;
            Assert.True(t.LossPeakBytes <= bound, $"{stage}: loss path {t.LossPeakBytes:N0} B above {bound:N0} B");
            Assert.True(t.LossPeakBytes < t.FullLogitsBytes, $"{stage}: loss path {t.LossPeakBytes:N0} B, full logits {t.FullLogitsBytes:N0} B");
        }
        Assert.InRange(t.PeakOverEstimate, 0.95, 1.05);
    }

    [Fact]
    public void ProfiledGeneration_CountsOpsPerDecodeStep_AndTheirTimesFitInTheStep()
    {
        var config = VlmConfig.Load(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"));
        using var b = new CpuBackend();
        var t = GenerationBenchmark.Run(b, config, "tiny", batch: 2, prompt: 8, newTokens: 5, peakBandwidth: null, profile: true);
        var ops = t.Ops!.ToDictionary(o => o.Op);
        // Every decode step attends over the paged cache once per LLM layer and samples the next tokens.
        Assert.Equal(config.Llm.NumLayers, ops["paged_attention_decode"].Calls);
        Assert.True(ops["sample"].Calls >= 1);
        Assert.True(ops["gemm"].Calls >= 4 * config.Llm.NumLayers, $"{ops["gemm"].Calls} GEMMs per decode step");
        Assert.True(t.Ops!.Sum(o => o.Milliseconds) <= t.ProfiledStepMilliseconds!.Value * 1.001, "op times exceed the step");
        Assert.Null(b.Profile);
        Assert.Null(GenerationBenchmark.Run(b, config, "tiny", 2, 8, 5, null).Ops);
    }
}
