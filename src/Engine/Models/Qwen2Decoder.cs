using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>
/// The Qwen2 decoder layers: pre-norm (RMSNorm) GQA attention with q/k/v biases and rotate-half RoPE at explicit
/// positions, causal inside each packed sequence, then a SwiGLU MLP; residuals around both. x: [T, D].
/// <para>Tensor parallel (<see cref="TensorParallel"/>): each rank runs its heads and MLP columns; the outputs of
/// o_proj and down are partial sums, all-reduced before the residual; in backward the gradients of the two norms'
/// outputs (the inputs of q/k/v and of gate/up) are all-reduced before the norms' backward.</para>
/// </summary>
public sealed class Qwen2Decoder
{
    private readonly Backend _b;
    private readonly LlmConfig _c;
    private readonly Layer[] _layers;

    public Qwen2Decoder(Backend backend, LlmConfig config, ParameterStore p)
    {
        _b = backend;
        _c = config;
        _layers = Enumerable.Range(0, config.NumLayers).Select(i => new Layer(backend, config, p, i, p.TensorParallel)).ToArray();
    }

    public bool CheckpointLayers { get; set; }

    public sealed class State : IDisposable
    {
        internal readonly Activations Held = new();
        internal readonly List<Tensor> Inputs = [];
        internal readonly List<Layer.Cache?> Caches = [];
        public Tensor Output = null!;
        public void Dispose()
        {
            Held.Dispose();
            foreach (var c in Caches) c?.Dispose();
        }
    }

    /// <param name="shared">When the batch's sequences share prefixes: x and positions hold the distinct rows, sequences
    /// the per-sequence attention layout, and attention reads through this map (null: every row is its own).</param>
    public State Forward(Tensor x, Tensor positions, PackedSequences sequences, SharedRows? shared = null)
    {
        var st = new State();
        foreach (var layer in _layers)
        {
            st.Inputs.Add(x);
            x = st.Held.Keep(layer.Forward(x, positions, sequences, shared, out var cache));
            if (CheckpointLayers) { cache.Dispose(); st.Caches.Add(null); } else st.Caches.Add(cache);
        }
        st.Output = x;
        return st;
    }

    /// <summary>dOutput [T, D] -> dx [T, D] (the caller owns it), accumulating parameter gradients.</summary>
    /// <param name="ready">Called with each parameter of a layer once that layer's backward is done (its gradient is
    /// final for this pass): a data-parallel run starts reducing them while the layers below run.</param>
    public Tensor Backward(State st, Tensor dOutput, Tensor positions, PackedSequences sequences, SharedRows? shared = null, Action<Parameter>? ready = null)
    {
        var dx = dOutput;
        bool owned = false;
        for (int i = _layers.Length - 1; i >= 0; i--)
        {
            var cache = st.Caches[i];
            if (cache is null) { using var again = _layers[i].Forward(st.Inputs[i], positions, sequences, shared, out cache); }
            Tensor next;
            using (cache) next = _layers[i].Backward(dx, st.Inputs[i], positions, sequences, shared, cache);
            st.Caches[i] = null;
            if (ready is not null) foreach (var p in _layers[i].Parameters) ready(p);
            if (owned) dx.Dispose();
            dx = next;
            owned = true;
        }
        return owned ? dx : CopyOf(dx);
    }

    /// <summary>Attention of one layer during inference: q [T, H, D], k and v [T, Hkv, D] (after RoPE) into output [T, H, D].</summary>
    public delegate void Attend(int layer, Tensor q, Tensor k, Tensor v, Tensor output);

    /// <summary>
    /// Inference through every layer with the attention supplied by the caller (prefill into a KV cache, or paged
    /// decode): nothing is kept for backward. x: [T, D] -> [T, D], owned by the caller.
    /// </summary>
    public Tensor Infer(Tensor x, Tensor positions, Attend attend)
    {
        var h = CopyOf(x);
        for (int i = 0; i < _layers.Length; i++)
        {
            var next = _layers[i].Infer(h, positions, (q, k, v, o) => attend(i, q, k, v, o));
            h.Dispose();
            h = next;
        }
        return h;
    }

