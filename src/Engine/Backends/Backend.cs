using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Backends;

public enum GeluApproximation { Erf = 0, Tanh = 1 }

/// <summary>
/// Attention schedule. RowWise: one warp per (query, head) walking the keys (any head dim up to 256, fp32 or bf16).
/// Tiled: tensor cores with 64-row tiles (mma.sync, 32-64 keys per tile; dq and dk/dv in two passes, 7 matmuls).
/// Flash: the FlashAttention-2 class schedule (128 x 64 forward tiles, ldmatrix and cp.async pipelines; a one-pass
/// backward of 5 matmuls with dq summed over fixed splits). Tiled and Flash take bf16 storage and head dims 64, 80, 96,
/// 128 and round P and dS to bf16 where they enter an mma; their CPU twins run the same schedule and rounding. Every
/// backward is deterministic (no atomics). Auto (the default): Flash wherever the backend runs it natively (CUDA, bf16,
/// those head dims, 16-byte aligned rows), RowWise elsewhere (fp32, other head dims, the CPU).
/// </summary>
public enum AttentionVariant { Auto, RowWise, Tiled, Flash }

/// <summary>
/// The KL estimator of the loss term, with d = log pi_ref - log pi on the policy's own samples: k2 = d^2 / 2 (gradient: an
/// unbiased estimate of the gradient of KL(pi || ref)), k3 = exp(d) - d - 1 (low variance, gradient follows KL(ref || pi)).
/// k1 = -d is no loss term (zero expected gradient): the trainer subtracts it from the reward instead.
/// </summary>
public enum KlEstimator { None = 0, K2 = 2, K3 = 3 }

/// <summary>
/// The per-token GRPO objective: PPO clip with separate lower and upper epsilons, optional dual clip (c > 1 bounds
/// the loss of negative-advantage tokens by -c A), and a KL penalty to the reference (k2, or k3 clamped to [-10, 10]).
/// Logits are divided by <see cref="Temperature"/> (the sampling temperature) before the softmax.
/// </summary>
public sealed record GrpoLossSettings(float EpsLow = 0.2f, float EpsHigh = 0.2f, float DualClip = 0f, float KlCoef = 0f, KlEstimator Kl = KlEstimator.None,
    float Temperature = 1f);

/// <summary>One parameter's tensors for a multi-tensor AdamW step: fp32 master, gradient and moments, optional bf16 working copy.</summary>
public readonly record struct AdamWTensors(Tensor Master, Tensor Grad, Tensor M, Tensor V, Tensor? WorkingCopy);

/// <summary>AdamW hyper-parameters for one update.</summary>
public readonly record struct AdamWSettings(float LearningRate, float Beta1 = 0.9f, float Beta2 = 0.999f, float Epsilon = 1e-8f, float WeightDecay = 0.0f);

/// <summary>
/// The seam between what to compute and where. Model and trainer code call these ops; the CUDA backend runs NVRTC
/// kernels and cuBLAS, the CPU backend runs the ILGPU twins and SIMD C# GEMMs. Every public op checks shapes and
/// dtypes here, once, with an error that names the op and the tensor, then calls the backend's core.
/// Shape names: T rows (tokens), C columns (hidden), V vocabulary, H heads, D head dim.
/// </summary>
public abstract class Backend : IDisposable
{
    public abstract string Name { get; }

    /// <summary>Storage type of activations and working weights: bf16 on CUDA, fp32 on the CPU.</summary>
    public abstract DType ActivationType { get; }

    public abstract MemoryStats Memory { get; }

    /// <summary>Restarts the peak of <see cref="Memory"/> from the bytes in use now (to measure one phase's peak).</summary>
    public abstract void ResetPeakMemory();

    /// <summary>Frozen parameters loaded from checkpoints, each held once on this device whoever loads it (<see cref="Layers.SharedFrozenParameters"/>).</summary>
    public Layers.SharedFrozenParameters Frozen { get; } = new();

    /// <summary>
    /// Per-op wall time, when enabled: every op synchronizes before and after, so the times are the op's own (and the
    /// whole run is slower). Null when off, which costs one null check per op.
    /// </summary>
    public OpProfile? Profile { get; private set; }

    public OpProfile StartProfiling() => Profile = new OpProfile();

    public void StopProfiling() => Profile = null;

    private OpProfile.Scope Profiled(string op)
    {
        bool staged = StagesOps;
        if (Profile is null && !staged) return default;
        if (staged) _opDepth++;
        if (Profile is not null) Synchronize();
        return new OpProfile.Scope(this, Profile, op, staged);
    }

    private int _opDepth;

    /// <summary>Whether an op is running (the staged backends' storage is held in per-op buffers while it is).</summary>
    protected bool InOp => _opDepth > 0;

    /// <summary>
    /// Backends that stage storage per op (the CPU backend's bf16 storage: bf16 tensors are widened to fp32 buffers when
    /// an op reads them and rounded back when it ends) say so here; every public op is then bracketed, the outermost
    /// one ending with <see cref="OpFinished"/>.
    /// </summary>
    protected virtual bool StagesOps => false;

    protected virtual void OpFinished() { }

    internal void EndOp()
    {
        if (--_opDepth == 0) OpFinished();
    }

    // ---- memory ------------------------------------------------------------------------------------------

    /// <summary>A zero-filled tensor from the pool.</summary>
    public Tensor Allocate(DType dtype, int[] shape, string? name = null)
    {
        CheckSupported(dtype);
        long bytes = Tensor.ShapeLength(shape) * dtype.Size();
        var block = RentBlock(bytes);
        var t = new Tensor(this, block, dtype, (int[])shape.Clone(), 0, owner: true, name);
        Zero(t);
        return t;
    }

    public Tensor Allocate(DType dtype, params int[] shape) => Allocate(dtype, shape, null);

    /// <summary>A tensor of the activation type with the given shape.</summary>
    public Tensor Activations(params int[] shape) => Allocate(ActivationType, shape, null);

    public Tensor FromArray(ReadOnlySpan<float> data, DType dtype, int[] shape, string? name = null)
    {
        var t = Allocate(dtype, shape, name);
        Upload(t, data);
        return t;
    }

    public Tensor FromArray(ReadOnlySpan<int> data, int[] shape, string? name = null)
    {
        var t = Allocate(DType.I32, shape, name);
        Upload(t, data);
        return t;
    }

    public void Upload(Tensor t, ReadOnlySpan<float> data)
    {
        Own(t, "upload");
        if (t.DType == DType.I32) throw new ArgumentException($"upload: {t} holds int32; pass int data");
        if (data.Length != t.Length) throw new ArgumentException($"upload: {t} has {t.Length} elements, data has {data.Length}");
        UploadFloats(t, data);
    }

    /// <summary>A slice of a tensor's stored bytes (a memory-mapped checkpoint): <paramref name="count"/> bytes from <paramref name="offset"/>.</summary>
    public delegate ReadOnlySpan<byte> StoredBytes(long offset, int count);

    /// <summary>Elements per slice of <see cref="UploadStored"/>'s conversions (4 MB of fp32).</summary>
    public const int UploadSlice = 1 << 20;

    /// <summary>
    /// Uploads <paramref name="elements"/> stored values of <paramref name="sourceDType"/> (F32, BF16 or F16, as a
    /// checkpoint holds them) into <paramref name="t"/> (F32 or BF16). Bytes already in t's type go straight from
    /// the source (a memory-mapped file) to the device; a conversion runs slice by slice through one staging buffer
    /// of at most <see cref="UploadSlice"/> elements: the host never holds the tensor.
    /// </summary>
    public void UploadStored(Tensor t, string sourceDType, long elements, StoredBytes source)
    {
        Own(t, "upload");
        if (t.DType == DType.I32) throw new ArgumentException($"upload: {t} holds int32");
        if (elements != t.Length) throw new ArgumentException($"upload: {t} has {t.Length} elements, the source {elements}");
        int size = sourceDType switch { "F32" => 4, "BF16" or "F16" => 2, _ => throw new ArgumentException($"upload: stored type {sourceDType}; expected F32, BF16 or F16") };
        bool direct = (sourceDType == "F32" && t.DType == DType.F32) || (sourceDType == "BF16" && t.DType == DType.BF16);
        if (direct) { UploadSlices(t, sourceDType, elements, source, size, true, null, null); return; }
        lock (_staging)
        {
            _staging.Floats ??= new float[UploadSlice];   // one slice per backend, reused from tensor to tensor
            if (t.DType == DType.BF16) _staging.Bits ??= new ushort[UploadSlice];
            UploadSlices(t, sourceDType, elements, source, size, false, _staging.Floats, t.DType == DType.BF16 ? _staging.Bits : null);
        }
    }

