using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Grpo;
using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Parallel;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Ranks;

/// <summary>What a scenario reports: loss, gradient norm, clipped share, the weights after the step and their hash.</summary>
public sealed record StepResult(double Loss, double GradNorm, double ClippedFraction, long Tokens, int LocalTokens, float[] Weights, string Hash)
{
    /// <summary>Gradient buckets whose sum began during backward (data parallel).</summary>
    public int EarlyBuckets { get; init; }
}

/// <summary>
/// Scenarios the multi-rank tests run on every rank and in one process, so the two can be compared: the same global
/// batch, made from the same seed on every rank, each rank training on its share.
/// </summary>
public static class Scenarios
{
    /// <summary>Gradient buckets of 4096 values: the tiny VLM's gradients make several, so some start during backward.</summary>
    public const int SmallBuckets = 4096;

    public sealed record Options(int Rollouts, string Aggregation, int Minibatches, int GradAccum)
    {
        public static Options Parse(string[] args)
        {
            var o = new Options(8, "token_mean", 2, 2);
            for (int i = 0; i + 1 < args.Length; i += 2)
                o = args[i] switch
                {
                    "--rollouts" => o with { Rollouts = int.Parse(args[i + 1]) },
                    "--aggregation" => o with { Aggregation = args[i + 1] },
                    "--minibatches" => o with { Minibatches = int.Parse(args[i + 1]) },
                    "--grad-accum" => o with { GradAccum = int.Parse(args[i + 1]) },
                    _ => throw new ArgumentException($"unknown option {args[i]}"),
                };
            return o;
        }
    }

    /// <summary>
    /// <paramref name="count"/> fixed rollouts for the tiny VLM: groups of 4 text prompts, responses of 3 to 17 tokens (so
    /// the ranks' token counts differ), old log-probs far from the policy's (so the PPO clip is active) and advantages of
    /// both signs. The same on every rank.
    /// </summary>
    public static List<Rollout> FixedRollouts(int vocab, int count)
    {
        var rng = new Random(20261202);
        var list = new List<Rollout>();
        for (int i = 0; i < count; i++)
        {
            int group = i / 4;
            var prompt = Enumerable.Range(0, 5 + group % 3).Select(k => 1 + (group * 7 + k * 3) % (vocab - 1)).ToArray();
            int length = 3 + rng.Next(15);
            var response = Enumerable.Range(0, length).Select(_ => 1 + rng.Next(vocab - 1)).ToArray();
            var old = Enumerable.Range(0, length).Select(_ => (float)(-Math.Log(vocab) + (rng.NextDouble() - 0.5) * 1.5)).ToArray();
            double advantage = (i % 4) switch { 0 => 1.2, 1 => -0.7, 2 => 0.4, _ => -0.9 };
            list.Add(new Rollout(group, prompt, null, 0, response, old, 0, advantage, 0));
        }
        return list;
    }

    /// <summary>
    /// One GRPO policy step (minibatches micro-batches, grad_accum of them per optimiser step) on this rank's share of
    /// the fixed rollouts (rollout i on rank i mod R), through the trainer's <see cref="GrpoPolicyStep"/>.
    /// </summary>
    public static StepResult GrpoStep(string model, DataParallel dp, Options o)
    {
        using var backend = new CpuBackend();
        using var vlm = VisionLanguageModel.Load(backend, model, TrainableParts.All);
        dp.SyncWeights([.. vlm.Parameters.All.Select(p => p.Parameter)]);
        vlm.GradientReady = dp.GradientReady;
        var trainable = vlm.Parameters.Trainable.ToList();
        using var opt = new AdamWOptimizer(backend, trainable, new AdamWSettings(1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f), maxGradNorm: 0.5, dp);
        var aggregation = o.Aggregation == "token_mean" ? LossAggregation.TokenMean : LossAggregation.SequenceMeanTokenMean;
        var update = new GrpoUpdate(vlm, new GrpoLossSettings(0.2f, 0.28f), aggregation, vocabChunk: 64);
        var mine = dp.Shard(FixedRollouts(vlm.Config.Llm.VocabSize, o.Rollouts), "rollouts");
        var step = new GrpoPolicyStep(update, aggregation, o.Minibatches, o.GradAccum, dp);
        var r = step.Run(mine, [], null, opt, () => opt.Step(1e-3f));
        dp.CheckSameWeights(trainable, "after the step");
        var weights = trainable.SelectMany(p => p.Weights.ToFloatArray()).ToArray();
        return new StepResult(r.Loss, r.GradNorm, r.ClippedFraction, r.Tokens, mine.Sum(x => x.Response.Length), weights, DataParallel.WeightsHash(trainable).ToString("x32"))
            { EarlyBuckets = dp.BucketsStartedInBackward };
    }

    /// <summary>
    /// One supervised step of a model config (random weights, 2 sequences of 96 tokens with a tile each, the LLM and
    /// adapter trainable) on this rank: its measured pool peak and <see cref="StepCost"/>'s plan for this layout.
    /// </summary>
    public static R1V2.Native.Trainer.Bench.StepTiming StepMemory(string config, DataParallel dp, bool shardOptimizer)
    {
        using var backend = new CpuBackend();
        return R1V2.Native.Trainer.Bench.StepBenchmark.Run(backend, VlmConfig.Load(config), Path.GetFileNameWithoutExtension(config), StepShape.Uniform(2, 96, 1),
            TrainableParts.AdapterAndLlm, steps: 1, peakFlops: null, stage: R1V2.Native.Trainer.Bench.BenchStage.Sft, dataParallel: dp, shardOptimizer: shardOptimizer);
    }

