using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>
/// InternViT: patch embedding (a convolution with stride = kernel, done as a GEMM over host-unfolded patches), class
/// token and position embedding, then pre-norm layers h += ls1 * attn(norm1(h)); h += ls2 * mlp(norm2(h)) with
/// bidirectional attention inside each tile (tiles are packed sequences). Shapes: n tiles, P patches per tile,
/// C width, F MLP width, L = n (1 + P) tokens.
/// </summary>
public sealed class VisionEncoder : IDisposable
{
    private readonly Backend _b;
    private readonly VisionConfig _c;
    private readonly ParameterStore _p;
    private readonly Layer[] _layers;

    private readonly int _tileSize;
    private readonly Tensor? _interpolation, _interpolationF32; // [P', P] bicubic map when tiles differ from image_size

    public VisionEncoder(Backend backend, VisionConfig config, ParameterStore parameters, int layersToRun, int tileSize)
    {
        _b = backend;
        _c = config;
        _p = parameters;
        _tileSize = tileSize;
        _layers = Enumerable.Range(0, layersToRun).Select(i => new Layer(backend, config, parameters, i)).ToArray();
        if (tileSize % config.PatchSize != 0) throw new ArgumentException($"tile size {tileSize} is not a multiple of patch size {config.PatchSize}");
        int side = tileSize / config.PatchSize;
        if (side != config.PatchesPerSide)
        {
            var m = BicubicMatrix(config.PatchesPerSide, side);
            _interpolation = backend.FromArray(m, backend.ActivationType, [side * side, config.NumPatches], "position_interpolation");
            _interpolationF32 = backend.ActivationType == DType.F32 ? null : backend.FromArray(m, DType.F32, [side * side, config.NumPatches]);
        }
    }

    /// <summary>
    /// Bicubic resampling (a = -0.75, half-pixel centres, edge-clamped taps, as torch's align_corners=False) of an
    /// inSide x inSide grid to outSide x outSide, as a [outSide^2, inSide^2] matrix: separable rows x columns.
    /// </summary>
    public static float[] BicubicMatrix(int inSide, int outSide)
    {
        const double a = -0.75;
        var w1 = new double[outSide, inSide];
        double scale = (double)inSide / outSide;
        for (int o = 0; o < outSide; o++)
        {
            double src = (o + 0.5) * scale - 0.5;
            int x0 = (int)Math.Floor(src);
            double t = src - x0;
            double[] w =
            [
                ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
            ];
            for (int k = 0; k < 4; k++) w1[o, Math.Clamp(x0 - 1 + k, 0, inSide - 1)] += w[k];
        }
        var m = new float[outSide * outSide * inSide * inSide];
        for (int oy = 0; oy < outSide; oy++)
            for (int ox = 0; ox < outSide; ox++)
                for (int iy = 0; iy < inSide; iy++)
                    for (int ix = 0; ix < inSide; ix++)
                        m[(oy * outSide + ox) * inSide * inSide + iy * inSide + ix] = (float)(w1[oy, iy] * w1[ox, ix]);
        return m;
    }

    public bool CheckpointLayers { get; set; }

    /// <summary>Everything the encoder's backward needs.</summary>
    public sealed class State : IDisposable
    {
        internal readonly Activations Held = new();
        internal Tensor Patches = null!;                 // [n P, 3 p p] unfolded pixels
        internal RowIndex ClsRows = null!, PatchRows = null!, PositionRows = null!, ClsSource = null!;
        internal PackedSequences Tiles = null!;
        internal readonly List<Tensor> LayerInputs = [];
        internal readonly List<Layer.Cache?> Caches = [];
        public Tensor Output = null!;                    // [n P, C]: the last layer's patch tokens (CLS dropped)
        public void Dispose()
        {
            Held.Dispose();
            foreach (var c in Caches) c?.Dispose();
        }
    }