    private sealed class Staging
    {
        public float[]? Floats;
        public ushort[]? Bits;
    }

    private readonly Staging _staging = new();

    private void UploadSlices(Tensor t, string sourceDType, long elements, StoredBytes source, int size, bool direct, float[]? staging, ushort[]? bits)
    {
        int target = t.DType.Size();
        for (long at = 0; at < elements; at += UploadSlice)
        {
            int n = (int)Math.Min(UploadSlice, elements - at);
            var bytes = source(at * size, n * size);
            if (direct) { UploadBytesCore(t, at * target, bytes); continue; }
            var f = staging!.AsSpan(0, n);
            Checkpoints.SafetensorsFile.Decode(bytes, sourceDType, f);
            if (bits is null) { UploadBytesCore(t, at * target, System.Runtime.InteropServices.MemoryMarshal.AsBytes(f)); continue; }
            for (int i = 0; i < n; i++) bits[i] = BFloat16.FromFloat(f[i]);
            UploadBytesCore(t, at * target, System.Runtime.InteropServices.MemoryMarshal.AsBytes(bits.AsSpan(0, n)));
        }
    }

    /// <summary>Copies raw bytes (already in the tensor's type) into <paramref name="t"/> from byte <paramref name="byteOffset"/> on.</summary>
    protected abstract void UploadBytesCore(Tensor t, long byteOffset, ReadOnlySpan<byte> bytes);

    public void Upload(Tensor t, ReadOnlySpan<int> data)
    {
        Own(t, "upload");
        if (t.DType != DType.I32) throw new ArgumentException($"upload: {t} is not int32");
        if (data.Length != t.Length) throw new ArgumentException($"upload: {t} has {t.Length} elements, data has {data.Length}");
        UploadInts(t, data);
    }

    internal float[] DownloadFloats(Tensor t)
    {
        Own(t, "download");
        if (t.DType == DType.I32) throw new ArgumentException($"download: {t} holds int32");
        return DownloadFloatsCore(t);
    }

    internal int[] DownloadInts(Tensor t)
    {
        Own(t, "download");
        if (t.DType != DType.I32) throw new ArgumentException($"download: {t} is not int32");
        return DownloadIntsCore(t);
    }

    public abstract void Zero(Tensor t);
    public abstract void Synchronize();

    protected abstract DeviceBlock RentBlock(long bytes);
    internal abstract void Release(DeviceBlock block);
    protected abstract void UploadFloats(Tensor t, ReadOnlySpan<float> data);
    protected abstract void UploadInts(Tensor t, ReadOnlySpan<int> data);
    protected abstract float[] DownloadFloatsCore(Tensor t);
    protected abstract int[] DownloadIntsCore(Tensor t);

    /// <summary>Throws when this backend cannot store <paramref name="dtype"/>.</summary>
    protected virtual void CheckSupported(DType dtype) { }

    // ---- GEMM ------------------------------------------------------------------------------------------

    /// <summary>
    /// c = alpha * op(a) @ op(b) + beta * c (+ bias[N] on every row). 2-D: a [M, K] ([K, M] if transA), b [K, N]
    /// ([N, K] if transB), c [M, N]. 3-D: the same per batch, all three [B, ..]. a and b share a dtype; c may be fp32
    /// when they are bf16 (weight gradients). Accumulation is fp32.
    /// </summary>
    public void Gemm(Tensor a, bool transA, Tensor b, bool transB, Tensor c, Tensor? bias = null, float alpha = 1f, float beta = 0f)
    {
        Own(a, "gemm"); Own(b, "gemm"); Own(c, "gemm");
        if (a.Rank != c.Rank || b.Rank != c.Rank || c.Rank is not (2 or 3))
            throw new ArgumentException($"gemm: a {a.ShapeString}, b {b.ShapeString} and c {c.ShapeString} must all be 2-D or all 3-D");
        int batch = c.Rank == 3 ? c.Dim(0) : 1;
        if (c.Rank == 3 && (a.Dim(0) != batch || b.Dim(0) != batch))
            throw new ArgumentException($"gemm: batch sizes differ: a {a.ShapeString}, b {b.ShapeString}, c {c.ShapeString}");
        int m = transA ? a.Dim(-1) : a.Dim(-2), k = transA ? a.Dim(-2) : a.Dim(-1);
        int kb = transB ? b.Dim(-1) : b.Dim(-2), n = transB ? b.Dim(-2) : b.Dim(-1);
        if (k != kb) throw new ArgumentException($"gemm: inner dimensions differ: op(a) is [{m}, {k}] (a {a.ShapeString}, transA={transA}), op(b) is [{kb}, {n}] (b {b.ShapeString}, transB={transB})");
        if (c.Dim(-2) != m || c.Dim(-1) != n) throw new ArgumentException($"gemm: c is {c.ShapeString}, expected [{m}, {n}]");
        if (a.DType != b.DType || a.DType == DType.I32) throw new ArgumentException($"gemm: a is {a.DType.Name()}, b is {b.DType.Name()}; both must be the same float type");
        if (c.DType != a.DType && c.DType != DType.F32) throw new ArgumentException($"gemm: c is {c.DType.Name()}; expected {a.DType.Name()} or fp32");
        if (bias is not null)
        {
            Own(bias, "gemm");
            if (bias.Length != n || bias.DType != c.DType) throw new ArgumentException($"gemm: bias is {bias}, expected [{n}] {c.DType.Name()}");
        }
        if ((long)batch * m * n == 0) return;
        if (k == 0) throw new ArgumentException($"gemm: the inner dimension of a {a.ShapeString} and b {b.ShapeString} is 0");
        using (Profiled("gemm")) GemmCore(a, transA, b, transB, c, bias, alpha, beta, batch, m, n, k);
    }

    protected abstract void GemmCore(Tensor a, bool transA, Tensor b, bool transB, Tensor c, Tensor? bias, float alpha, float beta, int batch, int m, int n, int k);

    /// <summary>dbias[C] (+)= sum over rows of dy[.., C]. dbias is fp32.</summary>
    public void BiasBackward(Tensor dy, Tensor dbias, bool accumulate)
    {
        Float(dy, "bias_backward", "dy"); Fp32(dbias, "bias_backward", "dbias");
        Len(dbias, dy.Cols, "bias_backward", "dbias");
        using (Profiled("bias_backward")) BiasBackwardCore(dy, dbias, accumulate);
    }

    protected abstract void BiasBackwardCore(Tensor dy, Tensor dbias, bool accumulate);

    // ---- elementwise -----------------------------------------------------------------------------------

    /// <summary>output = alpha * a + beta * b (b may be null). Residual add, scale, and gradient accumulation (a == output).</summary>
    public void Axpby(Tensor output, Tensor a, Tensor? b, float alpha, float beta)
    {
        Float(output, "axpby", "output"); SameAs(a, output, "axpby", "a");
        if (b is not null) SameAs(b, output, "axpby", "b");
        using (Profiled("axpby")) AxpbyCore(output, a, b, alpha, beta);
    }

    public void Add(Tensor output, Tensor a, Tensor b) => Axpby(output, a, b, 1f, 1f);
    public void Scale(Tensor output, Tensor a, float s) => Axpby(output, a, null, s, 0f);

    protected abstract void AxpbyCore(Tensor output, Tensor a, Tensor? b, float alpha, float beta);

    /// <summary>Copies with dtype conversion (fp32 master weights to a bf16 working copy, and back).</summary>
    public void Convert(Tensor source, Tensor destination)
    {
        Own(source, "convert"); Own(destination, "convert");
        if (source.Length != destination.Length) throw new ArgumentException($"convert: {source} and {destination} differ in length");
        if (source.DType == DType.I32 || destination.DType == DType.I32) throw new ArgumentException("convert: float tensors only");
        using (Profiled("convert")) ConvertCore(source, destination);
    }

    protected abstract void ConvertCore(Tensor source, Tensor destination);

    // ---- norms -----------------------------------------------------------------------------------------

