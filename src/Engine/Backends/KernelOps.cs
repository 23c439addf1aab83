using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Backends;

/// <summary>The shapes `engine bench kernels` times at: activation rows, widths, vocabulary, attention and decode.</summary>
public sealed record BenchShapes(int Rows, int Hidden, int Intermediate, int Vocabulary, int Heads, int KvHeads, int HeadDim, int SequenceLength,
    int DecodeContext, int[] DecodeBatches, int LossRows, int LossVocabulary, long AdamValues)
{
    /// <summary>R1V2-38B's decoder (QwQ-32B): 5120 wide, 27648 MLP, 40/8 heads of 128, 152064 tokens; 8k rows.</summary>
    public static readonly BenchShapes Model38B = new(8192, 5120, 27648, 152064, 40, 8, 128, 4096, 4096, [1, 16, 64], 8192, 152064, 64L << 20);

    /// <summary>Tiny shapes that run every op in milliseconds on the CPU (the op list's own test).</summary>
    public static readonly BenchShapes Tiny = new(24, 64, 96, 300, 4, 2, 64, 16, 40, [1, 3], 12, 300, 1000);
}

/// <summary>One op the benchmark launches: its name, shape, bytes moved and FLOPs (the roofline's terms), and the launch.</summary>
public sealed class KernelOp(string name, string shape, DType dtype, double bytes, double flops, Action launch, params IDisposable[] owned) : IDisposable
{
    public string Name { get; } = name;
    public string Shape { get; } = shape;
    public DType DType { get; } = dtype;
    public double Bytes { get; } = bytes;
    public double Flops { get; } = flops;
    public Action Launch { get; } = launch;

    /// <summary>Whether the benchmark reports the op's peak memory beside its time (the loss ops: fused against [T, V]).</summary>
    public bool ReportsPeak { get; init; }

    public void Dispose()
    {
        foreach (var o in owned) o.Dispose();
    }
}