    /// <summary>pixels: [n, 3, S, S] normalised, row-major on the host; S = the tile size (force_image_size).</summary>
    /// <param name="forBackward">Keep what <see cref="Backward"/> needs; false (a frozen encoder) frees each layer's
    /// activations as soon as the next layer has its input: only the output survives.</param>
    public State Forward(float[] pixels, int tiles, bool forBackward = true)
    {
        var c = _c;
        int s = _tileSize, p = c.PatchSize, side = s / p, np = side * side, cv = c.HiddenSize, seq = 1 + np;
        if (pixels.Length != tiles * 3 * s * s) throw new ArgumentException($"pixel values hold {pixels.Length} floats, expected {tiles} x 3 x {s} x {s}");
        var st = new State();
        var h = st.Held;

        // Unfold: row (tile, py, px) holds the 3 p p pixels of one patch in the weight's (channel, ky, kx) order.
        var unfolded = new float[tiles * np * 3 * p * p];
        for (int t = 0; t < tiles; t++)
            for (int py = 0; py < side; py++)
                for (int px = 0; px < side; px++)
                {
                    int row = (t * np + py * side + px) * 3 * p * p;
                    for (int ch = 0; ch < 3; ch++)
                        for (int ky = 0; ky < p; ky++)
                            for (int kx = 0; kx < p; kx++)
                                unfolded[row + (ch * p + ky) * p + kx] = pixels[((t * 3 + ch) * s + py * p + ky) * s + px * p + kx];
                }
        st.Patches = h.Keep(_b.FromArray(unfolded, _b.ActivationType, [tiles * np, 3 * p * p]));
        var w = _p["vision_model.embeddings.patch_embedding.weight"];
        var patchEmb = h.Keep(Linear.Forward(_b, st.Patches, w.Value.Reshape(cv, 3 * p * p), _p["vision_model.embeddings.patch_embedding.bias"].Value));

        // Sequence per tile: [CLS, patch 0 .. P-1] + position embedding.
        var x = h.Keep(_b.Activations(tiles * seq, cv));
        st.ClsRows = h.Keep(_b.Rows(Enumerable.Range(0, tiles).Select(t => t * seq).ToArray(), tiles * seq, distinct: true, "cls_rows"));
        st.PatchRows = h.Keep(_b.Rows(Enumerable.Range(0, tiles * np).Select(i => i / np * seq + 1 + i % np).ToArray(), tiles * seq, distinct: true, "patch_rows"));
        st.PositionRows = h.Keep(_b.Rows(Enumerable.Range(0, tiles * seq).Select(i => i % seq).ToArray(), seq, distinct: false, "position_rows"));
        st.ClsSource = h.Keep(_b.Rows(new int[tiles], 1, distinct: false, "cls_source"));
        using (var cls = _b.Activations(tiles, cv))
        {
            _b.GatherRows(_p["vision_model.embeddings.class_embedding"].Value.Reshape(1, cv), st.ClsSource, cls);
            _b.ScatterRows(cls, st.ClsRows, x);
        }
        _b.ScatterRows(patchEmb, st.PatchRows, x);
        using (var table = PositionTable())
        using (var pos = _b.Activations(tiles * seq, cv))
        {
            _b.GatherRows(table, st.PositionRows, pos);
            _b.Add(x, x, pos);
        }

        st.Tiles = h.Keep(_b.Sequences(PackedSequences.FromLengths(Enumerable.Repeat(seq, tiles))));
        Tensor? transient = null; // without backward: the previous layer's output, freed once the next has read it
        try
        {
            foreach (var layer in _layers)
            {
                if (!forBackward)
                {
                    var next = layer.Forward(x, st.Tiles, out var scratch);
                    scratch.Dispose();
                    transient?.Dispose();
                    x = transient = next;
                    continue;
                }
                st.LayerInputs.Add(x);
                var y = h.Keep(layer.Forward(x, st.Tiles, out var cache));
                if (CheckpointLayers) { cache.Dispose(); st.Caches.Add(null); } else st.Caches.Add(cache);
                x = y;
            }
            st.Output = h.Keep(_b.Activations(tiles * np, cv));
            _b.GatherRows(x, st.PatchRows, st.Output);
            return st;
        }
        catch
        {
            st.Dispose();
            throw;
        }
        finally
        {
            transient?.Dispose();
        }
    }