    /// <summary>y = w * x / sqrt(mean(x^2) + eps). x, y: [T, C]; w: [C]; rstd: [T] fp32, saved for backward.</summary>
    public void RmsNormForward(Tensor x, Tensor weight, Tensor y, Tensor rstd, float eps)
    {
        Float(x, "rmsnorm_forward", "x"); SameAs(y, x, "rmsnorm_forward", "y");
        Param(weight, x, "rmsnorm_forward", "weight"); Stat(rstd, x, "rmsnorm_forward", "rstd");
        using (Profiled("rms_norm_forward")) RmsNormForwardCore(x, weight, y, rstd, eps);
    }

    /// <summary>dx = d/dx, and dweight (+)= sum_t dy * x * rstd (fp32).</summary>
    public void RmsNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate)
    {
        Float(x, "rmsnorm_backward", "x"); SameAs(dy, x, "rmsnorm_backward", "dy"); SameAs(dx, x, "rmsnorm_backward", "dx");
        Param(weight, x, "rmsnorm_backward", "weight"); Stat(rstd, x, "rmsnorm_backward", "rstd");
        if (dweight is not null) { Fp32(dweight, "rmsnorm_backward", "dweight"); Len(dweight, x.Cols, "rmsnorm_backward", "dweight"); }
        using (Profiled("rms_norm_backward")) RmsNormBackwardCore(dy, x, weight, rstd, dx, dweight, accumulate);
    }

    protected abstract void RmsNormForwardCore(Tensor x, Tensor weight, Tensor y, Tensor rstd, float eps);
    protected abstract void RmsNormBackwardCore(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate);

    /// <summary>y = (x - mean) * rstd * w + b. x, y: [T, C]; w, b: [C] (b may be null); mean, rstd: [T] fp32.</summary>
    public void LayerNormForward(Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor mean, Tensor rstd, float eps)
    {
        Float(x, "layernorm_forward", "x"); SameAs(y, x, "layernorm_forward", "y");
        Param(weight, x, "layernorm_forward", "weight");
        if (bias is not null) Param(bias, x, "layernorm_forward", "bias");
        Stat(mean, x, "layernorm_forward", "mean"); Stat(rstd, x, "layernorm_forward", "rstd");
        using (Profiled("layer_norm_forward")) LayerNormForwardCore(x, weight, bias, y, mean, rstd, eps);
    }

    public void LayerNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dx, Tensor? dweight, Tensor? dbias, bool accumulate)
    {
        Float(x, "layernorm_backward", "x"); SameAs(dy, x, "layernorm_backward", "dy"); SameAs(dx, x, "layernorm_backward", "dx");
        Param(weight, x, "layernorm_backward", "weight");
        Stat(mean, x, "layernorm_backward", "mean"); Stat(rstd, x, "layernorm_backward", "rstd");
        if (dweight is not null) { Fp32(dweight, "layernorm_backward", "dweight"); Len(dweight, x.Cols, "layernorm_backward", "dweight"); }
        if (dbias is not null) { Fp32(dbias, "layernorm_backward", "dbias"); Len(dbias, x.Cols, "layernorm_backward", "dbias"); }
        if (dbias is not null && dweight is null) throw new ArgumentException("layernorm_backward: dbias needs dweight");
        using (Profiled("layer_norm_backward")) LayerNormBackwardCore(dy, x, weight, mean, rstd, dx, dweight, dbias, accumulate);
    }

    protected abstract void LayerNormForwardCore(Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor mean, Tensor rstd, float eps);
    protected abstract void LayerNormBackwardCore(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dx, Tensor? dweight, Tensor? dbias, bool accumulate);

    // ---- RoPE ------------------------------------------------------------------------------------------

    /// <summary>
    /// Qwen2 rotate-half RoPE. x, y: [T, H, D] (D even; y may be x); positions: [T] int32. With a <paramref name="table"/>
    /// (<see cref="RopeTable(float, int, int)"/>) the kernels read each position's cosines and sines from it; positions
    /// past it, or no table, compute them per pair as HF does.
    /// </summary>
    public void RopeForward(Tensor x, Tensor positions, Tensor y, float theta, RopeTable? table = null)
    {
        CheckRope(x, positions, y, "rope_forward", theta, table);
        using (Profiled("rope")) RopeCore(x, positions, y, theta, table, forward: true);
    }

    /// <summary>dx = rotation of dy by the negative angle.</summary>
    public void RopeBackward(Tensor dy, Tensor positions, Tensor dx, float theta, RopeTable? table = null)
    {
        CheckRope(dy, positions, dx, "rope_backward", theta, table);
        using (Profiled("rope")) RopeCore(dy, positions, dx, theta, table, forward: false);
    }

    private void CheckRope(Tensor x, Tensor positions, Tensor y, string op, float theta, RopeTable? table)
    {
        Float(x, op, "x"); SameAs(y, x, op, "y");
        if (x.Rank != 3 || x.Dim(2) % 2 != 0) throw new ArgumentException($"{op}: x is {x.ShapeString}, expected [T, H, D] with D even");
        Own(positions, op);
        if (positions.DType != DType.I32 || positions.Length != x.Dim(0)) throw new ArgumentException($"{op}: positions is {positions}, expected [{x.Dim(0)}] int32");
        if (!(theta > 1f)) throw new ArgumentException($"{op}: theta must be > 1, got {theta}");
        if (table is not null && (table.Theta != theta || table.Dim != x.Dim(2) || table.Backend != this))
            throw new ArgumentException($"{op}: the RoPE table is for theta {table.Theta} and head dim {table.Dim}{(table.Backend != this ? " on another backend" : "")}, the call has theta {theta} and head dim {x.Dim(2)}");
    }

    protected abstract void RopeCore(Tensor x, Tensor positions, Tensor y, float theta, RopeTable? table, bool forward);

    private readonly Dictionary<(float Theta, int Dim), RopeTable> _ropeTables = new();

    /// <summary>
    /// The cosines and sines of positions 0 .. <paramref name="positions"/>-1 for RoPE at this theta and head dim, made
    /// once per backend (a later call for more positions makes a larger one) and freed with the backend.
    /// </summary>
    public RopeTable RopeTable(float theta, int dim, int positions)
    {
        if (dim <= 0 || dim % 2 != 0) throw new ArgumentException($"rope table: head dim must be even and positive, got {dim}");
        if (positions < 0) throw new ArgumentException($"rope table: positions must be >= 0, got {positions}");
        lock (_ropeTables)
        {
            if (_ropeTables.TryGetValue((theta, dim), out var t) && t.Positions >= positions) return t;
            t?.Values.Dispose();
            var made = new RopeTable(this, theta, dim, positions, FromArray(Backends.RopeTable.Build(theta, dim, positions), DType.F32, [Math.Max(1, positions), dim / 2, 2], "rope_table"));
            _ropeTables[(theta, dim)] = made;
            return made;
        }
    }

    /// <summary>Frees the RoPE tables (the backend's only cached tensors); the next <see cref="RopeTable(float, int, int)"/> makes them again.</summary>
    public void ReleaseTables()
    {
        lock (_ropeTables)
        {
            foreach (var t in _ropeTables.Values) t.Values.Dispose();
            _ropeTables.Clear();
        }
    }

    // ---- activations -----------------------------------------------------------------------------------

    /// <summary>y = silu(gate) * up. gate, up, y: same shape.</summary>
    public void SwiGluForward(Tensor gate, Tensor up, Tensor y)
    {
        Float(gate, "swiglu_forward", "gate"); SameAs(up, gate, "swiglu_forward", "up"); SameAs(y, gate, "swiglu_forward", "y");
        using (Profiled("swiglu_forward")) SwiGluForwardCore(gate, up, y);
    }

    public void SwiGluBackward(Tensor dy, Tensor gate, Tensor up, Tensor dgate, Tensor dup)
    {
        Float(gate, "swiglu_backward", "gate");
        SameAs(up, gate, "swiglu_backward", "up"); SameAs(dy, gate, "swiglu_backward", "dy");
        SameAs(dgate, gate, "swiglu_backward", "dgate"); SameAs(dup, gate, "swiglu_backward", "dup");
        using (Profiled("swiglu_backward")) SwiGluBackwardCore(dy, gate, up, dgate, dup);
    }

    protected abstract void SwiGluForwardCore(Tensor gate, Tensor up, Tensor y);
    protected abstract void SwiGluBackwardCore(Tensor dy, Tensor gate, Tensor up, Tensor dgate, Tensor dup);

    public void GeluForward(Tensor x, Tensor y, GeluApproximation approximation)
    {
        Float(x, "gelu_forward", "x"); SameAs(y, x, "gelu_forward", "y");
        using (Profiled("gelu_forward")) GeluForwardCore(x, y, approximation);
    }

    public void GeluBackward(Tensor dy, Tensor x, Tensor dx, GeluApproximation approximation)
    {
        Float(x, "gelu_backward", "x"); SameAs(dy, x, "gelu_backward", "dy"); SameAs(dx, x, "gelu_backward", "dx");
        using (Profiled("gelu_backward")) GeluBackwardCore(dy, x, dx, approximation);
    }

    protected abstract void GeluForwardCore(Tensor x, Tensor y, GeluApproximation approximation);
    protected abstract void GeluBackwardCore(Tensor dy, Tensor x, Tensor dx, GeluApproximation approximation);

    /// <summary>y = softmax(scale * x) over the last dimension.</summary>
    public void SoftmaxForward(Tensor x, Tensor y, float scale = 1f)
    {
        Float(x, "softmax_forward", "x"); SameAs(y, x, "softmax_forward", "y");
        using (Profiled("softmax_forward")) SoftmaxForwardCore(x, y, scale);
    }

    /// <summary>dx = scale * y * (dy - sum(dy * y)).</summary>
    public void SoftmaxBackward(Tensor dy, Tensor y, Tensor dx, float scale = 1f)
    {
        Float(y, "softmax_backward", "y"); SameAs(dy, y, "softmax_backward", "dy"); SameAs(dx, y, "softmax_backward", "dx");
        using (Profiled("softmax_backward")) SoftmaxBackwardCore(dy, y, dx, scale);
    }

    protected abstract void SoftmaxForwardCore(Tensor x, Tensor y, float scale);
    protected abstract void SoftmaxBackwardCore(Tensor dy, Tensor y, Tensor dx, float scale);

    // ---- embedding and loss -------------------------------------------------------------------------------

    /// <summary>output[t, :] = table[ids[t], :]. table [V, C], ids [T] int32, output [T, C]. An id outside [0, V) is an error.</summary>
    public void EmbeddingForward(Tensor table, Tensor ids, Tensor output)
    {
        Float(table, "embedding_forward", "table");
        if (table.Rank != 2) throw new ArgumentException($"embedding_forward: table is {table.ShapeString}, expected [V, C]");
        Ids(ids, "embedding_forward", "ids");
        SameType(output, table, "embedding_forward", "output");
        if (output.Length != (long)ids.Length * table.Dim(1)) throw new ArgumentException($"embedding_forward: output is {output.ShapeString}, expected [{ids.Length}, {table.Dim(1)}]");
        using (Profiled("embedding_forward")) EmbeddingForwardCore(table, ids, output);
    }

    /// <summary>
    /// dtable[ids[t], :] += doutput[t, :] (scatter-add; dtable is fp32 and is accumulated into). Deterministic: the ids
    /// are read back and the positions grouped by id on the host, then one thread per (id, column) adds that id's rows
    /// in position order, so every backend gives the bits of adding the rows one by one in order, run after run.
    /// </summary>
    public void EmbeddingBackward(Tensor doutput, Tensor ids, Tensor dtable)
    {
        Fp32(dtable, "embedding_backward", "dtable");
        if (dtable.Rank != 2) throw new ArgumentException($"embedding_backward: dtable is {dtable.ShapeString}, expected [V, C]");
        Ids(ids, "embedding_backward", "ids");
        Float(doutput, "embedding_backward", "doutput");
        if (doutput.Length != (long)ids.Length * dtable.Dim(1)) throw new ArgumentException($"embedding_backward: doutput is {doutput.ShapeString}, expected [{ids.Length}, {dtable.Dim(1)}]");
        if (ids.Length == 0) return;
        var groups = IdGroups.Of(ids.ToIntArray(), dtable.Dim(0), "embedding_backward", "ids");
        using var order = FromArray(groups.Order, [groups.Order.Length], "embedding_order");
        using var starts = FromArray(groups.Starts, [groups.Starts.Length], "embedding_group_starts");
        using var rows = FromArray(groups.Ids, [groups.Ids.Length], "embedding_group_ids");
        using (Profiled("embedding_backward")) EmbeddingBackwardCore(doutput, order, starts, rows, dtable);
    }

    protected abstract void EmbeddingForwardCore(Tensor table, Tensor ids, Tensor output);

    /// <summary>For each group g (rows[g] its id) and column c: dtable[rows[g], c] += doutput[order[k], c] for k in
    /// starts[g] .. starts[g + 1] - 1, in that order. order: [T], starts: [G + 1], rows: [G], all int32.</summary>
    protected abstract void EmbeddingBackwardCore(Tensor doutput, Tensor order, Tensor starts, Tensor rows, Tensor dtable);

    public const int IgnoreIndex = -100;

    /// <summary>
    /// Rows per chunk of the weight- and bias-gradient column sums (kernels/common.cuh COLUMN_CHUNK_ROWS): each chunk's
    /// rows are added in order, then the chunks in order, on every backend (deterministic, and the same bits on each).
    /// </summary>
    public const int ColumnChunkRows = 64;

    /// <summary>
    /// Fused log-softmax + gather: lse[t] = logsumexp(logits[t, :]), logprob[t] = logits[t, target[t]] - lse[t] (the
    /// per-token NLL is -logprob). logits [T, V]; targets [T] int32 (IgnoreIndex gives 0); logprob, lse [T] fp32.
    /// No [T, V] probabilities tensor is made.
    /// </summary>
    public void CrossEntropyForward(Tensor logits, Tensor targets, Tensor logprob, Tensor lse, int ignoreIndex = IgnoreIndex)
    {
        Float(logits, "cross_entropy_forward", "logits");
        Ids(targets, "cross_entropy_forward", "targets");
        if (targets.Length != logits.Rows) throw new ArgumentException($"cross_entropy_forward: targets has {targets.Length} elements, logits has {logits.Rows} rows");
        Stat(logprob, logits, "cross_entropy_forward", "logprob"); Stat(lse, logits, "cross_entropy_forward", "lse");
        using (Profiled("cross_entropy_forward")) CrossEntropyForwardCore(logits, targets, logprob, lse, ignoreIndex);
    }

    /// <summary>dlogits[t, v] = dlogprob[t] * (1[v == target] - exp(logits[t, v] - lse[t])); dlogits may be logits (in place).</summary>
    public void CrossEntropyBackward(Tensor logits, Tensor targets, Tensor lse, Tensor dlogprob, Tensor dlogits, int ignoreIndex = IgnoreIndex)
    {
        Float(logits, "cross_entropy_backward", "logits"); SameAs(dlogits, logits, "cross_entropy_backward", "dlogits");
        Ids(targets, "cross_entropy_backward", "targets");
        if (targets.Length != logits.Rows) throw new ArgumentException($"cross_entropy_backward: targets has {targets.Length} elements, logits has {logits.Rows} rows");
        Stat(lse, logits, "cross_entropy_backward", "lse"); Stat(dlogprob, logits, "cross_entropy_backward", "dlogprob");
        using (Profiled("cross_entropy_backward")) CrossEntropyBackwardCore(logits, targets, lse, dlogprob, dlogits, ignoreIndex);
    }

    protected abstract void CrossEntropyForwardCore(Tensor logits, Tensor targets, Tensor logprob, Tensor lse, int ignoreIndex);
    protected abstract void CrossEntropyBackwardCore(Tensor logits, Tensor targets, Tensor lse, Tensor dlogprob, Tensor dlogits, int ignoreIndex);

    // ---- attention and row movement -------------------------------------------------------------------------

    public PackedSequences Sequences(int[] cuSeqlens) => new(this, cuSeqlens);

    public RowIndex Rows(int[] rows, int bound, bool distinct, string name = "rows") => new(this, rows, bound, distinct, name);

    /// <summary>
    /// output = softmax(scale q k^T (+ causal mask)) v within each packed sequence, GQA (head h reads kv head
    /// h / (H / Hkv)). q, output: [T, H, D]; k, v: [T, Hkv, D]; lse: [T, H] fp32 (saved for backward).
    /// </summary>
    public void AttentionForward(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        CheckAttention(q, k, v, sequences, output, lse, "attention_forward");
        var variant = VariantFor(q, k, v);
        if (variant != AttentionVariant.RowWise)
        {
            CheckTensorCoreAttention(q, variant, "attention_forward");
            if (variant == AttentionVariant.Flash)
                using (Profiled("flash_attention_forward")) FlashAttentionForwardCore(q, k, v, sequences, output, lse, scale, causal);
            else
                using (Profiled("tiled_attention_forward")) TiledAttentionForwardCore(q, k, v, sequences, output, lse, scale, causal);
            return;
        }
        using (Profiled("attention_forward")) AttentionForwardCore(q, k, v, sequences, output, lse, scale, causal);
    }

    private void CheckTensorCoreAttention(Tensor q, AttentionVariant variant, string op)
    {
        if (!TiledHeadDims.Contains(q.Dim(2)))
            throw new ArgumentException($"{op}: the {variant.ToString().ToLowerInvariant()} variant takes head dims {string.Join(", ", TiledHeadDims)}, not {q.Dim(2)}; use AttentionVariant.RowWise");
        CheckTiledAttention(q);
    }

    /// <summary>Which attention schedule runs (forward and backward alike); Auto picks per call (<see cref="VariantFor"/>).</summary>
    public AttentionVariant Attention { get; set; } = AttentionVariant.Auto;

    /// <summary>The schedule a call runs: the one set, or under Auto the flash one where <see cref="RunsTiledNatively"/>.</summary>
    public AttentionVariant VariantFor(Tensor q, Tensor k, Tensor v) => Attention != AttentionVariant.Auto ? Attention
        : !RunsTiledNatively(q, k, v) ? AttentionVariant.RowWise
        : FlashFits(q.Dim(2)) ? AttentionVariant.Flash : AttentionVariant.Tiled;

    /// <summary>Whether the flash kernels' shared memory at this head dim fits the device (the tiled ones fit any sm_80+).</summary>
    protected virtual bool FlashFits(int headDim) => true;

    /// <summary>Whether the tensor-core schedules are this backend's fast path for these tensors (none by default: the CPU's is row-wise).</summary>
    protected virtual bool RunsTiledNatively(Tensor q, Tensor k, Tensor v) => false;

    public static readonly int[] TiledHeadDims = [64, 80, 96, 128];

    /// <summary>Query rows per tile of the tiled attention (4 warps x 16 rows).</summary>
    public const int AttentionTileRows = 64;

    /// <summary>Query rows per forward tile of the flash attention (4 warps x 32 rows) and keys per backward block (8 warps x 16).</summary>
    public const int FlashTileRows = 128;

    /// <summary>Keys per tile of the flash forward's online softmax (one rescale per tile).</summary>
    public const int FlashKeysPerTile = 64;

    /// <summary>
    /// Splits of the flash backward's dq (each an fp32 partial of [T, H, D], summed in order). Null: from the device
    /// (<see cref="FlashSplits"/>); a fixed count makes runs on different devices add dq in the same groups.
    /// </summary>
    public int? AttentionSplits { get; set; }

    /// <summary>
    /// The flash backward's dq splits: about two blocks of (split, head) per multiprocessor (the 148 KB block runs one
    /// per SM at D = 128), at most one split per key tile, and partials of at most 2 GiB together.
    /// </summary>
    public static int FlashSplits(int multiprocessors, int heads, int keyTiles, long tokens, int dim)
    {
        int splits = Math.Max(1, (2 * multiprocessors + heads - 1) / heads);
        long bytes = Math.Max(1, tokens * heads * dim * 4L);
        splits = (int)Math.Min(splits, Math.Max(1, (2L << 30) / bytes));
        return Math.Clamp(splits, 1, Math.Max(1, keyTiles));
    }

    /// <summary>The split count a flash backward over these sizes runs with on this backend.</summary>
    public int FlashSplitsFor(int heads, int keyTiles, long tokens, int dim) =>
        AttentionSplits is int n ? Math.Clamp(n, 1, Math.Max(1, keyTiles)) : FlashSplits(Multiprocessors, heads, keyTiles, tokens, dim);

    /// <summary>Parallel processors the backend schedules blocks over (CUDA: multiprocessors; CPU: cores).</summary>
    protected virtual int Multiprocessors => Environment.ProcessorCount;

    protected abstract void FlashAttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal);

    protected abstract void FlashAttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal);

    /// <summary>Backends that run the tiled variant only in some storage types reject the others here.</summary>
    protected virtual void CheckTiledAttention(Tensor q) { }

    protected abstract void TiledAttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal);

    protected abstract void TiledAttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal);

    /// <summary>dq, dk, dv of <see cref="AttentionForward"/> from dout and the saved output and lse (recomputing p).</summary>
    public void AttentionBackward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        CheckAttention(q, k, v, sequences, output, lse, "attention_backward");
        SameAs(dout, q, "attention_backward", "dout"); SameAs(dq, q, "attention_backward", "dq");
        SameAs(dk, k, "attention_backward", "dk"); SameAs(dv, v, "attention_backward", "dv");
        var variant = VariantFor(q, k, v);
        // Auto also needs dout where the tensor cores' 16-byte copies read it (a view of it may not be aligned).
        if (Attention == AttentionVariant.Auto && variant != AttentionVariant.RowWise && !RunsTiledNatively(dout, k, v)) variant = AttentionVariant.RowWise;
        if (variant != AttentionVariant.RowWise)
        {
            CheckTensorCoreAttention(q, variant, "attention_backward");
            if (variant == AttentionVariant.Flash)
                using (Profiled("flash_attention_backward")) FlashAttentionBackwardCore(dout, q, k, v, output, lse, sequences, dq, dk, dv, scale, causal);
            else
                using (Profiled("tiled_attention_backward")) TiledAttentionBackwardCore(dout, q, k, v, output, lse, sequences, dq, dk, dv, scale, causal);
            return;
        }
        using (Profiled("attention_backward")) AttentionBackwardCore(dout, q, k, v, output, lse, sequences, dq, dk, dv, scale, causal);
    }

    /// <summary>Largest head dim the attention kernels take (32 lanes x 8 elements).</summary>
    public const int MaxAttentionHeadDim = 256;

    private void CheckAttention(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, string op)
    {
        Float(q, op, "q"); SameAs(output, q, op, "output"); SameAs(v, k, op, "v"); SameType(k, q, op, "k");
        if (q.Rank != 3 || k.Rank != 3) throw new ArgumentException($"{op}: q {q.ShapeString} and k {k.ShapeString} must be [T, H, D] and [T, Hkv, D]");
        int t = q.Dim(0), h = q.Dim(1), d = q.Dim(2), hkv = k.Dim(1);
        if (k.Dim(0) != t || k.Dim(2) != d) throw new ArgumentException($"{op}: k is {k.ShapeString}, expected [{t}, Hkv, {d}]");
        if (hkv < 1 || h % hkv != 0) throw new ArgumentException($"{op}: {h} query heads are not a multiple of {hkv} kv heads");
        if (d > MaxAttentionHeadDim) throw new ArgumentException($"{op}: head dim {d} is above {MaxAttentionHeadDim}");
        if (sequences.Tokens != t) throw new ArgumentException($"{op}: the packed sequences hold {sequences.Tokens} tokens, q has {t}");
        Own(sequences.Device, op);
        Fp32(lse, op, "lse");
        if (lse.Length != (long)t * h) throw new ArgumentException($"{op}: lse is {lse.ShapeString}, expected [{t}, {h}]");
    }

    protected abstract void AttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal);
    protected abstract void AttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal);

    /// <summary>destination[rows[r], :] = source[r, :] (set). rows must be distinct (made with distinct: true).</summary>
    public void ScatterRows(Tensor source, RowIndex rows, Tensor destination)
    {
        Float(source, "scatter_rows", "source"); SameType(destination, source, "scatter_rows", "destination");
        if (!rows.Distinct) throw new ArgumentException("scatter_rows: the row index must be made with distinct: true");
        if (source.Rows != rows.Length || source.Cols != destination.Cols || rows.Bound > destination.Rows)
            throw new ArgumentException($"scatter_rows: source {source.ShapeString}, {rows.Length} rows below {rows.Bound}, destination {destination.ShapeString} do not fit");
        Own(rows.Device, "scatter_rows");
        if (rows.Length > 0) using (Profiled("scatter_rows")) ScatterRowsCore(source, rows, destination);
    }

    /// <summary>destination[r, :] = source[rows[r], :] (an embedding lookup with a validated index).</summary>
    public void GatherRows(Tensor source, RowIndex rows, Tensor destination)
    {
        if (rows.Bound > source.Rows) throw new ArgumentException($"gather_rows: index bound {rows.Bound} exceeds the {source.Rows} rows of {source}");
        if (rows.Length > 0) EmbeddingForward(source.Rank == 2 ? source : source.Reshape(source.Rows, source.Cols), rows.Device, destination);
    }

    protected abstract void ScatterRowsCore(Tensor source, RowIndex rows, Tensor destination);

    /// <summary>y[t, c] = x[t, c] * s[c] (LayerScale). Also its input backward: dx = ScaleColumns(dy, s).</summary>
    public void ScaleColumns(Tensor x, Tensor scale, Tensor y)
    {
        Float(x, "scale_columns", "x"); SameAs(y, x, "scale_columns", "y"); Param(scale, x, "scale_columns", "scale");
        using (Profiled("scale_columns")) ScaleColumnsCore(x, scale, y);
    }

    /// <summary>dscale[c] (+)= sum_t dy[t, c] * x[t, c] (fp32).</summary>
    public void ScaleColumnsBackward(Tensor dy, Tensor x, Tensor dscale, bool accumulate)
    {
        Float(x, "scale_columns_backward", "x"); SameAs(dy, x, "scale_columns_backward", "dy");
        Fp32(dscale, "scale_columns_backward", "dscale"); Len(dscale, x.Cols, "scale_columns_backward", "dscale");
        using (Profiled("scale_columns_backward")) ScaleColumnsBackwardCore(dy, x, dscale, accumulate);
    }

    protected abstract void ScaleColumnsCore(Tensor x, Tensor scale, Tensor y);
    protected abstract void ScaleColumnsBackwardCore(Tensor dy, Tensor x, Tensor dscale, bool accumulate);

    // ---- paged KV cache and sampling ----------------------------------------------------------------------

    public PagedBatch Paged(IReadOnlyList<IReadOnlyList<int>> blockTables, int[] contextLengths, int blockSize, int numBlocks) =>
        new(this, blockTables, contextLengths, blockSize, numBlocks);

    /// <summary>kCache[slots[t]] = k[t], vCache[slots[t]] = v[t]. k, v: [T, Hkv, D]; caches: [slots, Hkv, D].</summary>
    public void KvAppend(Tensor k, Tensor v, RowIndex slots, Tensor kCache, Tensor vCache)
    {
        Float(k, "kv_append", "k"); SameAs(v, k, "kv_append", "v"); SameType(kCache, k, "kv_append", "k_cache"); SameAs(vCache, kCache, "kv_append", "v_cache");
        if (k.Rank != 3 || kCache.Rank != 3 || k.Dim(1) != kCache.Dim(1) || k.Dim(2) != kCache.Dim(2))
            throw new ArgumentException($"kv_append: k {k.ShapeString} and cache {kCache.ShapeString} must be [T, Hkv, D] and [slots, Hkv, D]");
        if (!slots.Distinct || slots.Length != k.Dim(0) || slots.Bound > kCache.Dim(0))
            throw new ArgumentException($"kv_append: {slots.Length} distinct slots below {kCache.Dim(0)} are needed for {k.Dim(0)} tokens");
        Own(slots.Device, "kv_append");
        if (k.Dim(0) > 0) using (Profiled("kv_append")) KvAppendCore(k, v, slots, kCache, vCache);
    }

    /// <summary>
    /// Decode attention of one new token per sequence over its cached tokens: q [B, H, D], caches [slots, Hkv, D],
    /// output [B, H, D]. The keys are split into chunks of <paramref name="splitBlocks"/> blocks whose partial results
    /// are combined by log-sum-exp (split-KV).
    /// </summary>
    public void PagedAttentionDecode(Tensor q, Tensor kCache, Tensor vCache, PagedBatch batch, Tensor output, float scale, int splitBlocks)
    {
        Float(q, "paged_attention_decode", "q"); SameAs(output, q, "paged_attention_decode", "output");
        SameType(kCache, q, "paged_attention_decode", "k_cache"); SameAs(vCache, kCache, "paged_attention_decode", "v_cache");
        if (q.Rank != 3 || kCache.Rank != 3 || q.Dim(0) != batch.Batch || q.Dim(2) != kCache.Dim(2) || q.Dim(1) % kCache.Dim(1) != 0)
            throw new ArgumentException($"paged_attention_decode: q {q.ShapeString}, cache {kCache.ShapeString} and {batch.Batch} sequences do not fit");
        if (q.Dim(2) > MaxAttentionHeadDim) throw new ArgumentException($"paged_attention_decode: head dim {q.Dim(2)} is above {MaxAttentionHeadDim}");
        if (kCache.Dim(0) % batch.BlockSize != 0) throw new ArgumentException($"paged_attention_decode: {kCache.Dim(0)} cache slots are not whole blocks of {batch.BlockSize}");
        if (splitBlocks < 1) throw new ArgumentOutOfRangeException(nameof(splitBlocks), "split size must be at least one block");
        Own(batch.Tables, "paged_attention_decode");
        using (Profiled("paged_attention_decode")) PagedAttentionDecodeCore(q, kCache, vCache, batch, output, scale, splitBlocks);
    }

    protected abstract void KvAppendCore(Tensor k, Tensor v, RowIndex slots, Tensor kCache, Tensor vCache);
    protected abstract void PagedAttentionDecodeCore(Tensor q, Tensor kCache, Tensor vCache, PagedBatch batch, Tensor output, float scale, int splitBlocks);

    /// <summary>
    /// Samples one token per row of logits [B, V] among the first <paramref name="vocabularyLimit"/> ids (default all:
    /// a padded LM head can be wider than the tokenizer); returns the tokens and their log-probs under
    /// log softmax(x / T) over those ids.
    /// </summary>
    public (int[] Tokens, float[] LogProbs) Sample(Tensor logits, IReadOnlyList<SampleRow> rows, int? vocabularyLimit = null)
    {
        Float(logits, "sample", "logits");
        if (logits.Rank != 2 || logits.Dim(0) != rows.Count) throw new ArgumentException($"sample: logits {logits.ShapeString} need one row per sampled sequence ({rows.Count})");
        int vocab = vocabularyLimit ?? logits.Dim(1);
        if (vocab < 1 || vocab > logits.Dim(1)) throw new ArgumentException($"sample: vocabulary limit {vocab} is outside [1, {logits.Dim(1)}]");
        if (vocab > MaxSamplingVocabulary) throw new ArgumentException($"sample: vocabulary {vocab} is above {MaxSamplingVocabulary}");
        foreach (var r in rows) r.Params.Validate();
        if (rows.Count == 0) return ([], []);
        using var inputs = new SamplingInputs(this, rows);
        using (Profiled("sample")) return SampleCore(logits, inputs, vocab);
    }

    /// <summary>The sampling kernel keeps a bitmask of earlier tokens in shared memory: 256K bits.</summary>
    public const int MaxSamplingVocabulary = 262144;

    protected abstract (int[] Tokens, float[] LogProbs) SampleCore(Tensor logits, SamplingInputs inputs, int vocab);

    /// <summary>The per-row arguments of a sampling call as device tensors, built once for both backends.</summary>
    protected sealed class SamplingInputs : IDisposable
    {
        public SamplingInputs(Backend b, IReadOnlyList<SampleRow> rows)
        {
            Count = rows.Count;
            var offsets = new int[Count + 1];
            for (int i = 0; i < Count; i++) offsets[i + 1] = offsets[i] + (rows[i].Params.RepetitionPenalty != 1f ? rows[i].Previous.Count : 0);
            var prev = new int[Math.Max(1, offsets[Count])];
            for (int i = 0; i < Count; i++)
                if (rows[i].Params.RepetitionPenalty != 1f)
                    for (int j = 0; j < rows[i].Previous.Count; j++) prev[offsets[i] + j] = rows[i].Previous[j];
            Previous = b.FromArray(prev, [prev.Length]);
            Offsets = b.FromArray(offsets, [offsets.Length]);
            Temperature = b.FromArray(rows.Select(r => r.Params.Temperature).ToArray(), DType.F32, [Count]);
            TopK = b.FromArray(rows.Select(r => r.Params.TopK).ToArray(), [Count]);
            TopP = b.FromArray(rows.Select(r => r.Params.TopP).ToArray(), DType.F32, [Count]);
            MinP = b.FromArray(rows.Select(r => r.Params.MinP).ToArray(), DType.F32, [Count]);
            Penalty = b.FromArray(rows.Select(r => r.Params.RepetitionPenalty).ToArray(), DType.F32, [Count]);
            var seeds = rows.Select(r => r.Seed).ToArray();
            Seeds = b.FromArray(System.Runtime.InteropServices.MemoryMarshal.Cast<ulong, int>(seeds.AsSpan()), [2 * Count]); // read as u64 by the kernels
            Steps = b.FromArray(rows.Select(r => r.Step).ToArray(), [Count]);
        }

        public int Count { get; }
        /// <summary>The earlier tokens of rows with a repetition penalty, concatenated; <see cref="Offsets"/> [n + 1] delimit them.</summary>
        public Tensor Previous { get; }
        public Tensor Offsets { get; }
        public Tensor Temperature { get; }
        public Tensor TopK { get; }
        public Tensor TopP { get; }
        public Tensor MinP { get; }
        public Tensor Penalty { get; }
        /// <summary>One u64 seed per row, stored as 2 int32.</summary>
        public Tensor Seeds { get; }
        public Tensor Steps { get; }

        public void Dispose()
        {
            foreach (var t in new[] { Previous, Offsets, Temperature, TopK, TopP, MinP, Penalty, Seeds, Steps }) t.Dispose();
        }
    }

    // ---- fused LM head + GRPO loss (vocabulary chunks) -------------------------------------------------------

    /// <summary>Folds a logits chunk [T, Vc] (vocabulary columns from <paramref name="colOffset"/>) into the running
    /// log-sum-exp (m, s) [T] and gathers the target logit [T] when the target lies in the chunk.</summary>
    public void ChunkLseUpdate(Tensor chunk, Tensor targets, int colOffset, float inverseTemperature, Tensor m, Tensor s, Tensor targetLogit)
    {
        Float(chunk, "chunk_lse_update", "chunk");
        Ids(targets, "chunk_lse_update", "targets");
        if (chunk.Rank != 2 || targets.Length != chunk.Rows) throw new ArgumentException($"chunk_lse_update: chunk {chunk.ShapeString} and {targets.Length} targets differ in rows");
        Stat(m, chunk, "chunk_lse_update", "m"); Stat(s, chunk, "chunk_lse_update", "s"); Stat(targetLogit, chunk, "chunk_lse_update", "target_logit");
        if (chunk.Rows > 0) using (Profiled("chunk_lse_update")) ChunkLseUpdateCore(chunk, targets, colOffset, inverseTemperature, m, s, targetLogit);
    }

    /// <summary>Per-token GRPO loss, d loss / d logprob and logprob from the running log-sum-exp; all [T] fp32.</summary>
    public void GrpoTokenLoss(Tensor m, Tensor s, Tensor targetLogit, Tensor targets, Tensor oldLogp, Tensor? refLogp, Tensor advantage, Tensor weight,
        GrpoLossSettings settings, Tensor loss, Tensor dlogp, Tensor logp)
    {
        Ids(targets, "grpo_token_loss", "targets");
        foreach (var (t, n) in new[] { (m, "m"), (s, "s"), (targetLogit, "target_logit"), (oldLogp, "old_logp"), (advantage, "advantage"), (weight, "weight"),
                     (loss, "loss"), (dlogp, "dlogp"), (logp, "logp") })
        {
            Fp32(t, "grpo_token_loss", n);
            Len(t, targets.Length, "grpo_token_loss", n);
        }
        if (refLogp is not null) { Fp32(refLogp, "grpo_token_loss", "ref_logp"); Len(refLogp, targets.Length, "grpo_token_loss", "ref_logp"); }
        if (settings.Kl != KlEstimator.None && refLogp is null) throw new ArgumentException("grpo_token_loss: a KL penalty needs reference log-probs");
        if (!(settings.EpsLow >= 0 && settings.EpsLow < 1 && settings.EpsHigh >= 0)) throw new ArgumentException("grpo_token_loss: need 0 <= eps_low < 1 and eps_high >= 0");
        if (targets.Length > 0) using (Profiled("grpo_token_loss")) GrpoTokenLossCore(m, s, targetLogit, targets, oldLogp, refLogp, advantage, weight, settings, loss, dlogp, logp);
    }

    /// <summary>Turns a recomputed logits chunk into d loss / d logits in place: dlogp / T (1[v == target] - p).</summary>
    public void ChunkLogitGrad(Tensor chunk, Tensor m, Tensor s, Tensor targets, Tensor dlogp, int colOffset, float inverseTemperature)
    {
        Float(chunk, "chunk_logit_grad", "chunk");
        Ids(targets, "chunk_logit_grad", "targets");
        Stat(m, chunk, "chunk_logit_grad", "m"); Stat(s, chunk, "chunk_logit_grad", "s"); Stat(dlogp, chunk, "chunk_logit_grad", "dlogp");
        if (chunk.Rows > 0) using (Profiled("chunk_logit_grad")) ChunkLogitGradCore(chunk, m, s, targets, dlogp, colOffset, inverseTemperature);
    }

    protected abstract void ChunkLseUpdateCore(Tensor chunk, Tensor targets, int colOffset, float inverseTemperature, Tensor m, Tensor s, Tensor targetLogit);
    protected abstract void GrpoTokenLossCore(Tensor m, Tensor s, Tensor targetLogit, Tensor targets, Tensor oldLogp, Tensor? refLogp, Tensor advantage,
        Tensor weight, GrpoLossSettings settings, Tensor loss, Tensor dlogp, Tensor logp);
    protected abstract void ChunkLogitGradCore(Tensor chunk, Tensor m, Tensor s, Tensor targets, Tensor dlogp, int colOffset, float inverseTemperature);

    // ---- optimiser -----------------------------------------------------------------------------------------

    /// <summary>
    /// One AdamW step (step counts from 1) on fp32 master weights with fp32 moments; the gradient is multiplied by
    /// <paramref name="gradScale"/> first. <paramref name="workingCopy"/> (bf16, optional) receives the new weights.
    /// </summary>
    public void AdamW(Tensor master, Tensor grad, Tensor m, Tensor v, Tensor? workingCopy, AdamWSettings s, int step, float gradScale = 1f)
    {
        CheckAdamW(new AdamWTensors(master, grad, m, v, workingCopy), step);
        using (Profiled("adamw")) AdamWCore(master, grad, m, v, workingCopy, s, step, gradScale);
    }

    private void CheckAdamW(AdamWTensors t, int step)
    {
        Fp32(t.Master, "adamw", "master");
        foreach (var (x, n) in new[] { (t.Grad, "grad"), (t.M, "m"), (t.V, "v") }) { Fp32(x, "adamw", n); Len(x, t.Master.Length, "adamw", n); }
        if (t.WorkingCopy is { } copy)
        {
            Own(copy, "adamw");
            if (copy.DType != DType.BF16 || copy.Length != t.Master.Length) throw new ArgumentException($"adamw: working copy is {copy}, expected {t.Master.Length} bf16 elements");
        }
        if (step < 1) throw new ArgumentOutOfRangeException(nameof(step), "adamw: step counts from 1");
    }

    protected abstract void AdamWCore(Tensor master, Tensor grad, Tensor m, Tensor v, Tensor? workingCopy, AdamWSettings s, int step, float gradScale);

    /// <summary>
    /// One AdamW step over many parameters at once (each as <see cref="AdamW(Tensor, Tensor, Tensor, Tensor, Tensor?, AdamWSettings, int, float)"/>
    /// checks it): CUDA runs a single multi-tensor launch; every element gets the same arithmetic, so the results are the
    /// one-tensor calls' bits.
    /// </summary>
    public void AdamW(IReadOnlyList<AdamWTensors> tensors, AdamWSettings s, int step, float gradScale = 1f)
    {
        foreach (var t in tensors) CheckAdamW(t, step);
        if (step < 1) throw new ArgumentOutOfRangeException(nameof(step), "adamw: step counts from 1");
        if (tensors.Count == 0) return;
        using (Profiled("adamw")) AdamWManyCore(tensors, s, step, gradScale);
    }

    /// <summary>The one-tensor update per tensor (backends with a multi-tensor kernel override it).</summary>
    protected virtual void AdamWManyCore(IReadOnlyList<AdamWTensors> tensors, AdamWSettings s, int step, float gradScale)
    {
        foreach (var t in tensors) AdamWCore(t.Master, t.Grad, t.M, t.V, t.WorkingCopy, s, step, gradScale);
    }

    /// <summary>
    /// sqrt(sum of squares over all tensors), summed in a fixed order (deterministic). Every parameter counts once:
    /// tensors replicated on each rank (data-parallel gradients after their all-reduce) are not summed across ranks;
    /// tensors split across the ranks of <paramref name="shardedOver"/> (each rank holding a distinct part) are.
    /// </summary>
    public double GlobalNorm(IReadOnlyList<Tensor> tensors, ICollectives? shardedOver = null)
    {
        foreach (var t in tensors) Float(t, "global_norm", t.Name);
        Span<double> sumsq = [0];
        using (Profiled("global_norm")) sumsq[0] = SumOfSquaresCore(tensors);
        shardedOver?.AllReduceSum(sumsq);
        return Math.Sqrt(sumsq[0]);
    }

    /// <summary>Scales every gradient by min(1, maxNorm / (norm + 1e-6)); returns the norm before clipping.</summary>
    public double ClipByGlobalNorm(IReadOnlyList<Tensor> grads, double maxNorm)
    {
        if (!(maxNorm > 0)) throw new ArgumentOutOfRangeException(nameof(maxNorm), "max norm must be positive");
        double norm = GlobalNorm(grads);
        double scale = ClipScale(norm, maxNorm);
        if (scale < 1.0)
            foreach (var g in grads) Scale(g, g, (float)scale);
        return norm;
    }

    /// <summary>The factor that clipping applies to gradients of global norm <paramref name="norm"/>.</summary>
    public static double ClipScale(double norm, double maxNorm) => Math.Min(1.0, maxNorm / (norm + 1e-6));

    protected abstract double SumOfSquaresCore(IReadOnlyList<Tensor> tensors);

    public abstract void Dispose();

    // ---- argument checks --------------------------------------------------------------------------------

    protected void Own(Tensor t, string op)
    {
        t.ThrowIfDisposed();
        if (!ReferenceEquals(t.Backend, this)) throw new ArgumentException($"{op}: {t} lives on {t.Backend.Name}, not {Name}");
    }

    private void Float(Tensor t, string op, string name)
    {
        Own(t, op);
        if (t.DType == DType.I32) throw new ArgumentException($"{op}: {name} ({t}) must be a float tensor");
        CheckCompute(t, op, name);
    }

    /// <summary>Backends that compute only in some dtypes reject the others here.</summary>
    protected virtual void CheckCompute(Tensor t, string op, string name) { }

    private void Fp32(Tensor t, string op, string name)
    {
        Own(t, op);
        if (t.DType != DType.F32) throw new ArgumentException($"{op}: {name} ({t}) must be fp32");
    }

    private void SameAs(Tensor t, Tensor like, string op, string name)
    {
        Own(t, op);
        if (t.DType != like.DType || !t.Shape.SequenceEqual(like.Shape))
            throw new ArgumentException($"{op}: {name} is {t.ShapeString} {t.DType.Name()}, expected {like.ShapeString} {like.DType.Name()}");
    }

    private void SameType(Tensor t, Tensor like, string op, string name)
    {
        Own(t, op);
        if (t.DType != like.DType) throw new ArgumentException($"{op}: {name} is {t.DType.Name()}, expected {like.DType.Name()}");
    }

    private void Param(Tensor t, Tensor x, string op, string name)
    {
        SameType(t, x, op, name);
        Len(t, x.Cols, op, name);
    }

    private void Stat(Tensor t, Tensor x, string op, string name)
    {
        Fp32(t, op, name);
        Len(t, x.Rows, op, name);
    }

    private void Ids(Tensor t, string op, string name)
    {
        Own(t, op);
        if (t.DType != DType.I32) throw new ArgumentException($"{op}: {name} ({t}) must be int32");
    }

    private static void Len(Tensor t, long length, string op, string name)
    {
        if (t.Length != length) throw new ArgumentException($"{op}: {name} is {t.ShapeString}, expected {length} elements");
    }

    /// <summary>Error for an id outside the vocabulary, reported by both backends in the same words.</summary>
    protected static ArgumentException IdOutOfRange(string op, string tensor, int row, int id, int vocab) =>
        new($"{op}: {tensor}[{row}] = {id} is outside [0, {vocab})");

    /// <summary>Positions grouped by id: the groups in ascending id, positions ascending within a group.</summary>
    protected readonly record struct IdGroups(int[] Order, int[] Starts, int[] Ids)
    {
        public static IdGroups Of(int[] ids, int vocab, string op, string tensor)
        {
            for (int t = 0; t < ids.Length; t++)
                if (ids[t] < 0 || ids[t] >= vocab) throw IdOutOfRange(op, tensor, t, ids[t], vocab);
            var order = Enumerable.Range(0, ids.Length).OrderBy(t => ids[t]).ToArray(); // stable: positions stay ascending
            var starts = new List<int>();
            var rows = new List<int>();
            for (int k = 0; k < order.Length; k++)
            {
                if (k > 0 && ids[order[k]] == ids[order[k - 1]]) continue;
                starts.Add(k);
                rows.Add(ids[order[k]]);
            }
            starts.Add(order.Length);
            return new IdGroups(order, starts.ToArray(), rows.ToArray());
        }
    }
}

