using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>
/// A reward model: the VLM with its LM head unused and a scalar head on the final hidden state of each sequence's last
/// token: score = value_head.weight [1, D] . h + value_head.bias [1]. The head is stored in the checkpoint beside the
/// VLM's tensors under those names; a checkpoint without them (a policy) starts the head at zero.
/// </summary>
public sealed class RewardModel : IDisposable
{
    public const string HeadWeight = "value_head.weight", HeadBias = "value_head.bias";

    private readonly Backend _b;

    private RewardModel(Backend backend, VisionLanguageModel vlm, Parameter weight, Parameter bias)
    {
        _b = backend;
        Vlm = vlm;
        Weight = weight;
        Bias = bias;
    }

    public VisionLanguageModel Vlm { get; }
    public Parameter Weight { get; }
    public Parameter Bias { get; }
    public IEnumerable<Parameter> Trainable => Vlm.Parameters.Trainable.Concat(new[] { Weight, Bias }.Where(p => p.Trainable));

    public static RewardModel Load(Backend backend, string directory, TrainableParts trainable, bool trainHead = true, Layers.TensorParallel? tensorParallel = null)
    {
        var config = VlmConfig.Load(Path.Combine(directory, "config.json"));
        int d = config.Llm.HiddenSize;
        var optional = new Dictionary<string, int[]> { [HeadWeight] = [1, d], [HeadBias] = [1] };
        var vlm = VisionLanguageModel.Load(backend, directory, trainable, optional, tensorParallel: tensorParallel);
        float[] w = new float[d], b = new float[1];
        using (var ck = Checkpoint.Open(directory))
            if (ck.Contains(HeadWeight))
            {
                w = ck.Read(HeadWeight, [1, d]);
                b = ck.Contains(HeadBias) ? ck.Read(HeadBias, [1]) : b;
            }
        return new RewardModel(backend, vlm, Parameter.Create(backend, HeadWeight, [1, d], w, trainHead), Parameter.Create(backend, HeadBias, [1], b, trainHead));
    }

    /// <summary>A reward model over an existing VLM with a new (zero) scalar head: benchmarks and tests.</summary>
    public static RewardModel WithNewHead(VisionLanguageModel vlm, bool trainHead = true)
    {
        int d = vlm.Config.Llm.HiddenSize;
        return new RewardModel(vlm.Backend, vlm, Parameter.Create(vlm.Backend, HeadWeight, [1, d], new float[d], trainHead),
            Parameter.Create(vlm.Backend, HeadBias, [1], new float[1], trainHead));
    }

    public void Save(string directory, string dtype = "F32", IReadOnlyDictionary<string, float[]>? whole = null) => Vlm.Save(directory, dtype, extra: [Weight, Bias], whole: whole);

    /// <summary>A forward over packed sequences and their scores (one per sequence).</summary>
    public sealed class Scored(VisionLanguageModel.Pass pass, RowIndex last, Tensor lastHidden, float[] scores) : IDisposable
    {
        public VisionLanguageModel.Pass Pass { get; } = pass;
        internal RowIndex Last { get; } = last;
        internal Tensor LastHidden { get; } = lastHidden;
        public float[] Scores { get; } = scores;

        public void Dispose()
        {
            LastHidden.Dispose();
            Last.Dispose();
            Pass.Dispose();
        }
    }

    public Scored Score(VlmBatch batch)
    {
        var pass = Vlm.Forward(batch, withLoss: false);
        // Each sequence's last row (with shared prefixes: the distinct row it reads, always the sequence's own).
        var lastRows = batch.CuSeqlens.Skip(1).Select(e => batch.ExpandRows is { } expand ? expand[e - 1] : e - 1).ToArray();
        var last = _b.Rows(lastRows, batch.InputIds.Length, distinct: true, "last_tokens");
        var lastHidden = _b.Activations(lastRows.Length, Vlm.Config.Llm.HiddenSize);
        _b.GatherRows(pass.Hidden, last, lastHidden);
        using var scores = Linear.Forward(_b, lastHidden, Weight.Value, Bias.Value);
        return new Scored(pass, last, lastHidden, scores.ToFloatArray());
    }

    /// <summary>
    /// Scores of prompt + response sequences (each with its own image tiles), packed into one forward pass. A sequence
    /// repeated with the same prompt array and pixel array (a GRPO group's identical samples) is scored once, and
    /// sequences with the same prompt and image compute its rows once (<see cref="VlmBatch.PackShared"/>).
    /// </summary>
    public float[] ScoreSequences(IReadOnlyList<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)> sequences)
    {
        if (sequences.Count == 0) return [];
        var index = new Dictionary<(int[] Prompt, float[]? Pixels, int[] Response), int>(new SequenceKeyComparer());
        var distinct = new List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)>();
        var which = new int[sequences.Count];
        for (int i = 0; i < sequences.Count; i++)
        {
            var q = sequences[i];
            if (index.TryGetValue((q.Prompt, q.Pixels, q.Response), out which[i])) continue;
            index[(q.Prompt, q.Pixels, q.Response)] = which[i] = distinct.Count;
            distinct.Add(q);
        }
        using var scored = Score(VlmBatch.PackShared(distinct, Vlm.ImageContextId).Batch);
        return [.. which.Select(d => scored.Scores[d])];
    }

    /// <summary>The same prompt and pixel arrays (by reference) and the same response tokens.</summary>
    private sealed class SequenceKeyComparer : IEqualityComparer<(int[] Prompt, float[]? Pixels, int[] Response)>
    {
        public bool Equals((int[] Prompt, float[]? Pixels, int[] Response) a, (int[] Prompt, float[]? Pixels, int[] Response) b) =>
            ReferenceEquals(a.Prompt, b.Prompt) && ReferenceEquals(a.Pixels, b.Pixels) && a.Response.AsSpan().SequenceEqual(b.Response);

        public int GetHashCode((int[] Prompt, float[]? Pixels, int[] Response) k)
        {
            var h = new HashCode();
            h.Add(System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode(k.Prompt));
            h.Add(k.Pixels is null ? 0 : System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode(k.Pixels));
            foreach (var t in k.Response) h.Add(t);
            return h.ToHashCode();
        }
    }

    /// <summary>Backward of a loss given d loss / d score for each sequence.</summary>
    public void Backward(Scored scored, float[] dScores)
    {
        int s = dScores.Length, d = Vlm.Config.Llm.HiddenSize;
        using var dy = _b.FromArray(dScores, _b.ActivationType, [s, 1]);
        using var dLast = Linear.Backward(_b, dy, scored.LastHidden, Weight.Value, Weight.Grad, Bias.Grad, inputGradient: true)!;
        using var dHidden = _b.Activations(scored.Pass.Hidden.Rows, d);
        _b.ScatterRows(dLast, scored.Last, dHidden);
        Vlm.BackwardFromHidden(scored.Pass, dHidden);
    }

    public void Dispose()
    {
        Weight.Dispose();
        Bias.Dispose();
        Vlm.Dispose();
    }
}
