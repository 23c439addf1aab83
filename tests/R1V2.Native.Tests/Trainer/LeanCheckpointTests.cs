using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Ssb;
using Xunit.Abstractions;

namespace R1V2.Native.Tests.Trainer;

/// <summary>
/// Training checkpoints hold what trains (fp32 masters, moments, the buffer by reference) over a hashed base;
/// <c>engine export</c> writes the whole model in the HF layout; frozen parts are held once on a device.
/// </summary>
[Collection("cpu")]
public sealed class LeanCheckpointTests(CpuFixture fx, ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-lean-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    /// <summary>
    /// The tiny config with a decoder 100x the adapter: adapter (LayerNorm 256, 256 -> 96, 96 -> 96) 34k parameters;
    /// ViT, decoder (7 layers, MLP 1536) and a 1024-row untied vocabulary 3.6M, frozen.
    /// </summary>
    private string WideCheckpoint()
    {
        var ckpt = Path.Combine(_dir, "wide");
        if (Directory.Exists(ckpt)) return ckpt;
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json")))!;
        config["vision_config"]!["hidden_size"] = 64;
        config["vision_config"]!["intermediate_size"] = 256;
        var llm = config["llm_config"]!;
        llm["hidden_size"] = 96;
        llm["num_hidden_layers"] = 7;
        llm["intermediate_size"] = 1536;
        llm["vocab_size"] = 1024;
        var path = Path.Combine(_dir, "wide.json");
        File.WriteAllText(path, config.ToJsonString());
        InitCommand.Run(path, ckpt, seed: 3);
        return ckpt;
    }

    private TrainConfig Grpo(string model, string output, int steps, params string[] extra)
    {
        var data = Path.Combine(_dir, "prompts.jsonl");
        File.WriteAllText(data, string.Join("\n", Enumerable.Range(0, 5).Select(i => $"{{\"question\": \"what is {i} + {i}?\", \"answer\": \"{2 * i}\"}}")) + "\n");
        return TrainConfig.Load(null, [$"model={model}", $"output={Path.Combine(_dir, output)}", $"data.path={data}", $"steps={steps}", "trainable=adapter",
            "optim.lr=0.003", "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=6", "grpo.minibatches=2", "grpo.cache_blocks=64",
            "checkpoint.every=1", "checkpoint.keep=2", "grpo.ssb.capacity=16", .. extra]);
    }

    /// <summary>A tiny base checkpoint and one adapter-only GRPO step over it: the base, the run directory and its lean checkpoint.</summary>
    private (string Model, string Run, string Checkpoint) OneStepRun(int seed)
    {
        var model = Path.Combine(_dir, "base");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), model, seed: seed);
        using (var t = new GrpoTrainer(Grpo(model, "run", 1), fx.Backend, GrpoTestRuns.Letters)) t.Run();
        var run = Path.Combine(_dir, "run");
        return (model, run, RunCheckpoints.Latest(run)!);
    }

    private static long AdapterParameters(VlmConfig c) =>
        VlmWeights.Expected(c).Where(t => t.Name.StartsWith(VlmWeights.Adapter, StringComparison.Ordinal)).Sum(t => t.Shape.Aggregate(1L, (a, d) => a * d));

    private static long AllParameters(VlmConfig c) => VlmWeights.Expected(c).Sum(t => t.Shape.Aggregate(1L, (a, d) => a * d));

    [Fact]
    public void AdapterOnlyGrpoCheckpoint_IsTheAdapterMomentsAndBuffer_AndResumesBitIdentical()
    {
        var model = WideCheckpoint();
        var c = VlmConfig.Load(Path.Combine(model, "config.json"));
        long adapter = AdapterParameters(c), all = AllParameters(c);
        Assert.True(all - adapter >= 100 * adapter, $"frozen {all - adapter} vs adapter {adapter}: the test needs 100x");

        using (var t = new GrpoTrainer(Grpo(model, "straight", 3), fx.Backend, GrpoTestRuns.Letters)) t.Run();
        var ckpt = RunCheckpoints.Latest(Path.Combine(_dir, "straight"))!;
        var buffer = new FileInfo(Path.Combine(ckpt, BufferFile.Name)).Length;
        long weights = new FileInfo(Path.Combine(ckpt, Checkpoint.SingleFile)).Length, moments = new FileInfo(Path.Combine(ckpt, "optimizer.safetensors")).Length;
        long expected = adapter * 4 + 2 * adapter * 4 + buffer;
        long total = Directory.GetFiles(ckpt).Sum(f => new FileInfo(f).Length);
        Assert.True(Math.Abs(weights + moments + buffer - expected) <= 0.1 * expected, $"weights {weights} + moments {moments} + buffer {buffer} vs {expected}");
        Assert.True(total <= 1.1 * expected, $"the checkpoint holds {total} B; the adapter's masters + moments + buffer are {expected} B (the whole model {all * 4} B)");
        using (var lean = Checkpoint.Open(ckpt))
        {
            Assert.Equal(Path.GetFullPath(model), lean.BaseDirectory);
            Assert.All(lean.OwnNames, n => Assert.StartsWith(VlmWeights.Adapter, n));
        }

        using (var t = new GrpoTrainer(Grpo(model, "resumed", 1), fx.Backend, GrpoTestRuns.Letters)) t.Run();
        using (var t = new GrpoTrainer(Grpo(model, "resumed", 3), fx.Backend, GrpoTestRuns.Letters))
        {
            Assert.Equal(1, t.Step);
            t.Run();
        }
        GrpoStepMetrics[] Read(string name) => File.ReadAllLines(Path.Combine(_dir, name, "metrics.jsonl")).Select(l => JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToArray();
        var (straight, resumed) = (Read("straight"), Read("resumed"));
        Assert.Contains(straight, m => m.Replayed > 0);                   // the buffer came back from buffer.bin and fed a batch
        Assert.Equal(straight.Select(m => (m.Loss, m.Reward, m.GradNorm)), resumed.Select(m => (m.Loss, m.Reward, m.GradNorm)));
        // The final model is the whole model, exported.
        using var final = Checkpoint.Open(Path.Combine(_dir, "straight", "final"));
        Assert.Null(final.BaseDirectory);
        Assert.Equal(VlmWeights.Expected(c).Count(), final.Names.Count());
    }

    [Fact]
    public void ResumingOverAChangedBase_IsRefused_NamingIt()
    {
        var model = WideCheckpoint();                                            // 14.5 MB: a tensor in its middle is far from both ends
        using (var t = new GrpoTrainer(Grpo(model, "run", 1), fx.Backend, GrpoTestRuns.Letters)) t.Run();
        var ckpt = RunCheckpoints.Latest(Path.Combine(_dir, "run"))!;
        Assert.NotNull(Checkpoint.ReadBase(ckpt));
        // Retrain one tensor of the base in place: same names, shapes and header, other weights in the middle of the
        // file, more than a MiB from either end.
        using (var m = VisionLanguageModel.Load(fx.Backend, model, share: false))
        {
            var p = m.Parameters["language_model.model.layers.3.mlp.up_proj.weight"];
            p.Value.CopyFrom(p.Value.ToFloatArray().Select(x => x * 1.5f).ToArray());
            m.Save(model);
        }
        var e = Assert.Throws<CheckpointException>(() => new GrpoTrainer(Grpo(model, "run", 2), fx.Backend, GrpoTestRuns.Letters));
        Assert.Contains(Path.GetFullPath(model), e.Message);
        Assert.Contains("changed since this checkpoint was written", e.Message);
    }

    [Fact]
    public void ResumingWithAnotherTrainableSet_IsRefused_AndABaseCycleIsAnError()
    {
        var (model, _, ckpt) = OneStepRun(seed: 5);
        var e = Assert.Throws<CheckpointException>(() => new GrpoTrainer(Grpo(model, "run", 2, "trainable=adapter+llm"), fx.Backend, GrpoTestRuns.Letters));
        Assert.Contains("same trainable setting", e.Message);
        Checkpoint.WriteBase(ckpt, new Checkpoint.BaseReference(ckpt, Checkpoint.ContentHash(ckpt)));
        Checkpoint.WriteBase(ckpt, new Checkpoint.BaseReference(ckpt, Checkpoint.ContentHash(ckpt))); // names itself, hash and all
        Assert.Throws<CheckpointException>(() => Checkpoint.Open(ckpt));
        File.WriteAllText(Path.Combine(ckpt, Checkpoint.BaseFile), "[1, 2]");
        Assert.Contains("expected an object", Assert.Throws<CheckpointException>(() => Checkpoint.Open(ckpt)).Message);
    }

    [Fact]
    public void Export_RefusesANonEmptyOutput_AndOneHoldingItsSource()
    {
        var (_, run, ckpt) = OneStepRun(seed: 5);
        Assert.Contains("not empty", Assert.Throws<CheckpointException>(() => CheckpointExport.Export(ckpt, run)).Message);
        Assert.True(Directory.Exists(ckpt));
        var empty = Path.Combine(_dir, "empty-out");
        Directory.CreateDirectory(empty);
        CheckpointExport.Export(ckpt, empty);                                    // an empty directory is fine
        Assert.True(File.Exists(Path.Combine(empty, "tokenizer_config.json")));   // from the base: the lean checkpoint has none
    }

    [Fact]
    public void Export_OfALeanCheckpoint_IsTheWholeModelInBf16Shards_WithTheTokenizerAndConfig()
    {
        var (_, run, ckpt) = OneStepRun(seed: 7);
        var outDir = Path.Combine(_dir, "export");
        Assert.Equal(0, ExportCommand.Run(run, outDir));                     // a run directory: its newest checkpoint

        Assert.False(File.Exists(Path.Combine(outDir, Checkpoint.BaseFile)));
        Assert.False(File.Exists(Path.Combine(outDir, "optimizer.safetensors")));
        Assert.Equal(File.ReadAllBytes(Path.Combine(ckpt, "tokenizer.json")), File.ReadAllBytes(Path.Combine(outDir, "tokenizer.json")));
        Assert.True(File.Exists(Path.Combine(outDir, "config.json")));
        using var lean = VisionLanguageModel.Load(fx.Backend, ckpt, share: false);
        using var exported = Checkpoint.Open(outDir);
        Assert.Null(exported.BaseDirectory);
        foreach (var (name, p) in lean.Parameters.All)
        {
            Assert.Equal("BF16", exported.Info(name).DType);
            Assert.Equal(p.Weights.ToFloatArray().Select(BFloat16.Round), exported.Read(name, [.. p.Weights.Shape]));
        }
        // Shards: a small limit gives several files, listed by the index; the model loads from them.
        var sharded = Path.Combine(_dir, "sharded");
        var r = CheckpointExport.Export(ckpt, sharded, "BF16", shardBytes: 20_000);
        Assert.True(r.Shards > 1);
        Assert.True(File.Exists(Path.Combine(sharded, Checkpoint.IndexFile)));
        Assert.All(Directory.GetFiles(sharded, "model-*.safetensors"), f => Assert.Matches(@"model-\d{5}-of-\d{5}\.safetensors$", f));
        using var loaded = VisionLanguageModel.Load(fx.Backend, sharded, share: false);
        Assert.Equal(lean.Parameters.All.Count, loaded.Parameters.All.Count);
    }

    [Fact]
    public void Export_OfAMissingRun_IsAnErrorNamingIt()
    {
        var e = Assert.Throws<DirectoryNotFoundException>(() => ExportCommand.Resolve(Path.Combine(_dir, "nothing")));
        Assert.Contains("nothing", e.Message);
        Directory.CreateDirectory(Path.Combine(_dir, "empty"));
        Assert.Throws<CheckpointException>(() => ExportCommand.Resolve(Path.Combine(_dir, "empty")));
    }

    [Fact]
    public void BufferFile_StoresNoPixels_RoundTrips_AndRefusesAChangedPrompt()
    {
        var pixels = TestData.Uniform(1, 3 * 28 * 28, 1f);
        int[] prompt = [1, 2, 3, 261, 261, 4];
        var rollouts = Enumerable.Range(0, 6).Select(i => new Rollout(i % 2, prompt, pixels, 1, [5 + i, 6, 7], [-0.5f, -1f, -2f + i], 0.25 * i, i - 2.5, i)).ToList();
        var path = Path.Combine(_dir, "buffer.bin");
        BufferFile.Write(path, "data/prompts.jsonl", rollouts);
        long perRollout = 4 + 32 + 4 + 4 + 3 * 4 + 3 * 4 + 8 + 8 + 4;
        Assert.Equal(8 + 4 + "data/prompts.jsonl".Length + 4 + 6 * perRollout, new FileInfo(path).Length); // 9 KB of pixels per rollout are not there
        int built = 0;
        var back = BufferFile.Read(path, "data/prompts.jsonl", row => { built++; return (prompt, pixels, 1); });
        Assert.Equal(2, built);                                                  // each distinct row rebuilt once
        Assert.Equal(rollouts.Select(r => (r.Prompt, r.Tiles, r.Reward, r.Advantage, r.Born)), back.Select(r => (r.Prompt, r.Tiles, r.Reward, r.Advantage, r.Born)));
        Assert.Equal(rollouts.SelectMany(r => r.Response), back.SelectMany(r => r.Response));
        Assert.Equal(rollouts.SelectMany(r => r.OldLogProbs), back.SelectMany(r => r.OldLogProbs));
        Assert.All(back, r => Assert.Same(pixels, r.Pixels));

        var changed = (float[])pixels.Clone();
        changed[100] += 0.01f;
        var e = Assert.Throws<InvalidDataException>(() => BufferFile.Read(path, "data/prompts.jsonl", row => (prompt, row == 1 ? changed : pixels, 1)));
        Assert.Contains("row 1 of data/prompts.jsonl", e.Message);
        File.WriteAllBytes(path, File.ReadAllBytes(path)[..60]);
        Assert.Contains("truncated", Assert.Throws<InvalidDataException>(() => BufferFile.Read(path, "d", _ => (prompt, pixels, 1))).Message);
    }

    /// <summary>
    /// With the adapter alone trainable, a KL reference adds the adapter (its frozen copy) and nothing else to the
    /// device; its log-probs equal those of a privately loaded frozen copy bit for bit.
    /// </summary>
    [Fact]
    public void KlReference_SharesTheFrozenBackbone_AndScoresLikeAPrivateCopy()
    {
        var model = WideCheckpoint();
        var c = VlmConfig.Load(Path.Combine(model, "config.json"));
        long PeakAfterLoading(string kl, string coef)
        {
            using var b = new CpuBackend();
            using var t = new GrpoTrainer(Grpo(model, "kl-" + kl, 1, $"grpo.kl_coef={coef}", $"grpo.kl={kl}"), b, GrpoTestRuns.Letters);
            return b.Memory.PeakBytesInUse;
        }
        long off = PeakAfterLoading("none", "0"), on = PeakAfterLoading("k3", "0.05");
        long adapterBytes = AdapterParameters(c) * 4;
        output.WriteLine($"pool peak after loading: KL off {off:N0} B, KL on {on:N0} B; adapter {adapterBytes:N0} B");
        Assert.True(on - off < 2 * adapterBytes, $"KL on adds {on - off:N0} B over KL off; the adapter is {adapterBytes:N0} B, the model {AllParameters(c) * 4:N0} B");

        using var b = new CpuBackend();
        using var policy = VisionLanguageModel.Load(b, model, TrainableParts.Adapter);
        long before = b.Memory.BytesInUse;
        using var reference = VisionLanguageModel.Load(b, model, TrainableParts.None);
        Assert.True(b.Memory.BytesInUse - before <= adapterBytes * 1.2, $"the reference took {b.Memory.BytesInUse - before:N0} B");
        Assert.Same(policy.Parameters["language_model.model.layers.0.mlp.up_proj.weight"], reference.Parameters["language_model.model.layers.0.mlp.up_proj.weight"]);
        Assert.NotSame(policy.Parameters["mlp1.1.weight"], reference.Parameters["mlp1.1.weight"]);
        // A reward model whose checkpoint holds the same backbone (here an f32 export: another file, the same bytes) references it too.
        var sameBackbone = Path.Combine(_dir, "same-backbone");
        CheckpointExport.Export(model, sameBackbone, "F32");
        using (var rm = RewardModel.Load(b, sameBackbone, TrainableParts.None, trainHead: false))
            Assert.Same(policy.Parameters["language_model.model.layers.1.self_attn.q_proj.weight"], rm.Vlm.Parameters["language_model.model.layers.1.self_attn.q_proj.weight"]);
        using var copy = VisionLanguageModel.Load(b, model, TrainableParts.None, share: false);
        int ctx = reference.ImageContextId;
        int[] ids = [5, 7, ctx - 2, .. Enumerable.Repeat(ctx, c.TokensPerTile), ctx - 1, 11, 12, 13, 14];
        var batch = VlmBatch.Single(ids, TestData.Uniform(9, 3 * c.ForceImageSize * c.ForceImageSize, 1.5f), 1, lossFrom: ids.Length - 3);
        using var a = reference.Forward(batch);
        using var d = copy.Forward(batch);
        Assert.Equal(d.LogProbs, a.LogProbs);
        Assert.Contains(a.LogProbs, x => x != 0);
    }
    /// <summary>
    /// Loading a sharded bf16 checkpoint moves each tensor from the mapped file to the device through one staging
    /// slice: the managed memory the load allocates stays below one tensor's fp32 size, not the model's, and the
    /// values equal a full read of the file.
    /// </summary>
    [Fact]
    public void StreamedLoad_OfShardedBf16_HoldsLessThanOneTensorOnTheHost()
    {
        var model = WideCheckpoint();
        var sharded = Path.Combine(_dir, "bf16-sharded");
        var r = CheckpointExport.Export(model, sharded, "BF16", shardBytes: 2_000_000);
        Assert.True(r.Shards >= 3, $"{r.Shards} shards");
        var c = VlmConfig.Load(Path.Combine(model, "config.json"));
        long largest = VlmWeights.Expected(c).Max(t => t.Shape.Aggregate(1L, (a, d) => a * d)) * 4, all = AllParameters(c) * 4;
        using var b = new CpuBackend();
        using var file = Checkpoint.Open(sharded);
        using (ParameterStore.FromCheckpoint(b, c, file, TrainableParts.Adapter, share: false)) { } // warm: JIT, the staging slice
        long before = GC.GetAllocatedBytesForCurrentThread();
        using var m = ParameterStore.FromCheckpoint(b, c, file, TrainableParts.Adapter, share: false);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        output.WriteLine($"host allocations while loading: {allocated:N0} B; largest tensor {largest:N0} B fp32; model {all:N0} B fp32");
        Assert.True(allocated < largest && allocated < all / 10, $"loading allocated {allocated:N0} B on the host; the largest tensor is {largest:N0} B in fp32, the model {all:N0} B");
        foreach (var (name, p) in m.All.Where((_, i) => i % 5 == 0))
            Assert.Equal(file.Read(name, [.. p.Value.Shape]), p.Value.ToFloatArray());
    }
}