    /// <summary>The position table for this tile size, [1 + P', C]: the stored one, or CLS + bicubic-resampled patches.</summary>
    private Tensor PositionTable()
    {
        int cv = _c.HiddenSize;
        var stored = _p["vision_model.embeddings.position_embedding"].Value.Reshape(1 + _c.NumPatches, cv);
        if (_interpolation is null) return stored;
        int np = _interpolation.Dim(0);
        var table = _b.Activations(1 + np, cv);
        _b.Convert(stored.SliceRows(0, 1), table.SliceRows(0, 1));
        _b.Gemm(_interpolation, false, stored.SliceRows(1, _c.NumPatches), false, table.SliceRows(1, np));
        return table;
    }

    /// <summary>dOutput: [n P, C] -> parameter gradients (pixels get none).</summary>
    public void Backward(State st, Tensor dOutput)
    {
        if (st.Caches.Count != _layers.Length) throw new InvalidOperationException("this ViT pass ran without keeping its activations (frozen encoder): no backward");
        var c = _c;
        int side = _tileSize / c.PatchSize, np = side * side, cv = c.HiddenSize, seq = 1 + np, tiles = dOutput.Rows / np;
        using var held = new Activations();
        var dx = held.Keep(_b.Activations(tiles * seq, cv));
        _b.ScatterRows(dOutput, st.PatchRows, dx); // CLS rows of the last layer get no gradient
        for (int i = _layers.Length - 1; i >= 0; i--)
        {
            var cache = st.Caches[i];
            if (cache is null) { using var again = _layers[i].Forward(st.LayerInputs[i], st.Tiles, out cache); }
            using (cache)
            {
                dx = held.Keep(_layers[i].Backward(dx, st.LayerInputs[i], st.Tiles, cache));
            }
            st.Caches[i] = null;
        }

        var pos = _p["vision_model.embeddings.position_embedding"];
        if (pos.Grad is not null && _interpolation is null) _b.EmbeddingBackward(dx, st.PositionRows.Device, pos.Grad.Reshape(seq, cv));
        else if (pos.Grad is not null)
        {
            // d(table) by scatter-add, then back through the resampling: dpos[1:] += M^T d(table)[1:].
            using var dTable = _b.Allocate(DType.F32, seq, cv);
            _b.EmbeddingBackward(dx, st.PositionRows.Device, dTable);
            var g = pos.Grad.Reshape(1 + c.NumPatches, cv);
            _b.Add(g.SliceRows(0, 1), g.SliceRows(0, 1), dTable.SliceRows(0, 1));
            _b.Gemm(_interpolationF32 ?? _interpolation!, true, dTable.SliceRows(1, np), false, g.SliceRows(1, c.NumPatches), beta: 1f);
        }
        var cls = _p["vision_model.embeddings.class_embedding"];
        if (cls.Grad is not null)
        {
            using var dcls = _b.Activations(tiles, cv);
            _b.GatherRows(dx, st.ClsRows, dcls);
            _b.EmbeddingBackward(dcls, st.ClsSource.Device, cls.Grad.Reshape(1, cv));
        }
        var w = _p["vision_model.embeddings.patch_embedding.weight"];
        var bias = _p["vision_model.embeddings.patch_embedding.bias"];
        if (w.Grad is not null || bias.Grad is not null)
        {
            using var dpatch = _b.Activations(tiles * np, cv);
            _b.GatherRows(dx, st.PatchRows, dpatch);
            Linear.Backward(_b, dpatch, st.Patches, w.Value.Reshape(cv, 3 * c.PatchSize * c.PatchSize),
                w.Grad?.Reshape(cv, 3 * c.PatchSize * c.PatchSize), bias.Grad, inputGradient: false);
        }
    }

    public void Dispose()
    {
        _interpolation?.Dispose();
        _interpolationF32?.Dispose();
    }