/// <summary>
/// The process group the engine runs in: rank and size, and the collectives the engine needs (sums and maxima of
/// host values and tensors, broadcast, gather and scatter of fp32 blocks, barrier, abort, sub-groups). One process:
/// <see cref="SingleProcessCollectives"/>; launched by mpirun or srun: <see cref="MpiCollectives"/>.
/// </summary>
public interface ICollectives
{
    int Rank { get; }
    int WorldSize { get; }

    /// <summary>This process's index among the processes of its node (the CUDA device it takes).</summary>
    int LocalRank { get; }

    /// <summary>Whether <see cref="AllReduceSum(Tensor)"/> runs on the device (NCCL): tensors are then reduced in place
    /// instead of staged through host buckets.</summary>
    bool TensorsOnDevice => false;

    void AllReduceSum(Span<double> values);
    void AllReduceMax(Span<double> values);

    /// <summary>In-place sum of fp32 host values (a bucket of gradients, a shard's moments).</summary>
    void AllReduceSum(Span<float> values);

    /// <summary>
    /// Starts an in-place sum of <paramref name="values"/> and returns what completes it (the array must stay untouched
    /// until then): a bucket of gradients reduced while backward goes on. Every rank starts the same sums in the same
    /// order. By default it runs at once.
    /// </summary>
    Action StartAllReduceSum(float[] values)
    {
        AllReduceSum(values.AsSpan());
        return () => { };
    }
    void AllReduceSum(Tensor tensor);

