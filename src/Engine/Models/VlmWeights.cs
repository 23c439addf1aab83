using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Layers;

namespace R1V2.Native.Engine.Models;

/// <summary>Which parts of the VLM train. The paper's best run trains the adapter only.</summary>
public enum TrainableParts { Adapter, AdapterAndLlm, AdapterAndVit, All, None }

/// <summary>
/// The exact Hugging Face tensor names and shapes of an InternVL / Skywork-chat checkpoint for a config: the single
/// list that loading, validation, random initialisation and saving all use.
/// </summary>
public static class VlmWeights
{
    public const string Vit = "vision_model.";
    public const string Adapter = "mlp1.";
    public const string Llm = "language_model.";

    public static IReadOnlyList<(string Name, int[] Shape)> Expected(VlmConfig c)
    {
        var v = c.Vision;
        var l = c.Llm;
        int cv = v.HiddenSize, p = v.PatchSize, shuffled = cv * (int)Math.Round(1 / (c.DownsampleRatio * c.DownsampleRatio));
        var list = new List<(string, int[])>
        {
            ("vision_model.embeddings.class_embedding", [1, 1, cv]),
            ("vision_model.embeddings.patch_embedding.weight", [cv, 3, p, p]),
            ("vision_model.embeddings.patch_embedding.bias", [cv]),
            ("vision_model.embeddings.position_embedding", [1, 1 + v.NumPatches, cv]),
        };
        bool ln = v.NormType == VisionNorm.LayerNorm;
        for (int i = 0; i < v.NumLayers; i++)
        {
            var pre = $"vision_model.encoder.layers.{i}.";
            list.Add((pre + "norm1.weight", [cv]));
            if (ln) list.Add((pre + "norm1.bias", [cv]));
            list.Add((pre + "norm2.weight", [cv]));
            if (ln) list.Add((pre + "norm2.bias", [cv]));
            list.Add((pre + "ls1", [cv]));
            list.Add((pre + "ls2", [cv]));
            list.Add((pre + "attn.qkv.weight", [3 * cv, cv]));
            if (v.QkvBias) list.Add((pre + "attn.qkv.bias", [3 * cv]));
            if (v.QkNormalization)
            {
                list.Add((pre + "attn.q_norm.weight", [cv]));
                list.Add((pre + "attn.k_norm.weight", [cv]));
            }
            list.Add((pre + "attn.proj.weight", [cv, cv]));
            list.Add((pre + "attn.proj.bias", [cv]));
            list.Add((pre + "mlp.fc1.weight", [v.IntermediateSize, cv]));
            list.Add((pre + "mlp.fc1.bias", [v.IntermediateSize]));
            list.Add((pre + "mlp.fc2.weight", [cv, v.IntermediateSize]));
            list.Add((pre + "mlp.fc2.bias", [cv]));
        }
        list.Add(("mlp1.0.weight", [shuffled]));
        list.Add(("mlp1.0.bias", [shuffled]));
        list.Add(("mlp1.1.weight", [l.HiddenSize, shuffled]));
        list.Add(("mlp1.1.bias", [l.HiddenSize]));
        list.Add(("mlp1.3.weight", [l.HiddenSize, l.HiddenSize]));
        list.Add(("mlp1.3.bias", [l.HiddenSize]));

        int d = l.HiddenSize, hd = l.HeadDim;
        list.Add(("language_model.model.embed_tokens.weight", [l.VocabSize, d]));
        for (int i = 0; i < l.NumLayers; i++)
        {
            var pre = $"language_model.model.layers.{i}.";
            list.Add((pre + "input_layernorm.weight", [d]));
            list.Add((pre + "self_attn.q_proj.weight", [l.NumHeads * hd, d]));
            list.Add((pre + "self_attn.q_proj.bias", [l.NumHeads * hd]));
            list.Add((pre + "self_attn.k_proj.weight", [l.NumKvHeads * hd, d]));
            list.Add((pre + "self_attn.k_proj.bias", [l.NumKvHeads * hd]));
            list.Add((pre + "self_attn.v_proj.weight", [l.NumKvHeads * hd, d]));
            list.Add((pre + "self_attn.v_proj.bias", [l.NumKvHeads * hd]));
            list.Add((pre + "self_attn.o_proj.weight", [d, l.NumHeads * hd]));
            list.Add((pre + "post_attention_layernorm.weight", [d]));
            list.Add((pre + "mlp.gate_proj.weight", [l.IntermediateSize, d]));
            list.Add((pre + "mlp.up_proj.weight", [l.IntermediateSize, d]));
            list.Add((pre + "mlp.down_proj.weight", [d, l.IntermediateSize]));
        }
        list.Add(("language_model.model.norm.weight", [d]));
        if (!l.TieWordEmbeddings) list.Add(("language_model.lm_head.weight", [l.VocabSize, d]));
        return list;
    }