    private Tensor CopyOf(Tensor t)
    {
        var c = _b.Activations(t.Rows, t.Cols);
        _b.Convert(t, c);
        return c;
    }

    internal sealed class Layer
    {
        private readonly Backend _b;
        private readonly LlmConfig _c;
        private readonly Norm _inputNorm, _postNorm;
        private readonly Linear _q, _k, _v, _o, _gate, _up, _down;
        private readonly TensorParallel _tp;

        /// <summary>The layer's weights and biases.</summary>
        public IEnumerable<Parameter> Parameters => new[] { _inputNorm.Weight, _postNorm.Weight, _q.Weight, _q.Bias, _k.Weight, _k.Bias, _v.Weight, _v.Bias,
            _o.Weight, _gate.Weight, _up.Weight, _down.Weight }.OfType<Parameter>();

        // This rank's query heads, kv heads and MLP columns (all of them without tensor parallelism).
        private readonly int _heads, _kvHeads, _ffn;

        /// <summary>RoPE's cosines and sines up to the model's max_position_embeddings (one per backend, shared by the layers).</summary>
        private RopeTable Rope => _b.RopeTable(_c.RopeTheta, _c.HeadDim, _c.MaxPositionEmbeddings);

        public Layer(Backend b, LlmConfig c, ParameterStore p, int i, TensorParallel tp)
        {
            _b = b;
            _c = c;
            _tp = tp;
            (_heads, _kvHeads, _ffn) = (c.NumHeads / tp.Size, c.NumKvHeads / tp.Size, c.IntermediateSize / tp.Size);
            var pre = $"language_model.model.layers.{i}.";
            _inputNorm = new Norm(b, p[pre + "input_layernorm.weight"], null, false, c.RmsNormEps);
            _postNorm = new Norm(b, p[pre + "post_attention_layernorm.weight"], null, false, c.RmsNormEps);
            _q = new Linear(b, p[pre + "self_attn.q_proj.weight"], p[pre + "self_attn.q_proj.bias"]);
            _k = new Linear(b, p[pre + "self_attn.k_proj.weight"], p[pre + "self_attn.k_proj.bias"]);
            _v = new Linear(b, p[pre + "self_attn.v_proj.weight"], p[pre + "self_attn.v_proj.bias"]);
            _o = new Linear(b, p[pre + "self_attn.o_proj.weight"], null);
            _gate = new Linear(b, p[pre + "mlp.gate_proj.weight"], null);
            _up = new Linear(b, p[pre + "mlp.up_proj.weight"], null);
            _down = new Linear(b, p[pre + "mlp.down_proj.weight"], null);
        }

        public Tensor Infer(Tensor x, Tensor positions, Action<Tensor, Tensor, Tensor, Tensor> attend)
        {
            var b = _b;
            int t = x.Rows, hd = _c.HeadDim, h = _heads, kvh = _kvHeads;
            using var held = new Activations();
            var n1 = held.Keep(_inputNorm.Forward(x, out var norm1)); held.Keep(norm1);
            var qr = held.Keep(b.Activations(t, h * hd));
            using (var q = _q.Forward(n1)) b.RopeForward(q.Reshape(t, h, hd), positions, qr.Reshape(t, h, hd), _c.RopeTheta, Rope);
            var kr = held.Keep(b.Activations(t, kvh * hd));
            using (var kk = _k.Forward(n1)) b.RopeForward(kk.Reshape(t, kvh, hd), positions, kr.Reshape(t, kvh, hd), _c.RopeTheta, Rope);
            var v = held.Keep(_v.Forward(n1));
            var a = held.Keep(b.Activations(t, h * hd));
            attend(qr.Reshape(t, h, hd), kr.Reshape(t, kvh, hd), v.Reshape(t, kvh, hd), a.Reshape(t, h, hd));
            var h1 = held.Keep(_o.Forward(a));
            _tp.AllReduce(h1);
            b.Add(h1, h1, x);
            var n2 = held.Keep(_postNorm.Forward(h1, out var norm2)); held.Keep(norm2);
            var gate = held.Keep(_gate.Forward(n2));
            var up = held.Keep(_up.Forward(n2));
            var act = held.Keep(b.Activations(t, _ffn));
            b.SwiGluForward(gate, up, act);
            var y = _down.Forward(act);
            _tp.AllReduce(y);
            b.Add(y, y, h1);
            return y;
        }