    /// <summary>What the tensor-parallel scenario compares with one process, every tensor whole (gathered over the group).</summary>
    public sealed record TensorParallelResult(float[] Logits, double Loss, Dictionary<string, float[]> Gradients, double GrpoLoss, Dictionary<string, float[]> GrpoGradients,
        int[][] Generated, double StepLoss, double StepGradNorm, float[] Weights)
    {
        /// <summary>The vocabulary rows of this rank's LM head and its MLP columns: what it holds of the cut tensors.</summary>
        public int LocalHeadRows { get; init; }
        public int LocalMlpColumns { get; init; }
    }

    /// <summary>
    /// The tiny VLM cut over tensor-parallel groups of <paramref name="tensorParallel"/> ranks (the world's other
    /// dimension data parallel): logits, loss and every gradient of a teacher-forced pass over fixed rollouts (one
    /// with an image), the fused GRPO loss and its gradients, a greedy generation, then one GRPO optimiser step on each
    /// data-parallel rank's share of the rollouts. Everything comes back whole.
    /// </summary>
    public static TensorParallelResult TensorParallelStep(string model, ICollectives world, int tensorParallel, Options o)
    {
        var tpGroup = world.Split(world.Rank / tensorParallel, world.Rank);
        var dpGroup = world.Split(world.Rank % tensorParallel, world.Rank);
        var tp = new TensorParallel(tpGroup);
        var dp = new DataParallel(dpGroup);
        using var backend = new CpuBackend();
        using var vlm = VisionLanguageModel.Load(backend, model, TrainableParts.All, tensorParallel: tp);
        var shapes = VlmWeights.Expected(vlm.Config).ToDictionary(x => x.Name, x => x.Shape);
        var trainable = vlm.Parameters.All.Where(p => p.Parameter.Trainable).ToList();
        Dictionary<string, float[]> Gradients() => trainable.ToDictionary(p => p.Name, p => tp.Gather(p.Name, shapes[p.Name], p.Parameter.Grad!.ToFloatArray()));

        // Fixed rollouts; the first has an image (4 <IMG_CONTEXT> tokens, one 28 x 28 tile).
        var rollouts = FixedRollouts(vlm.Config.Llm.VocabSize, o.Rollouts);
        int perTile = vlm.Config.TokensPerTile, tile = 3 * vlm.Config.ForceImageSize * vlm.Config.ForceImageSize;
        var rng = new Random(7);
        var pixels = Enumerable.Range(0, tile).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        rollouts[0] = rollouts[0] with { PromptIds = [3, .. Enumerable.Repeat(vlm.ImageContextId, perTile), 5, 9], Pixels = pixels, Tiles = 1 };

        var (batch, _) = Rollout.Pack(rollouts, vlm.ImageContextId);
        foreach (var (_, p) in vlm.Parameters.All) p.ZeroGrad();
        float[] logits;
        double loss;
        using (var pass = vlm.Forward(batch))
        {
            logits = vlm.FullLogits(pass);
            loss = pass.Loss;
            vlm.Backward(pass);
        }
        var gradients = Gradients();

        foreach (var (_, p) in vlm.Parameters.All) p.ZeroGrad();
        var aggregation = o.Aggregation == "token_mean" ? LossAggregation.TokenMean : LossAggregation.SequenceMeanTokenMean;
        var update = new GrpoUpdate(vlm, new GrpoLossSettings(0.2f, 0.28f), aggregation, vocabChunk: 64);
        double grpoLoss = update.Accumulate(rollouts).Loss;
        var grpoGradients = Gradients();

        var generated = new Generator(vlm, null, new GeneratorOptions(CacheBlocks: 64, MaxBatch: 4)).Generate(
            [new GenerationRequest([1, 2, 3, 4], MaxNewTokens: 6), new GenerationRequest(rollouts[0].PromptIds, pixels, 1, MaxNewTokens: 6)])
            .OrderBy(g => g.Request).Select(g => g.Tokens).ToArray();

        dp.SyncWeights([.. vlm.Parameters.All.Select(p => p.Parameter)]);
        var parameters = trainable.Select(p => p.Parameter).ToList();
        using var opt = new AdamWOptimizer(backend, parameters, new AdamWSettings(1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f), maxGradNorm: 0.5, dp, tensorParallel: tp);
        vlm.GradientReady = dp.GradientReady;
        var step = new GrpoPolicyStep(update, aggregation, o.Minibatches, o.GradAccum, dp);
        var r = step.Run(dp.Shard(rollouts, "rollouts"), [], null, opt, () => opt.Step(1e-3f));
        var weights = trainable.SelectMany(p => tp.Gather(p.Name, shapes[p.Name], p.Parameter.Weights.ToFloatArray())).ToArray();
        return new TensorParallelResult(logits, loss, gradients, grpoLoss, grpoGradients, generated, r.Loss, r.GradNorm, weights)
        {
            LocalHeadRows = vlm.LmHead.Value.Dim(0),
            LocalMlpColumns = vlm.Parameters["language_model.model.layers.0.mlp.gate_proj.weight"].Value.Dim(0),
        };
    }
}