/// <summary>
/// Every kernel the engine launches, forward and backward, as ops with their inputs on a backend: the norms with their
/// weight and bias gradients, bias gradients, element-wise ops, RoPE, softmax, embedding forward and backward, cross
/// entropy, attention forward and backward in both schedules, decode attention at several batch sizes over a long
/// context, the fused GRPO loss against an unfused [T, V] one, AdamW, the gradient norm and the GEMMs. The CUDA
/// benchmark times them; the CPU runs them at tiny shapes in a test, so every call here is known to be well formed.
/// Inputs hold zeros (the allocator's) except where an op needs valid ids or positive values.
/// </summary>
public static class KernelOps
{
    public static IEnumerable<KernelOp> All(Backend b, BenchShapes s, DType t)
    {
        int T = s.Rows, C = s.Hidden, F = s.Intermediate, e = t.Size();
        string tc = $"[{T}, {C}]";
        {
            var x = b.Allocate(t, T, C); var w = b.Allocate(t, C); var y = b.Allocate(t, T, C); var r = b.Allocate(DType.F32, T); var m = b.Allocate(DType.F32, T);
            var dw = b.Allocate(DType.F32, C); var db = b.Allocate(DType.F32, C);
            b.Zero(x); b.Zero(w);
            yield return new KernelOp("rmsnorm_forward", tc, t, 2.0 * T * C * e, 0, () => b.RmsNormForward(x, w, y, r, 1e-6f));
            yield return new KernelOp("rmsnorm_backward (dx)", tc, t, 3.0 * T * C * e, 0, () => b.RmsNormBackward(y, x, w, r, y, null, false));
            yield return new KernelOp("rmsnorm_backward (dx + weight gradient)", tc, t, 3.0 * T * C * e, 0, () => b.RmsNormBackward(y, x, w, r, y, dw, false));
            yield return new KernelOp("layernorm_forward", tc, t, 2.0 * T * C * e, 0, () => b.LayerNormForward(x, w, w, y, m, r, 1e-6f));
            yield return new KernelOp("layernorm_backward (dx + weight and bias gradients)", tc, t, 3.0 * T * C * e, 0,
                () => b.LayerNormBackward(y, x, w, m, r, y, dw, db, false));
            yield return new KernelOp("bias_backward", tc, t, 1.0 * T * C * e, 0, () => b.BiasBackward(x, db, false));
            yield return new KernelOp("axpby (residual add)", tc, t, 3.0 * T * C * e, 0, () => b.Add(y, x, y));
            yield return new KernelOp("gelu_forward", tc, t, 2.0 * T * C * e, 0, () => b.GeluForward(x, y, GeluApproximation.Erf));
            yield return new KernelOp("gelu_backward", tc, t, 3.0 * T * C * e, 0, () => b.GeluBackward(y, x, y, GeluApproximation.Erf));
            yield return new KernelOp("softmax_forward", tc, t, 2.0 * T * C * e, 0, () => b.SoftmaxForward(x, y));
            yield return new KernelOp("softmax_backward", tc, t, 3.0 * T * C * e, 0, () => b.SoftmaxBackward(y, x, y), x, w, y, r, m, dw, db);
        }
        {
            var g = b.Allocate(t, T, F); var u = b.Allocate(t, T, F); var y = b.Allocate(t, T, F);
            b.Zero(g); b.Zero(u);
            yield return new KernelOp("swiglu_forward", $"[{T}, {F}]", t, 3.0 * T * F * e, 0, () => b.SwiGluForward(g, u, y));
            yield return new KernelOp("swiglu_backward", $"[{T}, {F}]", t, 5.0 * T * F * e, 0, () => b.SwiGluBackward(y, g, u, g, u), g, u, y);
        }
        {
            int H = s.Heads, D = s.HeadDim;
            var q = b.Allocate(t, T, H, D); var pos = b.FromArray(Enumerable.Range(0, T).ToArray(), [T]);
            b.Zero(q);
            yield return new KernelOp("rope_forward", $"[{T}, {H}, {D}]", t, 2.0 * T * H * D * e, 0, () => b.RopeForward(q, pos, q, 1e6f, b.RopeTable(1e6f, D, T)));
            yield return new KernelOp("rope_backward", $"[{T}, {H}, {D}]", t, 2.0 * T * H * D * e, 0, () => b.RopeBackward(q, pos, q, 1e6f, b.RopeTable(1e6f, D, T)), q, pos);
        }
        {
            int V = s.Vocabulary, rows = Math.Min(T, 2048);
            var logits = b.Allocate(t, rows, V); var tgt = b.FromArray(Enumerable.Range(0, rows).Select(i => i % V).ToArray(), [rows]);
            var lp = b.Allocate(DType.F32, rows); var lse = b.Allocate(DType.F32, rows);
            b.Zero(logits); b.Zero(lp);
            yield return new KernelOp("cross_entropy_forward", $"[{rows}, {V}]", t, 1.0 * rows * V * e, 0, () => b.CrossEntropyForward(logits, tgt, lp, lse));
            yield return new KernelOp("cross_entropy_backward", $"[{rows}, {V}]", t, 2.0 * rows * V * e, 0, () => b.CrossEntropyBackward(logits, tgt, lse, lp, logits),
                logits, tgt, lp, lse);
        }
        {
            int V = s.Vocabulary;
            var table = b.Allocate(t, V, C); var ids = b.FromArray(Enumerable.Range(0, T).Select(i => i * 7919 % V).ToArray(), [T]);
            var o = b.Allocate(t, T, C); var dtable = b.Allocate(DType.F32, V, C);
            b.Zero(table); b.Zero(o);
            yield return new KernelOp("embedding_forward", $"[{T}] x [{V}, {C}]", t, 2.0 * T * C * e, 0, () => b.EmbeddingForward(table, ids, o));
            yield return new KernelOp("embedding_backward", $"[{T}] x [{V}, {C}]", t, 1.0 * T * C * (e + 8), 0, () => b.EmbeddingBackward(o, ids, dtable), table, ids, o, dtable);
        }
        foreach (var op in Attention(b, s, t)) yield return op;
        foreach (var op in Decode(b, s, t)) yield return op;
        foreach (var op in GrpoLoss(b, s, t)) yield return op;
        {
            long n = s.AdamValues;
            var p = b.Allocate(DType.F32, (int)n); var g = b.Allocate(DType.F32, (int)n); var m1 = b.Allocate(DType.F32, (int)n);
            var v1 = b.Allocate(DType.F32, (int)n); var c = b.Allocate(t, (int)n);
            b.Zero(p); b.Zero(g); b.Zero(m1); b.Zero(v1);
            yield return new KernelOp("adamw_update", $"[{n}]", DType.F32, n * (4.0 * 4 + 3 * 4 + e), 0, () => b.AdamW(p, g, m1, v1, t == DType.F32 ? null : c, new AdamWSettings(1e-4f), 1));
            yield return new KernelOp("grad_norm", $"[{n}]", DType.F32, n * 4.0, 0, () => b.GlobalNorm([g]), p, g, m1, v1, c);
        }
        {
            // The same values as one decoder layer's parameters would hold them: nine tensors of the layer's proportions
            // (q, k, v, o, gate, up, down, two norms), all updated by one multi-tensor launch.
            long n = s.AdamValues;
            double[] shares = [C * (double)C, C * (double)C / 4, C * (double)C / 4, C * (double)C, C * (double)F, C * (double)F, C * (double)F, C, C];
            double total = shares.Sum();
            var sizes = shares.Select(x => (int)Math.Max(1, x / total * n)).ToArray();
            var parts = sizes.Select(k => (P: b.Allocate(DType.F32, k), G: b.Allocate(DType.F32, k), M: b.Allocate(DType.F32, k), V: b.Allocate(DType.F32, k), C: b.Allocate(t, k))).ToList();
            foreach (var x in parts) { b.Zero(x.P); b.Zero(x.G); b.Zero(x.M); b.Zero(x.V); }
            var items = parts.Select(x => new AdamWTensors(x.P, x.G, x.M, x.V, t == DType.F32 ? null : x.C)).ToList();
            long all = sizes.Sum(k => (long)k);
            yield return new KernelOp("adamw_multi (9 tensors, one launch)", $"[{all}]", DType.F32, all * (4.0 * 4 + 3 * 4 + e), 0,
                () => b.AdamW(items, new AdamWSettings(1e-4f), 1), [.. parts.SelectMany(x => new[] { x.P, x.G, x.M, x.V, x.C })]);
        }
        foreach (var (m, n, k) in new[] { (T, C, C), (T, F, C), (T, C, F) })
        {
            var a = b.Allocate(t, m, k); var w = b.Allocate(t, n, k); var c = b.Allocate(t, m, n);
            b.Zero(a); b.Zero(w);
            yield return new KernelOp("gemm (x W^T)", $"{m}x{n}x{k}", t, e * (m * (double)k + n * (double)k + m * (double)n), 2.0 * m * n * k, () => b.Gemm(a, false, w, true, c), a, w, c);
        }
    }