        internal sealed class Cache : IDisposable
        {
            public readonly Activations Held = new();
            public Tensor N1 = null!, Qr = null!, Kr = null!, V = null!, A = null!, Lse = null!, H1 = null!, N2 = null!, Gate = null!, Up = null!, Act = null!;
            public Tensor? AllQ, AllK, AllV, AllA; // with shared rows: attention's inputs and output on the per-sequence layout
            public NormCache Norm1 = null!, Norm2 = null!;
            public void Dispose() => Held.Dispose();
        }

        public Tensor Forward(Tensor x, Tensor positions, PackedSequences seqs, SharedRows? shared, out Cache cache)
        {
            var b = _b;
            int t = x.Rows, hd = _c.HeadDim, h = _heads, kvh = _kvHeads;
            var k = new Cache();
            var held = k.Held;
            k.N1 = held.Keep(_inputNorm.Forward(x, out k.Norm1)); held.Keep(k.Norm1);
            using (var q = _q.Forward(k.N1))
            {
                k.Qr = held.Keep(b.Activations(t, h * hd));
                b.RopeForward(q.Reshape(t, h, hd), positions, k.Qr.Reshape(t, h, hd), _c.RopeTheta, Rope);
            }
            using (var kk = _k.Forward(k.N1))
            {
                k.Kr = held.Keep(b.Activations(t, kvh * hd));
                b.RopeForward(kk.Reshape(t, kvh, hd), positions, k.Kr.Reshape(t, kvh, hd), _c.RopeTheta, Rope);
            }
            k.V = held.Keep(_v.Forward(k.N1));
            if (shared is null)
            {
                k.A = held.Keep(b.Activations(t, h * hd));
                k.Lse = held.Keep(b.Allocate(DType.F32, t, h));
                b.AttentionForward(k.Qr.Reshape(t, h, hd), k.Kr.Reshape(t, kvh, hd), k.V.Reshape(t, kvh, hd), seqs, k.A.Reshape(t, h, hd), k.Lse,
                    1f / MathF.Sqrt(hd), causal: true);
            }
            else
            {
                // Attention on the per-sequence layout, read from the distinct rows; each distinct row takes its own row's output.
                int ta = shared.AttentionRows;
                k.AllQ = held.Keep(shared.Gather(k.Qr));
                k.AllK = held.Keep(shared.Gather(k.Kr));
                k.AllV = held.Keep(shared.Gather(k.V));
                k.AllA = held.Keep(b.Activations(ta, h * hd));
                k.Lse = held.Keep(b.Allocate(DType.F32, ta, h));
                b.AttentionForward(k.AllQ.Reshape(ta, h, hd), k.AllK.Reshape(ta, kvh, hd), k.AllV.Reshape(ta, kvh, hd), seqs, k.AllA.Reshape(ta, h, hd), k.Lse,
                    1f / MathF.Sqrt(hd), causal: true);
                k.A = held.Keep(shared.Select(k.AllA));
            }
            k.H1 = held.Keep(_o.Forward(k.A));
            _tp.AllReduce(k.H1);
            b.Add(k.H1, k.H1, x);
            k.N2 = held.Keep(_postNorm.Forward(k.H1, out k.Norm2)); held.Keep(k.Norm2);
            k.Gate = held.Keep(_gate.Forward(k.N2));
            k.Up = held.Keep(_up.Forward(k.N2));
            k.Act = held.Keep(b.Activations(t, _ffn));
            b.SwiGluForward(k.Gate, k.Up, k.Act);
            var y = _down.Forward(k.Act);
            _tp.AllReduce(y);
            b.Add(y, y, k.H1);
            cache = k;
            return y;
        }

