using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>Config parsing, checkpoint round trips, activation checkpointing and trainable-part selection.</summary>
[Collection("cpu")]
public sealed class VlmModelTests(CpuFixture fx) : IDisposable
{
    private readonly Backend _b = fx.Backend;
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-vlm-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string Fixture(string v) => VlmParityTests.FixtureDir(v);

    private static VlmBatch FixtureBatch(string variant)
    {
        var dir = Fixture(variant);
        var inputs = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "inputs.json")))!.AsObject();
        int[] Ints(string k) => inputs[k]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        using var expected = SafetensorsFile.Open(Path.Combine(dir, "expected.safetensors"));
        return new VlmBatch(Ints("input_ids"), Ints("targets"), Ints("cu_seqlens"), expected.ReadFloats("pixel_values"), 3);
    }

    [Fact]
    public void Config_BothInternVitStyles_ComeFromTheConfigAlone()
    {
        var six = VlmConfig.Load(Path.Combine(Fixture("internvit6b"), "config.json"));
        Assert.Equal(VisionNorm.RmsNorm, six.Vision.NormType);
        Assert.True(six.Vision.QkNormalization);
        Assert.False(six.Vision.QkvBias);
        Assert.Equal(4, six.TokensPerTile);
        var small = VlmConfig.Load(Path.Combine(Fixture("internvit300m"), "config.json"));
        Assert.Equal(VisionNorm.LayerNorm, small.Vision.NormType);
        Assert.True(small.Vision.QkvBias);
        Assert.True(small.Llm.TieWordEmbeddings);
        Assert.Equal("v1", small.PsVersion);
    }

    [Theory]
    [InlineData("llm_config.num_key_value_heads", null, "required field 'llm_config.num_key_value_heads' is missing")]
    [InlineData("vision_config.hidden_size", "\"wide\"", "field 'vision_config.hidden_size' is invalid: \"wide\" (expected an integer)")]
    [InlineData("vision_config.norm_type", "\"batch_norm\"", "field 'vision_config.norm_type' is invalid: 'batch_norm'")]
    [InlineData("llm_config.num_key_value_heads", "3", "3 does not divide num_attention_heads 4")]
    [InlineData("ps_version", "\"v3\"", "field 'ps_version' is invalid")]
    public void Config_MissingOrInvalidField_IsAnErrorNamingIt(string field, string? value, string message)
    {
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixture("internvit6b"), "config.json")))!.AsObject();
        var parts = field.Split('.');
        var obj = parts.Length == 2 ? root[parts[0]]!.AsObject() : root;
        if (value is null) obj.Remove(parts[^1]); else obj[parts[^1]] = JsonNode.Parse(value);
        var path = Path.Combine(_dir, "config.json");
        File.WriteAllText(path, root.ToJsonString());
        var e = Assert.Throws<InvalidDataException>(() => VlmConfig.Load(path));
        Assert.Contains(message, e.Message);
        Assert.StartsWith(path, e.Message);
    }

    [Fact]
    public void Checkpoint_LoadSaveLoad_IsExact_AndConfigRoundTrips()
    {
        using var model = VisionLanguageModel.Load(_b, Fixture("internvit6b"));
        model.Save(_dir, maxShardBytes: 100_000); // sharded
        File.Copy(Path.Combine(Fixture("internvit6b"), "tokenizer.json"), Path.Combine(_dir, "tokenizer.json"));
        Assert.True(File.Exists(Path.Combine(_dir, Checkpoint.IndexFile)));
        using var again = VisionLanguageModel.Load(_b, _dir);
        Assert.Equal(model.Config, again.Config with { });
        foreach (var (name, p) in model.Parameters.All)
            Assert.Equal(p.Weights.ToFloatArray(), again.Parameters[name].Weights.ToFloatArray());
    }

    [Fact]
    public void Load_WithAMismatchedCheckpoint_ListsTheProblems()
    {
        foreach (var f in new[] { "config.json", "tokenizer.json" }) File.Copy(Path.Combine(Fixture("internvit6b"), f), Path.Combine(_dir, f));
        using (var st = SafetensorsFile.Open(Path.Combine(Fixture("internvit6b"), "model.safetensors")))
            SafetensorsFile.Write(Path.Combine(_dir, "model.safetensors"),
                st.Tensors.Keys.Where(n => n != "mlp1.1.bias").Select(n => (n == "mlp1.3.weight" ? "mlp1.3.extra" : n, st.Info(n).Shape.Select(d => (int)d).ToArray(), st.ReadFloats(n))));
        var e = Assert.Throws<CheckpointException>(() => VisionLanguageModel.Load(_b, _dir));
        Assert.Contains("missing tensor 'mlp1.1.bias'", e.Message);
        Assert.Contains("missing tensor 'mlp1.3.weight'", e.Message);
        Assert.Contains("unexpected tensor 'mlp1.3.extra'", e.Message);
    }

    [Fact]
    public void ImageTokenCountMismatch_IsAClearError()
    {
        using var model = VisionLanguageModel.Load(_b, Fixture("internvit6b"));
        var batch = FixtureBatch("internvit6b") with { Tiles = 2 };
        var e = Assert.Throws<ArgumentException>(() => model.Forward(batch));
        Assert.Equal("the batch has 12 <IMG_CONTEXT> tokens but 2 image tiles x 4 tokens per tile = 8 image features", e.Message);
    }

    [Fact]
    public void ActivationCheckpointing_GivesTheSameGradients()
    {
        var batch = FixtureBatch("internvit300m");
        float[][] Grads(bool checkpoint)
        {
            using var model = VisionLanguageModel.Load(_b, Fixture("internvit300m"), TrainableParts.All);
            model.CheckpointVit = checkpoint;
            model.CheckpointLlm = checkpoint;
            using var pass = model.Forward(batch);
            model.Backward(pass);
            return model.Parameters.All.Select(p => p.Parameter.Grad!.ToFloatArray()).ToArray();
        }
        var plain = Grads(false);
        var recomputed = Grads(true);
        for (int i = 0; i < plain.Length; i++) Assert.Equal(plain[i], recomputed[i]); // recomputation is bit-identical on the CPU
    }

    [Fact]
    public void AdapterOnly_GetsTheSameAdapterGradients_AndFrozenPartsGetNone()
    {
        var batch = FixtureBatch("internvit6b");
        using var all = VisionLanguageModel.Load(_b, Fixture("internvit6b"), TrainableParts.All);
        using (var pass = all.Forward(batch)) all.Backward(pass);
        using var adapter = VisionLanguageModel.Load(_b, Fixture("internvit6b"), TrainableParts.Adapter);
        using (var pass = adapter.Forward(batch)) adapter.Backward(pass);
        foreach (var (name, p) in adapter.Parameters.All)
        {
            if (name.StartsWith("mlp1.")) Assert.Equal(all.Parameters[name].Grad!.ToFloatArray(), p.Grad!.ToFloatArray());
            else Assert.Null(p.Grad);
        }
        Assert.Equal(6, adapter.Parameters.Trainable.Count());
        using var opt = new R1V2.Native.Trainer.Optim.AdamWOptimizer(_b, adapter.Parameters.Trainable, new AdamWSettings(1e-3f));
        var before = adapter.Parameters["vision_model.encoder.layers.0.attn.qkv.weight"].Weights.ToFloatArray();
        opt.Step(1e-3f);
        Assert.Equal(before, adapter.Parameters["vision_model.encoder.layers.0.attn.qkv.weight"].Weights.ToFloatArray());
    }

    [Theory]
    [InlineData(TrainableParts.AdapterAndVit, "vision_model.", "language_model.")]
    [InlineData(TrainableParts.AdapterAndLlm, "language_model.", "vision_model.")]
    public void TrainableSelection_MatchesTheFullGradientsOnItsParts(TrainableParts parts, string trained, string frozen)
    {
        var batch = FixtureBatch("internvit300m");
        using var all = VisionLanguageModel.Load(_b, Fixture("internvit300m"), TrainableParts.All);
        using (var pass = all.Forward(batch)) all.Backward(pass);
        using var some = VisionLanguageModel.Load(_b, Fixture("internvit300m"), parts);
        using (var pass = some.Forward(batch)) some.Backward(pass);
        foreach (var (name, p) in some.Parameters.All)
        {
            if (name.StartsWith(trained) || name.StartsWith("mlp1.")) Assert.Equal(all.Parameters[name].Grad!.ToFloatArray(), p.Grad!.ToFloatArray());
            if (name.StartsWith(frozen)) Assert.Null(p.Grad);
        }
    }
    [Theory]
    [InlineData(TrainableParts.AdapterAndLlm)]
    [InlineData(TrainableParts.All)]
    public void SequencesSharingAnImage_PackItOnce_WithTheSameLogProbsAndGradients(TrainableParts parts)
    {
        // The fixture's first sequence four times over, as a GRPO group: once sharing one pixel array, once with copies.
        var fixture = FixtureBatch("internvit300m");
        using var model = VisionLanguageModel.Load(_b, Fixture("internvit300m"), parts);
        int end = fixture.CuSeqlens[1], split = end - 3;
        var ids = fixture.InputIds[..end];
        int tiles = ids.Count(t => t == model.ImageContextId) / model.Config.TokensPerTile;
        var pixels = fixture.Pixels![..(tiles * 3 * model.Config.ForceImageSize * model.Config.ForceImageSize)];
        var (shared, _) = VlmBatch.Pack([.. Enumerable.Range(0, 4).Select(_ => (ids[..split], ids[split..], (float[]?)pixels, tiles))], model.ImageContextId);
        var (copied, _) = VlmBatch.Pack([.. Enumerable.Range(0, 4).Select(_ => (ids[..split], ids[split..], (float[]?)pixels.ToArray(), tiles))], model.ImageContextId);
        Assert.Equal(pixels.Length, shared.Pixels!.Length);
        Assert.Equal(Enumerable.Repeat(Enumerable.Range(0, tiles), 4).SelectMany(x => x), shared.TileSources!);
        Assert.Null(copied.TileSources);
        Assert.Equal(4 * pixels.Length, copied.Pixels!.Length);

        (float[] LogProbs, float[][] Grads) Run(VlmBatch batch)
        {
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            using var pass = model.Forward(batch);
            model.Backward(pass);
            return (pass.LogProbs, [.. model.Parameters.Trainable.Select(p => p.Grad!.ToFloatArray())]);
        }
        var a = Run(shared);
        var b = Run(copied);
        Assert.Equal(b.LogProbs, a.LogProbs); // a tile's encoding depends on that tile alone: bit-identical on the CPU
        for (int i = 0; i < a.Grads.Length; i++) Assert.Equal(b.Grads[i], a.Grads[i]);
        Assert.Contains(a.LogProbs, x => x != 0);
    }
    /// <summary>
    /// Seven sequences for the digits-tiny model: three share prompt A and its image (one through copied arrays), two
    /// share the text-only prompt B, and two prompts end in image tokens (never shared) with images of their own.
    /// </summary>
    internal static List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)> SharingSequences(VlmConfig config, int imageContextId)
    {
        int img = imageContextId, perTile = config.TokensPerTile, side = config.ForceImageSize;
        var rng = new Random(7);
        float[] Image() => Enumerable.Range(0, 3 * side * side).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        int[] Text(int n) => Enumerable.Range(0, n).Select(_ => rng.Next(3, 200)).ToArray();
        var image = Image();
        int[] promptA = [.. Text(3), .. Enumerable.Repeat(img, perTile), .. Text(4)];
        int[] promptB = Text(5);
        int[] endsInImage = [.. Text(2), .. Enumerable.Repeat(img, perTile)]; // its last prompt row is an image row: not shared
        return
        [
            (promptA, Text(6), image, 1),
            (promptB, Text(3), null, 0),
            (promptA, Text(2), image, 1),
            ([.. promptA], Text(5), image.ToArray(), 1), // equal contents in other arrays share too
            (promptB, Text(4), null, 0),
            (endsInImage, Text(3), Image(), 1),
            (endsInImage, Text(2), Image(), 1),          // the same tokens with another image: its own prompt
        ];
    }

    [Theory]
    [InlineData(TrainableParts.AdapterAndLlm, false)]
    [InlineData(TrainableParts.All, false)]
    [InlineData(TrainableParts.AdapterAndLlm, true)] // activation checkpointing recomputes each layer through the shared rows
    public void SequencesSharingAPrompt_ComputeItsRowsOnce_WithTheLogProbsAndGradientsOfPackingEachCopy(TrainableParts parts, bool checkpoint)
    {
        ModelFactory.Init(Path.Combine(AppContext.BaseDirectory, "configs", "digits-tiny.json"), _dir, seed: 3);
        using var model = VisionLanguageModel.Load(_b, _dir, parts);
        model.CheckpointLlm = checkpoint;
        int img = model.ImageContextId;
        var sequences = SharingSequences(model.Config, img);
        int[] promptA = sequences[0].Prompt, promptB = sequences[1].Prompt;
        var (plain, plainStarts) = VlmBatch.Pack(sequences, img);
        var (shared, sharedStarts) = VlmBatch.PackShared(sequences, img);
        Assert.Null(plain.ExpandRows);
        Assert.Equal(plain.CuSeqlens, shared.CuSeqlens);                 // the same attention layout
        Assert.Equal(plain.InputIds.Length, shared.ExpandRows!.Length);
        Assert.Equal(plain.InputIds.Length - 2 * (promptA.Length - 1) - (promptB.Length - 1), shared.InputIds.Length);
        Assert.Equal(3, shared.Tiles);                                   // promptA's image once, then each endsInImage image
        Assert.Equal(plain.InputIds, shared.ExpandRows.Select(r => shared.InputIds[r]));
        Assert.Equal(plain.CuSeqlens.SkipLast(1).SelectMany((c, i) => Enumerable.Range(0, plain.CuSeqlens[i + 1] - c)), shared.ExpandRows.Select(r => shared.Positions![r]));

        (float[] LogProbs, double Loss, float[][] Grads) Run(VlmBatch batch)
        {
            foreach (var p in model.Parameters.Trainable) p.ZeroGrad();
            using var pass = model.Forward(batch);
            model.Backward(pass);
            return (pass.LogProbs, pass.Loss, [.. model.Parameters.Trainable.Select(p => p.Grad!.ToFloatArray())]);
        }
        var a = Run(plain);
        var b = Run(shared);
        Assert.Equal(a.Loss, b.Loss, 1e-6);
        for (int i = 0; i < sequences.Count; i++)
        {
            int n = sequences[i].Response.Length;
            Check.Close(a.LogProbs[plainStarts[i]..(plainStarts[i] + n)], b.LogProbs[sharedStarts[i]..(sharedStarts[i] + n)], 1e-6, 1e-6, $"sequence {i} log-probs");
        }
        for (int i = 0; i < a.Grads.Length; i++) Check.Close(a.Grads[i], b.Grads[i], 1e-6, 1e-4, $"gradient of {model.Parameters.Trainable.ElementAt(i).Name}");
        Assert.Contains(b.Grads, g => g.Any(x => x != 0));
        // Nothing to share: the plain packing.
        var (single, _) = VlmBatch.PackShared([sequences[0], sequences[1]], img);
        Assert.Null(single.ExpandRows);
    }
}