    /// <summary>Attention forward and backward over two packed causal sequences, in every schedule (row-wise, tiled, flash).</summary>
    private static IEnumerable<KernelOp> Attention(Backend b, BenchShapes s, DType t)
    {
        int L = s.SequenceLength, H = s.Heads, KV = s.KvHeads, D = s.HeadDim, e = t.Size();
        var seq = b.Sequences([0, L, 2 * L]);
        var q = b.Allocate(t, 2 * L, H, D); var k = b.Allocate(t, 2 * L, KV, D); var v = b.Allocate(t, 2 * L, KV, D);
        var o = b.Allocate(t, 2 * L, H, D); var lse = b.Allocate(DType.F32, 2 * L, H);
        var dq = b.Allocate(t, 2 * L, H, D); var dk = b.Allocate(t, 2 * L, KV, D); var dv = b.Allocate(t, 2 * L, KV, D);
        b.Zero(q); b.Zero(k); b.Zero(v); b.Zero(o);
        double flops = 2 * 4.0 * L * (double)L / 2 * D * H;   // QK^T and PV, the causal half
        double bytes = 2.0 * e * L * (H + 2 * KV + H) * D;
        string shape = $"2 x {L} causal, H {H}/{KV}, D {D}";
        float scale = 1f / MathF.Sqrt(D);
        var variants = new List<AttentionVariant> { AttentionVariant.RowWise };
        if (Backend.TiledHeadDims.Contains(D)) variants.AddRange([AttentionVariant.Tiled, AttentionVariant.Flash]);
        IDisposable[] inputs = [seq, q, k, v, o, lse, dq, dk, dv];
        foreach (var variant in variants)
        {
            yield return new KernelOp($"attention_forward ({variant})", shape, t, bytes, flops, () => With(b, variant, () => b.AttentionForward(q, k, v, seq, o, lse, scale, true)));
            // The last op owns the inputs (disposed once the benchmark is through with it).
            yield return new KernelOp($"attention_backward ({variant})", shape, t, 2 * bytes, 2.5 * flops,
                () => With(b, variant, () => b.AttentionBackward(o, q, k, v, o, lse, seq, dq, dk, dv, scale, true)), variant == variants[^1] ? inputs : []);
        }
    }

    /// <summary>The pool's peak while <paramref name="op"/> runs once, above what was in use before it (the loss ops' memory figure).</summary>
    public static long PeakBytes(Backend b, KernelOp op)
    {
        b.Synchronize();
        long before = b.Memory.BytesInUse;
        b.ResetPeakMemory();
        op.Launch();
        b.Synchronize();
        return b.Memory.PeakBytesInUse - before;
    }