    public static long ParameterCount(VlmConfig c) => Expected(c).Sum(t => t.Shape.Aggregate(1L, (a, x) => a * x));

    public static bool IsTrainable(string name, TrainableParts parts) => parts switch
    {
        TrainableParts.None => false,
        TrainableParts.All => true,
        TrainableParts.Adapter => name.StartsWith(Adapter, StringComparison.Ordinal),
        TrainableParts.AdapterAndLlm => name.StartsWith(Adapter, StringComparison.Ordinal) || name.StartsWith(Llm, StringComparison.Ordinal),
        TrainableParts.AdapterAndVit => name.StartsWith(Adapter, StringComparison.Ordinal) || name.StartsWith(Vit, StringComparison.Ordinal),
        _ => throw new ArgumentOutOfRangeException(nameof(parts)),
    };

    /// <summary>
    /// Random initial values in the HF conventions: norm weights 1, biases 0, LayerScale = initializer_factor,
    /// everything else normal(0, 0.02); reproducible from the seed and the tensor's name.
    /// </summary>
    public static float[] RandomInit(VlmConfig c, string name, int[] shape, int seed)
    {
        int n = shape.Aggregate(1, (a, x) => a * x);
        var values = new float[n];
        bool isNormWeight = name.EndsWith("norm1.weight") || name.EndsWith("norm2.weight") || name.EndsWith("_norm.weight")
            || name.EndsWith("layernorm.weight") || name == "language_model.model.norm.weight" || name == "mlp1.0.weight";
        if (isNormWeight) { Array.Fill(values, 1f); return values; }
        if (name.EndsWith(".bias")) return values;
        if (name.EndsWith(".ls1") || name.EndsWith(".ls2")) { Array.Fill(values, c.Vision.InitialLayerScale); return values; }
        var rng = new Random(Seeds.ForRandom(seed, Seeds.Hash(name)));
        for (int i = 0; i < n; i += 2)
        {
            // Box-Muller: two normals per pair of uniforms.
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            double r = Math.Sqrt(-2 * Math.Log(u1)) * 0.02;
            values[i] = (float)(r * Math.Cos(2 * Math.PI * u2));
            if (i + 1 < n) values[i + 1] = (float)(r * Math.Sin(2 * Math.PI * u2));
        }
        return values;
    }
}

/// <summary>
/// The model's parameters by HF name, created from a checkpoint or a random initialisation. From a checkpoint, frozen
/// parameters come from the backend's <see cref="SharedFrozenParameters"/>: a second model over the same files (a KL
/// reference) references them instead of copying them.
/// </summary>
public sealed class ParameterStore : IDisposable
{
    private readonly Dictionary<string, Parameter> _byName = new(StringComparer.Ordinal);
    private readonly List<(string Name, Parameter Parameter)> _ordered = [];
    private readonly SharedFrozenParameters? _shared;

    /// <param name="values">A tensor's whole values by name and whole shape.</param>
    /// <param name="tensorParallel">Each rank keeps its slice of the decoder's cut tensors (<see cref="TensorParallel"/>).</param>
    public ParameterStore(Backend backend, VlmConfig config, TrainableParts trainable, Func<string, int[], float[]> values, TensorParallel? tensorParallel = null)
        : this(backend, config, trainable, (name, shape, isTrainable) =>
        {
            var tp = tensorParallel ?? TensorParallel.None;
            return Parameter.Create(backend, name, tp.LocalShape(name, shape), tp.Slice(name, shape, values(name, shape)), isTrainable);
        }, null, tensorParallel)
    {
    }

