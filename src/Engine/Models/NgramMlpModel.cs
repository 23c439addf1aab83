using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>Shape of an <see cref="NgramMlpModel"/>.</summary>
public sealed record NgramMlpConfig(int Vocab, int Context = 4, int Hidden = 64, int Intermediate = 192, int Layers = 2, float RmsEps = 1e-6f);

/// <summary>
/// A next-token model built only from the core op library, used to check the ops end to end and as the trainer's
/// smoke task until the vision-language model lands: the embeddings of the previous <c>Context</c> tokens (one table
/// per offset) are summed, then pre-norm SwiGLU MLP blocks with residuals, a final RMSNorm, an LM head and the fused
/// log-softmax loss. Data flow per step (T positions, C hidden, F intermediate, V vocab):
/// ids [T, Context] -> sum of Context lookups [T, C] -> (RMSNorm -> gate/up [T, F] -> SwiGLU -> down [T, C] -> +)^L
/// -> RMSNorm -> logits [T, V] -> log p(target) [T] -> mean NLL.
/// </summary>
public sealed class NgramMlpModel : IDisposable
{
    private readonly Backend _b;
    private readonly List<(Parameter Norm, Linear Gate, Linear Up, Linear Down)> _blocks = [];
    private readonly Parameter _finalNorm;
    private readonly Linear _head;
    private readonly Parameter _embedding; // [Context * V, C]: row k * V + id is token id at offset k

    public NgramMlpModel(Backend backend, NgramMlpConfig config, int seed)
    {
        _b = backend;
        Config = config;
        var rng = new Random(seed);
        int c = config.Hidden;
        _embedding = Parameter.Create(backend, "embed_tokens.weight", [config.Context * config.Vocab, c],
            Linear.Uniform(rng, config.Context * config.Vocab * c, 0.5f));
        var ones = Enumerable.Repeat(1f, c).ToArray();
        for (int l = 0; l < config.Layers; l++)
            _blocks.Add((Parameter.Create(backend, $"layers.{l}.norm.weight", [c], ones),
                new Linear(backend, $"layers.{l}.mlp.gate_proj", c, config.Intermediate, bias: false, rng),
                new Linear(backend, $"layers.{l}.mlp.up_proj", c, config.Intermediate, bias: false, rng),
                new Linear(backend, $"layers.{l}.mlp.down_proj", config.Intermediate, c, bias: true, rng)));
        _finalNorm = Parameter.Create(backend, "norm.weight", [c], ones);
        _head = new Linear(backend, "lm_head", c, config.Vocab, bias: false, rng);
    }

    public NgramMlpConfig Config { get; }

    public IEnumerable<Parameter> Parameters =>
        new[] { _embedding }.Concat(_blocks.SelectMany(b => new[] { b.Norm }.Concat(b.Gate.Parameters).Concat(b.Up.Parameters).Concat(b.Down.Parameters)))
            .Concat([_finalNorm]).Concat(_head.Parameters);