    /// <summary>Every rank's <paramref name="data"/> becomes rank <paramref name="root"/>'s.</summary>
    void Broadcast(Span<byte> data, int root);

    /// <summary><paramref name="all"/> [size x n] receives every rank's <paramref name="mine"/> [n] in rank order.</summary>
    void AllGather(ReadOnlySpan<float> mine, Span<float> all);

    /// <summary>The sum over ranks of <paramref name="all"/> [size x n], block <see cref="Rank"/> of it into <paramref name="mine"/> [n].</summary>
    void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine);

    void Barrier();

    /// <summary>A barrier with its own time limit (<see cref="Timeout.InfiniteTimeSpan"/>: none), for waits that are a stage of the run.</summary>
    void Barrier(TimeSpan timeout);

    /// <summary>Ends every rank of the job (exit code 1) after printing <paramref name="message"/> with this rank (one process: throws it).</summary>
    void Abort(string message);

    /// <summary>The ranks that pass the same <paramref name="color"/>, ordered by <paramref name="key"/> (tensor- and data-parallel groups).</summary>
    ICollectives Split(int color, int key);
}

public sealed class SingleProcessCollectives : ICollectives
{
    public static readonly SingleProcessCollectives Instance = new();
    public int Rank => 0;
    public int WorldSize => 1;
    public int LocalRank => 0;
    public void AllReduceSum(Span<double> values) { }
    public void AllReduceMax(Span<double> values) { }
    public void AllReduceSum(Span<float> values) { }
    public void AllReduceSum(Tensor tensor) { }
    public void Broadcast(Span<byte> data, int root) { if (root != 0) throw new ArgumentOutOfRangeException(nameof(root), $"root {root} in a group of 1"); }
    public void AllGather(ReadOnlySpan<float> mine, Span<float> all) => mine.CopyTo(all);
    public void ReduceScatterSum(ReadOnlySpan<float> all, Span<float> mine) => all[..mine.Length].CopyTo(mine);
    public void Barrier() { }
    public void Barrier(TimeSpan timeout) { }
    public void Abort(string message) => throw new InvalidOperationException(message); // one process: Program.Report ends it
    public ICollectives Split(int color, int key) => this;
}