    private static void With(Backend b, AttentionVariant variant, Action run)
    {
        var before = b.Attention;
        b.Attention = variant;
        try { run(); }
        finally { b.Attention = before; }
    }

    /// <summary>Decode attention, one new token per sequence over <see cref="BenchShapes.DecodeContext"/> cached tokens, at each batch size.</summary>
    private static IEnumerable<KernelOp> Decode(Backend b, BenchShapes s, DType t)
    {
        const int block = 16;
        int H = s.Heads, KV = s.KvHeads, D = s.HeadDim, ctx = s.DecodeContext, e = t.Size();
        int perSeq = (ctx + block - 1) / block;
        foreach (int batch in s.DecodeBatches)
        {
            int blocks = batch * perSeq;
            var kc = b.Allocate(t, blocks * block, KV, D); var vc = b.Allocate(t, blocks * block, KV, D);
            var q = b.Allocate(t, batch, H, D); var o = b.Allocate(t, batch, H, D);
            b.Zero(kc); b.Zero(vc); b.Zero(q);
            var tables = Enumerable.Range(0, batch).Select(i => (IReadOnlyList<int>)Enumerable.Range(i * perSeq, perSeq).ToArray()).ToList();
            var paged = b.Paged(tables, Enumerable.Repeat(ctx, batch).ToArray(), block, blocks);
            double bytes = 2.0 * e * batch * ctx * KV * D + 2.0 * e * batch * H * D;
            yield return new KernelOp($"paged_attention_decode (batch {batch})", $"{batch} x {ctx} context, H {H}/{KV}, D {D}", t, bytes, 4.0 * batch * ctx * H * D,
                () => b.PagedAttentionDecode(q, kc, vc, paged, o, 1f / MathF.Sqrt(D), 8), kc, vc, q, o, paged);
        }
    }

    /// <summary>
    /// The fused GRPO loss (chunked LM head: pass 1 and the token loss; never [T, V]) against the unfused one that makes
    /// [T, V] fp32 logits, at <see cref="BenchShapes.LossRows"/> x <see cref="BenchShapes.LossVocabulary"/>; their peak
    /// memory is the benchmark's other figure (<see cref="PeakBytes"/>).
    /// </summary>
    private static IEnumerable<KernelOp> GrpoLoss(Backend b, BenchShapes s, DType t)
    {
        int R = s.LossRows, V = s.LossVocabulary, C = s.Hidden, e = t.Size();
        int chunk = Math.Min(8192, Math.Max(1, V / 4));   // the engine's chunk; a quarter of a tiny vocabulary
        var hidden = b.Allocate(t, R, C); var head = b.Allocate(t, V, C);
        var targets = b.FromArray(Enumerable.Range(0, R).Select(i => i * 7919 % V).ToArray(), [R]);
        var m = b.Allocate(DType.F32, R); var sum = b.Allocate(DType.F32, R); var tl = b.Allocate(DType.F32, R);
        var start = b.FromArray(Enumerable.Repeat(float.NegativeInfinity, R).ToArray(), DType.F32, [R]);
        b.Zero(hidden); b.Zero(head);
        double flops = 2.0 * R * V * C;
        yield return new KernelOp("fused GRPO loss, pass 1 (chunked LM head + log-sum-exp)", $"[{R}, {C}] x [{V}, {C}], chunk {Math.Min(chunk, V)}", t,
            e * ((double)V * C + (double)R * C), flops, () =>
            {
                b.Convert(start, m);
                b.Zero(sum);
                for (int c0 = 0; c0 < V; c0 += chunk)
                {
                    using var logits = Layers.Linear.ForwardF32(b, hidden, head.SliceRows(c0, Math.Min(chunk, V - c0)));
                    b.ChunkLseUpdate(logits, targets, c0, 1f, m, sum, tl);
                }
            }) { ReportsPeak = true };
        yield return new KernelOp("unfused loss ([T, V] fp32 logits + cross entropy)", $"[{R}, {V}]", t, e * ((double)V * C + (double)R * C) + 8.0 * R * V, flops, () =>
            {
                using var logits = Layers.Linear.ForwardF32(b, hidden, head);
                using var lp = b.Allocate(DType.F32, R);
                using var lse = b.Allocate(DType.F32, R);
                b.CrossEntropyForward(logits, targets, lp, lse);
            }, hidden, head, targets, m, sum, tl, start) { ReportsPeak = true };
    }
}