    /// <summary>
    /// Forward and, with <paramref name="backward"/>, backward of the mean NLL over <paramref name="targets"/>.
    /// <paramref name="contexts"/>: [T, Context] token ids (previous tokens, nearest last); returns the mean NLL.
    /// </summary>
    public double Step(ReadOnlySpan<int> contexts, ReadOnlySpan<int> targets, bool backward)
    {
        var cfg = Config;
        int t = targets.Length, c = cfg.Hidden;
        if (contexts.Length != t * cfg.Context) throw new ArgumentException($"contexts has {contexts.Length} ids, expected {t} x {cfg.Context}");
        var scope = new List<Tensor>();
        Tensor Keep(Tensor x) { scope.Add(x); return x; }
        try
        {
            // Embedding: one lookup per context offset into that offset's rows of the table.
            var ids = new Tensor[cfg.Context];
            var h = Keep(_b.Activations(t, c));
            for (int k = 0; k < cfg.Context; k++)
            {
                var offsetIds = new int[t];
                for (int i = 0; i < t; i++) offsetIds[i] = k * cfg.Vocab + contexts[i * cfg.Context + k];
                ids[k] = Keep(_b.FromArray(offsetIds, [t]));
                var e = Keep(_b.Activations(t, c));
                _b.EmbeddingForward(_embedding.Value, ids[k], e);
                _b.Add(h, h, e);
            }

            var saved = new List<(Tensor In, Tensor Normed, Tensor Rstd, Tensor Gate, Tensor Up, Tensor Act)>();
            foreach (var blk in _blocks)
            {
                var normed = Keep(_b.Activations(t, c));
                var rstd = Keep(_b.Allocate(DType.F32, t));
                _b.RmsNormForward(h, blk.Norm.Value, normed, rstd, cfg.RmsEps);
                var gate = Keep(blk.Gate.Forward(normed));
                var up = Keep(blk.Up.Forward(normed));
                var act = Keep(_b.Activations(t, cfg.Intermediate));
                _b.SwiGluForward(gate, up, act);
                var down = Keep(blk.Down.Forward(act));
                var next = Keep(_b.Activations(t, c));
                _b.Add(next, h, down);
                saved.Add((h, normed, rstd, gate, up, act));
                h = next;
            }

            var final = Keep(_b.Activations(t, c));
            var finalRstd = Keep(_b.Allocate(DType.F32, t));
            _b.RmsNormForward(h, _finalNorm.Value, final, finalRstd, cfg.RmsEps);
            var logits = Keep(_head.Forward(final));
            var tg = Keep(_b.FromArray(targets, [t]));
            var logprob = Keep(_b.Allocate(DType.F32, t));
            var lse = Keep(_b.Allocate(DType.F32, t));
            _b.CrossEntropyForward(logits, tg, logprob, lse);
            double loss = -logprob.ToFloatArray().Sum(v => (double)v) / t;
            if (!backward) return loss;

            // Backward in reverse: d(mean NLL)/d logprob = -1/T per token; dlogits overwrite the logits.
            var dlogprob = Keep(_b.FromArray(Enumerable.Repeat(-1f / t, t).ToArray(), DType.F32, [t]));
            _b.CrossEntropyBackward(logits, tg, lse, dlogprob, logits);
            var dfinal = Keep(_head.Backward(logits, final)!);
            var dh = Keep(_b.Activations(t, c));
            _b.RmsNormBackward(dfinal, h, _finalNorm.Value, finalRstd, dh, _finalNorm.Grad, accumulate: true);
            for (int l = _blocks.Count - 1; l >= 0; l--)
            {
                var blk = _blocks[l];
                var s = saved[l];
                // The residual passes dh straight through; the MLP branch adds its input gradient.
                var dact = Keep(blk.Down.Backward(dh, s.Act)!);
                var dgate = Keep(_b.Activations(t, cfg.Intermediate));
                var dup = Keep(_b.Activations(t, cfg.Intermediate));
                _b.SwiGluBackward(dact, s.Gate, s.Up, dgate, dup);
                var dnormed = Keep(blk.Gate.Backward(dgate, s.Normed)!);
                var dnormedUp = Keep(blk.Up.Backward(dup, s.Normed)!);
                _b.Add(dnormed, dnormed, dnormedUp);
                var dbranch = Keep(_b.Activations(t, c));
                _b.RmsNormBackward(dnormed, s.In, blk.Norm.Value, s.Rstd, dbranch, blk.Norm.Grad, accumulate: true);
                _b.Add(dh, dh, dbranch);
            }
            if (_embedding.Grad is not null)
                foreach (var id in ids) _b.EmbeddingBackward(dh, id, _embedding.Grad);
            return loss;
        }
        finally
        {
            foreach (var x in scope) x.Dispose();
        }
    }

    public void Dispose()
    {
        foreach (var p in Parameters) p.Dispose();
    }
}