        public Tensor Backward(Tensor dy, Tensor x, Tensor positions, PackedSequences seqs, SharedRows? shared, Cache k)
        {
            var b = _b;
            int t = x.Rows, hd = _c.HeadDim, h = _heads, kvh = _kvHeads;
            using var held = new Activations();
            var dAct = held.Keep(_down.Backward(dy, k.Act)!);
            var dGate = held.Keep(b.Activations(t, _ffn));
            var dUp = held.Keep(b.Activations(t, _ffn));
            b.SwiGluBackward(dAct, k.Gate, k.Up, dGate, dUp);
            var dn2 = held.Keep(_gate.Backward(dGate, k.N2)!);
            using (var dn2u = _up.Backward(dUp, k.N2)!) b.Add(dn2, dn2, dn2u);
            _tp.AllReduce(dn2);
            var dh1 = held.Keep(_postNorm.Backward(dn2, k.H1, k.Norm2));
            b.Add(dh1, dh1, dy);

            var da = held.Keep(_o.Backward(dh1, k.A)!);
            Tensor dqr, dkr, dv;
            if (shared is null)
            {
                dqr = held.Keep(b.Activations(t, h * hd));
                dkr = held.Keep(b.Activations(t, kvh * hd));
                dv = held.Keep(b.Activations(t, kvh * hd));
                b.AttentionBackward(da.Reshape(t, h, hd), k.Qr.Reshape(t, h, hd), k.Kr.Reshape(t, kvh, hd), k.V.Reshape(t, kvh, hd), k.A.Reshape(t, h, hd),
                    k.Lse, seqs, dqr.Reshape(t, h, hd), dkr.Reshape(t, kvh, hd), dv.Reshape(t, kvh, hd), 1f / MathF.Sqrt(hd), causal: true);
            }
            else
            {
                // Only the rows the distinct rows took carry an output gradient; the gradients of every copy of a shared
                // row's q, k and v add up in that row.
                int ta = shared.AttentionRows;
                var daAll = held.Keep(shared.SelectBackward(da));
                var dqAll = held.Keep(b.Activations(ta, h * hd));
                var dkAll = held.Keep(b.Activations(ta, kvh * hd));
                var dvAll = held.Keep(b.Activations(ta, kvh * hd));
                b.AttentionBackward(daAll.Reshape(ta, h, hd), k.AllQ!.Reshape(ta, h, hd), k.AllK!.Reshape(ta, kvh, hd), k.AllV!.Reshape(ta, kvh, hd),
                    k.AllA!.Reshape(ta, h, hd), k.Lse, seqs, dqAll.Reshape(ta, h, hd), dkAll.Reshape(ta, kvh, hd), dvAll.Reshape(ta, kvh, hd),
                    1f / MathF.Sqrt(hd), causal: true);
                dqr = held.Keep(shared.GatherBackward(dqAll));
                dkr = held.Keep(shared.GatherBackward(dkAll));
                dv = held.Keep(shared.GatherBackward(dvAll));
            }
            b.RopeBackward(dqr.Reshape(t, h, hd), positions, dqr.Reshape(t, h, hd), _c.RopeTheta, Rope);   // in place
            b.RopeBackward(dkr.Reshape(t, kvh, hd), positions, dkr.Reshape(t, kvh, hd), _c.RopeTheta, Rope);
            var dn1 = held.Keep(_q.Backward(dqr, k.N1)!);
            using (var dk = _k.Backward(dkr, k.N1)!) b.Add(dn1, dn1, dk);
            using (var dvn = _v.Backward(dv, k.N1)!) b.Add(dn1, dn1, dvn);
            _tp.AllReduce(dn1);
            var dx = _inputNorm.Backward(dn1, x, k.Norm1);
            b.Add(dx, dx, dh1);
            return dx;
        }
    }
}