    /// <summary>One InternViT layer.</summary>
    internal sealed class Layer
    {
        private readonly Backend _b;
        private readonly VisionConfig _c;
        private readonly Norm _norm1, _norm2;
        private readonly Norm? _qNorm, _kNorm;
        private readonly Parameter _qkvW, _ls1, _ls2;
        private readonly Parameter? _qkvB;
        private readonly Linear _proj, _fc1, _fc2;

        public Layer(Backend b, VisionConfig c, ParameterStore p, int i)
        {
            _b = b;
            _c = c;
            var pre = $"vision_model.encoder.layers.{i}.";
            bool ln = c.NormType == VisionNorm.LayerNorm;
            _norm1 = new Norm(b, p[pre + "norm1.weight"], ln ? p[pre + "norm1.bias"] : null, ln, c.NormEps);
            _norm2 = new Norm(b, p[pre + "norm2.weight"], ln ? p[pre + "norm2.bias"] : null, ln, c.NormEps);
            if (c.QkNormalization)
            {
                _qNorm = new Norm(b, p[pre + "attn.q_norm.weight"], null, false, c.NormEps);
                _kNorm = new Norm(b, p[pre + "attn.k_norm.weight"], null, false, c.NormEps);
            }
            _qkvW = p[pre + "attn.qkv.weight"];
            _qkvB = c.QkvBias ? p[pre + "attn.qkv.bias"] : null;
            _ls1 = p[pre + "ls1"];
            _ls2 = p[pre + "ls2"];
            _proj = new Linear(b, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"]);
            _fc1 = new Linear(b, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"]);
            _fc2 = new Linear(b, p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"]);
        }

        internal sealed class Cache : IDisposable
        {
            public readonly Activations Held = new();
            public Tensor N1 = null!, Q = null!, K = null!, V = null!, Qn = null!, Kn = null!, A = null!, Lse = null!, P = null!, H1 = null!, N2 = null!, F1 = null!, G = null!, F2 = null!;
            public NormCache Norm1 = null!, Norm2 = null!;
            public NormCache? QNorm, KNorm;
            public void Dispose() => Held.Dispose();
        }

        private Tensor Slice(Parameter w, int part) => w.Value.SliceRows(part * _c.HiddenSize, _c.HiddenSize);
        private Tensor? SliceGrad(Parameter? w, int part) => w?.Grad?.SliceRows(part * _c.HiddenSize, _c.HiddenSize);

        public Tensor Forward(Tensor x, PackedSequences tiles, out Cache cache)
        {
            var b = _b;
            int t = x.Rows, cv = _c.HiddenSize, heads = _c.NumHeads, hd = _c.HeadDim;
            var k = new Cache();
            var h = k.Held;
            k.N1 = h.Keep(_norm1.Forward(x, out k.Norm1)); h.Keep(k.Norm1);
            k.Q = h.Keep(Linear.Forward(b, k.N1, Slice(_qkvW, 0), _qkvB?.Value.SliceRows(0, cv)));
            k.K = h.Keep(Linear.Forward(b, k.N1, Slice(_qkvW, 1), _qkvB?.Value.SliceRows(cv, cv)));
            k.V = h.Keep(Linear.Forward(b, k.N1, Slice(_qkvW, 2), _qkvB?.Value.SliceRows(2 * cv, cv)));
            if (_qNorm is not null)
            {
                // QK-norm over the full width (all heads together), before splitting into heads.
                k.Qn = h.Keep(_qNorm.Forward(k.Q, out var qc)); k.QNorm = h.Keep(qc);
                k.Kn = h.Keep(_kNorm!.Forward(k.K, out var kc)); k.KNorm = h.Keep(kc);
            }
            else { k.Qn = k.Q; k.Kn = k.K; }
            k.A = h.Keep(b.Activations(t, cv));
            k.Lse = h.Keep(b.Allocate(DType.F32, t, heads));
            b.AttentionForward(k.Qn.Reshape(t, heads, hd), k.Kn.Reshape(t, heads, hd), k.V.Reshape(t, heads, hd), tiles,
                k.A.Reshape(t, heads, hd), k.Lse, 1f / MathF.Sqrt(hd), causal: false);
            k.P = h.Keep(_proj.Forward(k.A));
            k.H1 = h.Keep(b.Activations(t, cv));
            b.ScaleColumns(k.P, _ls1.Value, k.H1);
            b.Add(k.H1, k.H1, x);
            k.N2 = h.Keep(_norm2.Forward(k.H1, out k.Norm2)); h.Keep(k.Norm2);
            k.F1 = h.Keep(_fc1.Forward(k.N2));
            k.G = h.Keep(b.Activations(t, _c.IntermediateSize));
            b.GeluForward(k.F1, k.G, GeluApproximation.Erf);
            k.F2 = h.Keep(_fc2.Forward(k.G));
            var y = b.Activations(t, cv);
            b.ScaleColumns(k.F2, _ls2.Value, y);
            b.Add(y, y, k.H1);
            cache = k;
            return y;
        }

        public Tensor Backward(Tensor dy, Tensor x, PackedSequences tiles, Cache k)
        {
            var b = _b;
            int t = x.Rows, cv = _c.HiddenSize, heads = _c.NumHeads, hd = _c.HeadDim;
            using var held = new Activations();
            // MLP branch: y = h1 + ls2 * fc2(gelu(fc1(norm2(h1)))).
            if (_ls2.Grad is not null) b.ScaleColumnsBackward(dy, k.F2, _ls2.Grad, accumulate: true);
            var df2 = held.Keep(b.Activations(t, cv));
            b.ScaleColumns(dy, _ls2.Value, df2);
            var dg = held.Keep(_fc2.Backward(df2, k.G)!);
            var df1 = held.Keep(b.Activations(t, _c.IntermediateSize));
            b.GeluBackward(dg, k.F1, df1, GeluApproximation.Erf);
            var dn2 = held.Keep(_fc1.Backward(df1, k.N2)!);
            var dh1 = held.Keep(_norm2.Backward(dn2, k.H1, k.Norm2));
            b.Add(dh1, dh1, dy);

            // Attention branch: h1 = x + ls1 * proj(attn(q, k, v)).
            if (_ls1.Grad is not null) b.ScaleColumnsBackward(dh1, k.P, _ls1.Grad, accumulate: true);
            var dp = held.Keep(b.Activations(t, cv));
            b.ScaleColumns(dh1, _ls1.Value, dp);
            var da = held.Keep(_proj.Backward(dp, k.A)!);
            var dqn = held.Keep(b.Activations(t, cv));
            var dkn = held.Keep(b.Activations(t, cv));
            var dv = held.Keep(b.Activations(t, cv));
            b.AttentionBackward(da.Reshape(t, heads, hd), k.Qn.Reshape(t, heads, hd), k.Kn.Reshape(t, heads, hd), k.V.Reshape(t, heads, hd),
                k.A.Reshape(t, heads, hd), k.Lse, tiles, dqn.Reshape(t, heads, hd), dkn.Reshape(t, heads, hd), dv.Reshape(t, heads, hd),
                1f / MathF.Sqrt(hd), causal: false);
            var dq = _qNorm is null ? dqn : held.Keep(_qNorm.Backward(dqn, k.Q, k.QNorm!));
            var dk = _kNorm is null ? dkn : held.Keep(_kNorm.Backward(dkn, k.K, k.KNorm!));

            var dn1 = held.Keep(Linear.Backward(b, dq, k.N1, Slice(_qkvW, 0), SliceGrad(_qkvW, 0), SliceGrad(_qkvB, 0), true)!);
            using (var dn1k = Linear.Backward(b, dk, k.N1, Slice(_qkvW, 1), SliceGrad(_qkvW, 1), SliceGrad(_qkvB, 1), true)!) b.Add(dn1, dn1, dn1k);
            using (var dn1v = Linear.Backward(b, dv, k.N1, Slice(_qkvW, 2), SliceGrad(_qkvW, 2), SliceGrad(_qkvB, 2), true)!) b.Add(dn1, dn1, dn1v);
            var dx = _norm1.Backward(dn1, x, k.Norm1);
            b.Add(dx, dx, dh1);
            return dx;
        }
    }
}