    private ParameterStore(Backend backend, VlmConfig config, TrainableParts trainable, Func<string, int[], bool, Parameter> create, SharedFrozenParameters? shared,
        TensorParallel? tensorParallel = null)
    {
        _shared = shared;
        TensorParallel = tensorParallel ?? TensorParallel.None;
        TensorParallel.Check(config.Llm);
        try
        {
            foreach (var (name, shape) in VlmWeights.Expected(config))
            {
                var p = create(name, shape, VlmWeights.IsTrainable(name, trainable));
                _byName[name] = p;
                _ordered.Add((name, p));
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>
    /// Parameters from a checkpoint, one tensor at a time (its values pass through the host once; the peak is about
    /// one tensor). Frozen ones are shared through the backend's <see cref="Backend.Frozen"/> unless <paramref name="share"/> is false.
    /// </summary>
    /// <param name="tensorParallel">Each rank reads its slice of the decoder's cut tensors: the whole tensor passes
    /// through the host once (the peak is about one tensor), the slice goes to the device; nothing is shared then.</param>
    public static ParameterStore FromCheckpoint(Backend backend, VlmConfig config, Checkpoint checkpoint, TrainableParts trainable,
        IReadOnlyDictionary<string, int[]>? optional = null, bool share = true, TensorParallel? tensorParallel = null)
    {
        CheckLayerCounts(config, checkpoint);
        checkpoint.Validate(VlmWeights.Expected(config).ToDictionary(t => t.Name, t => t.Shape), optional);
        if (tensorParallel is { Size: > 1 } tp)
            return new ParameterStore(backend, config, trainable, (name, shape, isTrainable) =>
                Parameter.Create(backend, name, tp.LocalShape(name, shape), tp.Slice(name, shape, checkpoint.Read(name, shape)), isTrainable), null, tp);
        var shared = share ? backend.Frozen : null;
        return new ParameterStore(backend, config, trainable, (name, shape, isTrainable) =>
        {
            Parameter Create() => Parameter.Load(backend, name, shape, t => checkpoint.ReadInto(name, shape, t), isTrainable);
            return isTrainable || shared is null ? Create() : shared.Acquire(checkpoint.ContentKey(name), Create);
        }, shared);
    }

    /// <summary>
    /// config.json's layer counts against the layers the checkpoint holds, before anything proportional to them is
    /// enumerated or allocated (a count of 10^9 would otherwise list 10^10 expected tensors first).
    /// </summary>
    private static void CheckLayerCounts(VlmConfig config, Checkpoint checkpoint)
    {
        foreach (var (prefix, layers, key) in new[] { (VlmWeights.Llm + "model.layers.", config.Llm.NumLayers, "llm_config.num_hidden_layers"),
                     (VlmWeights.Vit + "encoder.layers.", config.Vision.NumLayers, "vision_config.num_hidden_layers") })
        {
            int held = checkpoint.Names.Where(n => n.StartsWith(prefix, StringComparison.Ordinal))
                .Select(n => int.TryParse(n.AsSpan(prefix.Length, Math.Max(0, n.IndexOf('.', prefix.Length) - prefix.Length)), out int i) ? i + 1 : 0)
                .DefaultIfEmpty(0).Max();
            if (layers > held)
                throw new CheckpointException($"{checkpoint.Directory}: config.json's {key} is {layers} but the checkpoint holds {held} such layers ({prefix}0 to {prefix}{held - 1}); expected a tensor '{prefix}{held}.*'");
        }
    }

    /// <summary>How the decoder's tensors are cut over ranks (<see cref="TensorParallel.None"/>: whole).</summary>
    public TensorParallel TensorParallel { get; }

    public Parameter this[string name] => _byName.TryGetValue(name, out var p) ? p : throw new KeyNotFoundException($"no parameter '{name}'");
    public Parameter? Find(string name) => _byName.GetValueOrDefault(name);
    public IReadOnlyList<(string Name, Parameter Parameter)> All => _ordered;
    public IEnumerable<Parameter> Trainable => _ordered.Select(p => p.Parameter).Where(p => p.Trainable);

    public void Dispose()
    {
        foreach (var (_, p) in _ordered)
            if (_shared is not null && _shared.Holds(p)) _shared.Release(p);
            else p.Dispose();
        _ordered.Clear();
    }
}
