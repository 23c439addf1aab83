using System.Runtime.InteropServices;
using R1V2.Native.Engine.Kernels;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Backends.Cuda;

internal sealed class CudaBlock(ulong pointer, long bytes) : DeviceBlock(bytes)
{
    public ulong Pointer { get; } = pointer;
}

/// <summary>
/// The CUDA backend: bf16 (or fp32) storage, fp32 accumulation, NVRTC-compiled kernels from kernels/*.cu and
/// cuBLAS / cuBLASLt GEMMs, all on one stream of the device's primary context. Nothing here synchronises except
/// uploads and downloads, the id-range checks of embedding and loss, and the norm read-back. Calls may come from any
/// thread (the context is made current where needed) but not from two threads at once.
/// </summary>
public sealed unsafe class CudaBackend : Backend
{
    private const long WorkspaceBytes = 32L << 20;
    private const int MaxNormPartials = 1024;

    private readonly CudaContext _context;
    private readonly CudaStream _stream;
    private readonly CublasHandle _cublas;
    private readonly CublasLtHandle _cublasLt;

    /// <summary>GEMM problems whose cuBLASLt algorithm is pinned (asked of the heuristic once, then reused bit for bit).</summary>
    public int PinnedGemmAlgorithms => _cublasLt.PinnedAlgorithms;
    private readonly ulong _workspace;
    private readonly ulong _errorWord; // int32[2]: first bad row (-1: none), its id
    private readonly MemoryPool<CudaBlock> _pool;
    private readonly Dictionary<string, CudaModule> _modules = new();
    private readonly Dictionary<string, CudaFunction> _functions = new();
    private readonly (string Arch, bool Cubin) _target;

    public CudaBackend(int device = 0, KernelCompiler? compiler = null, DType activationType = DType.BF16)
    {
        if (activationType == DType.I32) throw new ArgumentException("activation type must be fp32 or bf16");
        _context = new CudaContext(device);
        _stream = new CudaStream();
        _cublas = new CublasHandle();
        _cublas.SetStream(_stream);
        _cublas.SetDefaultMath();
        _cublasLt = new CublasLtHandle();
        _workspace = CudaDriver.Alloc(WorkspaceBytes);
        _cublas.SetWorkspace(_workspace, WorkspaceBytes);
        _errorWord = CudaDriver.Alloc(8);
        _pool = new MemoryPool<CudaBlock>(bytes => new CudaBlock(CudaDriver.Alloc(bytes), bytes), b => CudaDriver.Free(b.Pointer));
        // Launch parameters: what `engine tune` cached for this GPU, driver, NVRTC and shape bucket, else the defaults.
        Compiler = compiler ?? new KernelCompiler(tuning: new TuningCache().Load(TuningKeyOf(Device, TuningBucket), m => Console.Error.WriteLine($"warning: {m}")));
        ActivationType = activationType;
        _target = KernelCompiler.TargetFor(Device.Major * 10 + Device.Minor, Nvrtc.SupportedArchs());
    }

    /// <summary>True when a CUDA device, the driver and NVRTC and cuBLAS are all usable here; otherwise why not.</summary>
    public static bool IsAvailable(out string reason)
    {
        foreach (var lib in NativeLibraries.CudaStack)
            if (!lib.TryLoad(out var error)) { reason = error!; return false; }
        try
        {
            if (CudaDriver.DeviceCount() == 0) { reason = "the CUDA driver reports no device"; return false; }
        }
        catch (CudaException e) { reason = e.Message; return false; }
        reason = "";
        return true;
    }

    public KernelCompiler Compiler { get; }

    /// <summary>The shape bucket whose tuning a backend loads: <c>R1V2_TUNING_SHAPES</c> (e.g. hidden-5120), else the standard shapes.</summary>
    public static string TuningBucket => Environment.GetEnvironmentVariable("R1V2_TUNING_SHAPES") is { Length: > 0 } b ? b : TuningKey.StandardShapes;

    /// <summary>The tuning cache's key of a device.</summary>
    public static TuningKey TuningKeyOf(CudaDeviceInfo device, string bucket) =>
        new(device.Name, $"{device.Major}{device.Minor}", CudaDriver.DriverVersion(), Nvrtc.Version().ToString(), bucket);
    public CudaDeviceInfo Device => _context.Device;
    public CudaStream Stream => _stream;
    public override string Name => $"cuda:{_context.Ordinal}";
    public override DType ActivationType { get; }
    public override MemoryStats Memory => _pool.Stats;
    public override void ResetPeakMemory() => _pool.ResetPeak();

    // ---- kernels ------------------------------------------------------------------------------------------
    /// <summary>The kernel <paramref name="name"/> of <paramref name="family"/>, compiling and loading the family once.</summary>
    public CudaFunction Function(string family, string name)
    {
        if (_functions.TryGetValue(name, out var f)) return f;
        if (!_modules.TryGetValue(family, out var module))
        {
            var compiled = Compiler.Compile(family, _target.Arch, _target.Cubin);
            _modules[family] = module = new CudaModule(compiled.Image);
        }
        f = module.Function(name);
        _functions[name] = f;
        return f;
    }

    private static string Suffix(Tensor t) => t.DType == DType.BF16 ? "_bf16" : "_f32";

    /// <summary>When set, every kernel launch adds its (family, kernel) here: what `engine bench kernels` reports resources of.</summary>
    public List<(string Family, string Kernel)>? LaunchLog { get; set; }

    /// <summary>
    /// A kernel's registers and spills (NVRTC's ptxas report) and occupancy: the share of an SM's threads its resident
    /// blocks fill at its block size.
    /// </summary>
    public KernelUse Use(string family, string kernel)
    {
        EnsureCurrent();
        var resources = Compiler.Compile(family, _target.Arch, _target.Cubin).Kernels.FirstOrDefault(k => k.Kernel == kernel);
        int block = Compiler.Tuning.Block(family);
        int resident = CudaDriver.MaxActiveBlocksPerMultiprocessor(Function(family, kernel).Handle, block);
        double occupancy = (double)resident * block / CudaDriver.Attribute(Device.Ordinal, CuDeviceAttribute.MaxThreadsPerMultiprocessor);
        return new KernelUse(kernel, block, resources?.Registers ?? 0, (resources?.SpillStoreBytes ?? 0) + (resources?.SpillLoadBytes ?? 0), occupancy);
    }

    private void Launch(string family, string kernel, long gridX, ReadOnlySpan<ulong> args, long gridY = 1)
    {
        if (gridX <= 0 || gridY <= 0) return; // zero rows or columns: nothing to do (a block would touch row 0 of an empty tensor)
        EnsureCurrent();
        LaunchLog?.Add((family, kernel));
        var f = Function(family, kernel);
        int block = Compiler.Tuning.Block(family);
        CudaDriver.Launch(f.Handle, new Dim3(checked((uint)gridX), checked((uint)gridY)), new Dim3((uint)block), 0, _stream.Handle, args);
    }

    [ThreadStatic] private static IntPtr _currentContext;

    /// <summary>The context is current per thread: make it current on a thread that has not used it yet.</summary>
    private void EnsureCurrent()
    {
        if (_currentContext == _context.Handle) return;
        _context.MakeCurrent();
        _currentContext = _context.Handle;
    }

    /// <summary>
    /// A grid-stride kernel over <paramref name="n"/> items: as many blocks as the items need, at most one wave of the
    /// blocks the device holds resident at once (SMs x the kernel's occupancy at this block size, asked of the driver
    /// once per kernel), so no block waits for another to finish.
    /// </summary>
    private void LaunchStride(string family, string kernel, long n, ReadOnlySpan<ulong> args)
    {
        if (n <= 0) return;
        int block = Compiler.Tuning.Block(family);
        Launch(family, kernel, OneWave(family, kernel, (n + block - 1) / block), args);
    }

    /// <summary>At most one wave of <paramref name="blocks"/>: SMs x the kernel's occupancy at its block size (asked once per kernel).</summary>
    private long OneWave(string family, string kernel, long blocks)
    {
        EnsureCurrent();
        if (!_residentBlocks.TryGetValue(kernel, out int perSm))
            _residentBlocks[kernel] = perSm = Math.Max(1, CudaDriver.MaxActiveBlocksPerMultiprocessor(Function(family, kernel).Handle, Compiler.Tuning.Block(family)));
        return Math.Clamp(blocks, 1, (long)Device.MultiprocessorCount * perSm);
    }

    private readonly Dictionary<string, int> _residentBlocks = new();

    /// <summary>Blocks for a grid-stride loop over n elements: enough to fill the device, never more than needed.</summary>
    private long StrideGrid(string family, long n)
    {
        long block = Compiler.Tuning.Block(family);
        return Math.Clamp((n + block - 1) / block, 1, (long)Device.MultiprocessorCount * 32);
    }

    private long ColumnGrid(string family, int cols) => (cols + Compiler.Tuning.Block(family) - 1) / Compiler.Tuning.Block(family);

    /// <summary>Device pointer of the first element; 0 (nullptr in the kernel) for an absent optional tensor.</summary>
    private static ulong P(Tensor? t) => t is null ? 0 : ((CudaBlock)t.Block).Pointer + (ulong)t.ByteOffset;

    /// <summary>A tensor's device address (for libraries that take raw pointers, such as NCCL).</summary>
    public static ulong DevicePointer(Tensor t) => t.Block is CudaBlock ? P(t) : throw new ArgumentException($"{t} is not a CUDA tensor");
    private static ulong I(int v) => KernelArg.I32(v);
    private static ulong L(long v) => KernelArg.I64(v);
    private static ulong Fl(float v) => KernelArg.F32(v);

    // ---- memory -----------------------------------------------------------------------------------------------
    protected override DeviceBlock RentBlock(long bytes) => _pool.Rent(bytes);
    internal override void Release(DeviceBlock block) => _pool.Return((CudaBlock)block);
    public override void Synchronize() => _stream.Synchronize();
    public override void Zero(Tensor t)
    {
        EnsureCurrent();
        if (t.Bytes > 0) CudaDriver.MemsetAsync(P(t), 0, t.Bytes, _stream.Handle);
    }

    protected override void UploadBytesCore(Tensor t, long byteOffset, ReadOnlySpan<byte> bytes)
    {
        EnsureCurrent();
        fixed (byte* p = bytes) { CudaDriver.CopyHtoDAsync(P(t) + (ulong)byteOffset, p, bytes.Length, _stream.Handle); _stream.Synchronize(); }
    }

    protected override void UploadFloats(Tensor t, ReadOnlySpan<float> data)
    {
        EnsureCurrent();
        // The host memory stays pinned until the copy has completed: an async copy from pageable memory may return early.
        if (t.DType == DType.F32)
        {
            fixed (float* p = data) { CudaDriver.CopyHtoDAsync(P(t), p, t.Bytes, _stream.Handle); _stream.Synchronize(); }
        }
        else
        {
            var bits = new ushort[data.Length];
            for (int i = 0; i < data.Length; i++) bits[i] = BFloat16.FromFloat(data[i]);
            fixed (ushort* p = bits) { CudaDriver.CopyHtoDAsync(P(t), p, t.Bytes, _stream.Handle); _stream.Synchronize(); }
        }
    }

    protected override void UploadInts(Tensor t, ReadOnlySpan<int> data)
    {
        EnsureCurrent();
        fixed (int* p = data) { CudaDriver.CopyHtoDAsync(P(t), p, t.Bytes, _stream.Handle); _stream.Synchronize(); }
    }

    protected override float[] DownloadFloatsCore(Tensor t)
    {
        EnsureCurrent();
        var result = new float[t.Length];
        if (t.DType == DType.F32)
        {
            fixed (float* p = result) { CudaDriver.CopyDtoHAsync(p, P(t), t.Bytes, _stream.Handle); _stream.Synchronize(); }
            return result;
        }
        var bits = new ushort[t.Length];
        fixed (ushort* p = bits) { CudaDriver.CopyDtoHAsync(p, P(t), t.Bytes, _stream.Handle); _stream.Synchronize(); }
        for (int i = 0; i < bits.Length; i++) result[i] = BFloat16.ToFloat(bits[i]);
        return result;
    }

    protected override int[] DownloadIntsCore(Tensor t)
    {
        EnsureCurrent();
        var result = new int[t.Length];
        fixed (int* p = result) { CudaDriver.CopyDtoHAsync(p, P(t), t.Bytes, _stream.Handle); _stream.Synchronize(); }
        return result;
    }

    // ---- GEMM -------------------------------------------------------------------------------------------------
    private static CudaDataType Cu(DType t) => t == DType.BF16 ? CudaDataType.R16BF : CudaDataType.R32F;

    /// <summary>
    /// Row-major c[M, N] = op(a) op(b) is column-major c^T[N, M] = op(b)^T op(a)^T, so cuBLAS gets b first with
    /// m' = N, n' = M: no copies or transposes are made.
    /// </summary>
    protected override void GemmCore(Tensor a, bool transA, Tensor b, bool transB, Tensor c, Tensor? bias, float alpha, float beta, int batch, int m, int n, int k)
    {
        EnsureCurrent();
        var opB = transB ? CublasOperation.T : CublasOperation.N;
        var opA = transA ? CublasOperation.T : CublasOperation.N;
        int ldb = transB ? k : n, lda = transA ? m : k;
        if (batch == 1)
        {
            CublasLt.Matmul(_cublasLt, opB, opA, n, m, k, alpha, P(b), Cu(b.DType), ldb, P(a), Cu(a.DType), lda, beta,
                P(c), Cu(c.DType), n, P(bias), bias is null ? Cu(c.DType) : Cu(bias.DType), _workspace, WorkspaceBytes, _stream.Handle);
            return;
        }
        Cublas.GemmStridedBatchedEx(_cublas, opB, opA, n, m, k, alpha, P(b), Cu(b.DType), ldb, (long)k * n,
            P(a), Cu(a.DType), lda, (long)m * k, beta, P(c), Cu(c.DType), n, (long)m * n, batch);
        if (bias is not null)
            LaunchStride("bias", "bias_add" + Suffix(c), c.Length, [P(c), P(bias), I(batch * m), I(n)]);
    }

    protected override void BiasBackwardCore(Tensor dy, Tensor dbias, bool accumulate)
    {
        int chunks = ColumnChunks(dy.Rows);
        using var partial = Allocate(DType.F32, Math.Max(1, chunks), dy.Cols);
        Launch("bias", "bias_backward_partial" + Suffix(dy), ColumnGrid("bias", dy.Cols), [P(partial), P(dy), I(dy.Rows), I(dy.Cols)], gridY: chunks);
        Launch("bias", "bias_backward_sum", ColumnGrid("bias", dy.Cols), [P(dbias), P(partial), I(chunks), I(dy.Cols), I(accumulate ? 1 : 0)]);
    }

    /// <summary>Chunks of <see cref="Backend.ColumnChunkRows"/> rows of a two-pass column sum (at most 65535: the grid's y limit).</summary>
    private static int ColumnChunks(int rows)
    {
        int chunks = (rows + ColumnChunkRows - 1) / ColumnChunkRows;
        return chunks <= 65535 ? chunks : throw new ArgumentException($"a column sum over {rows} rows exceeds the {65535 * ColumnChunkRows} rows the two-pass kernels take");
    }

    // ---- elementwise ------------------------------------------------------------------------------------------
    protected override void AxpbyCore(Tensor output, Tensor a, Tensor? b, float alpha, float beta)
    {
        // 16-byte packs where every array allows them; the per-element arithmetic is the same either way.
        long packs = Packs(output, a, b);
        if (packs > 0)
            LaunchStride("elementwise", "axpby_vec" + Suffix(output), packs, [P(output), P(a), P(b), Fl(alpha), Fl(beta), L(packs)]);
        else
            LaunchStride("elementwise", "axpby" + Suffix(output), output.Length, [P(output), P(a), P(b), Fl(alpha), Fl(beta), L(output.Length)]);
    }

    /// <summary>The number of 16-byte packs of <paramref name="first"/> when every given tensor is 16-byte aligned and whole packs; else 0.</summary>
    private static long Packs(Tensor first, params Tensor?[] others)
    {
        int per = 16 / first.DType.Size();
        if (first.Length == 0 || first.Length % per != 0 || P(first) % 16 != 0) return 0;
        foreach (var t in others)
            if (t is not null && P(t) % 16 != 0) return 0;
        return first.Length / per;
    }

    protected override void ConvertCore(Tensor source, Tensor destination)
    {
        long n = source.Length;
        switch (source.DType, destination.DType)
        {
            case (DType.F32, DType.BF16):
                LaunchStride("elementwise", "convert_f32_to_bf16", n, [P(destination), P(source), L(n)]);
                break;
            case (DType.BF16, DType.F32):
                LaunchStride("elementwise", "convert_bf16_to_f32", n, [P(destination), P(source), L(n)]);
                break;
            default:
                CudaDriver.CopyDtoDAsync(P(destination), P(source), source.Bytes, _stream.Handle);
                break;
        }
    }

    // ---- norms ----------------------------------------------------------------------------------------------------
    protected override void RmsNormForwardCore(Tensor x, Tensor weight, Tensor y, Tensor rstd, float eps) =>
        Launch("rmsnorm", "rmsnorm_forward" + Suffix(x), x.Rows, [P(y), P(rstd), P(x), P(weight), I(x.Rows), I(x.Cols), Fl(eps)]);

    /// <summary>Columns a thread of a fused norm backward keeps in registers (RMSNORM_BWD_KEPT / LAYERNORM_BWD_KEPT).</summary>
    public static int FusedNormKept(int block) => Math.Min(24, 6144 / block);

    protected override void RmsNormBackwardCore(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate)
    {
        int block = Compiler.Tuning.Block("rmsnorm");
        if (dweight is not null && x.Cols <= FusedNormKept(block) * block)
        {
            // One pass: each chunk's rows read once for dx and the chunk's dw partial; then the partials in chunk order.
            int chunks = ColumnChunks(x.Rows);
            using var partial = Allocate(DType.F32, Math.Max(1, chunks), x.Cols);
            Launch("rmsnorm", "rmsnorm_backward_fused" + Suffix(x), chunks, [P(dx), P(partial), P(dy), P(x), P(weight), P(rstd), I(x.Rows), I(x.Cols)]);
            Launch("rmsnorm", "rmsnorm_backward_weight_sum", ColumnGrid("rmsnorm", x.Cols), [P(dweight), P(partial), I(chunks), I(x.Cols), I(accumulate ? 1 : 0)]);
            return;
        }
        // The weight gradient reads dy before dx is written (dx may alias dy).
        if (dweight is not null)
        {
            int chunks = ColumnChunks(x.Rows);
            using var partial = Allocate(DType.F32, Math.Max(1, chunks), x.Cols);
            Launch("rmsnorm", "rmsnorm_backward_weight_partial" + Suffix(x), ColumnGrid("rmsnorm", x.Cols), [P(partial), P(dy), P(x), P(rstd), I(x.Rows), I(x.Cols)], gridY: chunks);
            Launch("rmsnorm", "rmsnorm_backward_weight_sum", ColumnGrid("rmsnorm", x.Cols), [P(dweight), P(partial), I(chunks), I(x.Cols), I(accumulate ? 1 : 0)]);
        }
        Launch("rmsnorm", "rmsnorm_backward" + Suffix(x), x.Rows, [P(dx), P(dy), P(x), P(weight), P(rstd), I(x.Rows), I(x.Cols)]);
    }

    protected override void LayerNormForwardCore(Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor mean, Tensor rstd, float eps) =>
        Launch("layernorm", "layernorm_forward" + Suffix(x), x.Rows,
            [P(y), P(mean), P(rstd), P(x), P(weight), P(bias), I(x.Rows), I(x.Cols), Fl(eps)]);

    protected override void LayerNormBackwardCore(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dx, Tensor? dweight, Tensor? dbias, bool accumulate)
    {
        int block = Compiler.Tuning.Block("layernorm");
        if (dweight is not null && x.Cols <= FusedNormKept(block) * block)
        {
            int chunks = ColumnChunks(x.Rows);
            using var pw = Allocate(DType.F32, Math.Max(1, chunks), x.Cols);
            using var pb = dbias is null ? null : Allocate(DType.F32, Math.Max(1, chunks), x.Cols);
            Launch("layernorm", "layernorm_backward_fused" + Suffix(x), chunks,
                [P(dx), P(pw), P(pb), P(dy), P(x), P(weight), P(mean), P(rstd), I(x.Rows), I(x.Cols)]);
            Launch("layernorm", "layernorm_backward_params_sum", ColumnGrid("layernorm", x.Cols),
                [P(dweight), P(dbias), P(pw), P(pb), I(chunks), I(x.Cols), I(accumulate ? 1 : 0)]);
            return;
        }
        if (dweight is not null)
        {
            int chunks = ColumnChunks(x.Rows);
            using var pw = Allocate(DType.F32, Math.Max(1, chunks), x.Cols);
            using var pb = dbias is null ? null : Allocate(DType.F32, Math.Max(1, chunks), x.Cols);
            Launch("layernorm", "layernorm_backward_params_partial" + Suffix(x), ColumnGrid("layernorm", x.Cols),
                [P(pw), P(pb), P(dy), P(x), P(mean), P(rstd), I(x.Rows), I(x.Cols)], gridY: chunks);
            Launch("layernorm", "layernorm_backward_params_sum", ColumnGrid("layernorm", x.Cols),
                [P(dweight), P(dbias), P(pw), P(pb), I(chunks), I(x.Cols), I(accumulate ? 1 : 0)]);
        }
        Launch("layernorm", "layernorm_backward" + Suffix(x), x.Rows,
            [P(dx), P(dy), P(x), P(weight), P(mean), P(rstd), I(x.Rows), I(x.Cols)]);
    }

    // ---- rope, activations, softmax -------------------------------------------------------------------------------------
    protected override void RopeCore(Tensor x, Tensor positions, Tensor y, float theta, RopeTable? table, bool forward) =>
        LaunchStride("rope", (forward ? "rope_forward" : "rope_backward") + Suffix(x), x.Length / 2,
            [P(y), P(x), P(positions), P(table?.Values), I(table?.Positions ?? 0), I(x.Dim(0)), I(x.Dim(1)), I(x.Dim(2)), Fl(theta)]);

    protected override void SwiGluForwardCore(Tensor gate, Tensor up, Tensor y)
    {
        long packs = Packs(gate, up, y);
        if (packs > 0) LaunchStride("swiglu", "swiglu_forward_vec" + Suffix(gate), packs, [P(y), P(gate), P(up), L(packs)]);
        else LaunchStride("swiglu", "swiglu_forward" + Suffix(gate), gate.Length, [P(y), P(gate), P(up), L(gate.Length)]);
    }

    protected override void SwiGluBackwardCore(Tensor dy, Tensor gate, Tensor up, Tensor dgate, Tensor dup) =>
        LaunchStride("swiglu", "swiglu_backward" + Suffix(gate), gate.Length,
            [P(dgate), P(dup), P(dy), P(gate), P(up), L(gate.Length)]);

    protected override void GeluForwardCore(Tensor x, Tensor y, GeluApproximation approximation) =>
        LaunchStride("gelu", "gelu_forward" + Suffix(x), x.Length, [P(y), P(x), L(x.Length), I((int)approximation)]);

    protected override void GeluBackwardCore(Tensor dy, Tensor x, Tensor dx, GeluApproximation approximation) =>
        LaunchStride("gelu", "gelu_backward" + Suffix(x), x.Length, [P(dx), P(dy), P(x), L(x.Length), I((int)approximation)]);

    protected override void SoftmaxForwardCore(Tensor x, Tensor y, float scale) =>
        Launch("softmax", "softmax_forward" + Suffix(x), x.Rows, [P(y), P(x), I(x.Rows), I(x.Cols), Fl(scale)]);

    protected override void SoftmaxBackwardCore(Tensor dy, Tensor y, Tensor dx, float scale) =>
        Launch("softmax", "softmax_backward" + Suffix(y), y.Rows, [P(dx), P(dy), P(y), I(y.Rows), I(y.Cols), Fl(scale)]);

    // ---- embedding and loss -----------------------------------------------------------------------------------------------
    private void ResetError() => CudaDriver.MemsetD32Async(_errorWord, 0xFFFFFFFFu, 1, _stream.Handle);

    /// <summary>Reads the error word the kernel set (a synchronising 8-byte read) and throws on a bad id.</summary>
    private void ThrowOnBadId(string op, string tensor, int vocab)
    {
        var word = stackalloc int[2];
        CudaDriver.CopyDtoHAsync(word, _errorWord, 8, _stream.Handle);
        _stream.Synchronize();
        if (word[0] >= 0) throw IdOutOfRange(op, tensor, word[0], word[1], vocab);
    }

    protected override void EmbeddingForwardCore(Tensor table, Tensor ids, Tensor output)
    {
        ResetError();
        // Grid x: one block row per token; grid y: enough column blocks to cover the row once.
        Launch("embedding", "embedding_forward" + Suffix(table), ids.Length,
            [P(output), P(table), P(ids), I((int)ids.Length), I(table.Dim(1)), I(table.Dim(0)), _errorWord], gridY: Math.Min(ColumnGrid("embedding", table.Dim(1)), 65535));
        ThrowOnBadId("embedding_forward", "ids", table.Dim(0));
    }

    protected override void EmbeddingBackwardCore(Tensor doutput, Tensor order, Tensor starts, Tensor rows, Tensor dtable) =>
        LaunchStride("embedding", "embedding_backward" + Suffix(doutput), rows.Length * dtable.Dim(1),
            [P(dtable), P(doutput), P(order), P(starts), P(rows), I((int)rows.Length), I(dtable.Dim(1))]);

    protected override void CrossEntropyForwardCore(Tensor logits, Tensor targets, Tensor logprob, Tensor lse, int ignoreIndex)
    {
        ResetError();
        Launch("cross_entropy", "cross_entropy_forward" + Suffix(logits), logits.Rows,
            [P(logprob), P(lse), P(logits), P(targets), I(logits.Rows), I(logits.Cols), I(ignoreIndex), _errorWord, I(Packed(logits) ? 1 : 0)]);
        ThrowOnBadId("cross_entropy_forward", "targets", logits.Cols);
    }

    protected override void CrossEntropyBackwardCore(Tensor logits, Tensor targets, Tensor lse, Tensor dlogprob, Tensor dlogits, int ignoreIndex) =>
        Launch("cross_entropy", "cross_entropy_backward" + Suffix(logits), logits.Rows,
            [P(dlogits), P(logits), P(lse), P(targets), P(dlogprob), I(logits.Rows), I(logits.Cols), I(ignoreIndex), I(Packed(logits) && P(dlogits) % 16 == 0 ? 1 : 0)]);

    /// <summary>Whether a [rows, cols] tensor's rows are 16-byte vectors of its storage type (aligned start, whole vectors per row).</summary>
    private static bool Packed(Tensor t) => P(t) % 16 == 0 && t.Cols % (16 / t.DType.Size()) == 0;

    // ---- attention and rows ---------------------------------------------------------------------------------------------------
    /// <summary>Blocks for one warp per item.</summary>
    private long WarpGrid(string family, long items) => Math.Max(1, (items * 32 + Compiler.Tuning.Block(family) - 1) / Compiler.Tuning.Block(family));

    protected override void AttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), hkv = k.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        Launch("attention", "attention_forward" + Suffix(q), WarpGrid("attention", (long)t * h),
            [P(output), P(lse), P(q), P(k), P(v), P(sequences.Device), I(sequences.Count), I(t), I(h), I(hkv), I(d), Fl(scale), I(causal ? 1 : 0)]);
    }

    /// <summary>
    /// The tensor-core schedule's domain: bf16, head dims 64/80/96/128, every tensor's rows 16-byte aligned (what its
    /// 16-byte loads need). Training, prefill and every stage's passes take it by default (<see cref="AttentionVariant.Auto"/>).
    /// </summary>
    public static bool TiledFits(DType type, int headDim, params ulong[] addresses) =>
        type == DType.BF16 && TiledHeadDims.Contains(headDim) && addresses.All(a => a % 16 == 0);

    protected override bool RunsTiledNatively(Tensor q, Tensor k, Tensor v) => TiledFits(q.DType, q.Dim(2), P(q), P(k), P(v));

    protected override void CheckTiledAttention(Tensor q)
    {
        if (q.DType != DType.BF16) throw new ArgumentException($"attention_forward: the tiled (tensor-core) variant needs bf16 tensors, q is {q.DType.Name()}");
        // 16-byte vector loads: every row starts 16-byte aligned when the tensors do.
        foreach (var t in new[] { q })
            if (P(t) % 16 != 0) throw new ArgumentException($"attention_forward: {t} is not 16-byte aligned for the tiled variant");
    }

    protected override void TiledAttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), hkv = k.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        RequireAligned("attention_forward", "tiled", k, v, output);
        var (tiles, tileDevice) = sequences.TileOffsets(AttentionTileRows);
        EnsureCurrent();
        var f = Function("attention_mma", $"attention_mma_forward_d{d}_bf16");
        int block = Compiler.Tuning.Block("attention_mma");
        ReadOnlySpan<ulong> args = [P(output), P(lse), P(q), P(k), P(v), P(sequences.Device), P(tileDevice), I(sequences.Count), I(h), I(hkv), Fl(scale), I(causal ? 1 : 0)];
        if (tiles[^1] > 0)
            CudaDriver.Launch(f.Handle, new Dim3((uint)tiles[^1], (uint)h), new Dim3((uint)block), 0, _stream.Handle, args);
    }

    protected override void TiledAttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), hkv = k.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        RequireAligned("attention_backward", "tiled", k, v, output, dout, dq, dk, dv);
        using var delta = Allocate(DType.F32, t, h);
        Launch("attention", "attention_backward_delta_bf16", WarpGrid("attention", (long)t * h), [P(delta), P(output), P(dout), I(t), I(h), I(d)]);
        var (tiles, tileDevice) = sequences.TileOffsets(AttentionTileRows);
        if (tiles[^1] == 0) return;
        int block = Compiler.Tuning.Block("attention_mma");
        var dqf = Function("attention_mma", $"attention_mma_backward_dq_d{d}_bf16");
        ReadOnlySpan<ulong> dqArgs = [P(dq), P(q), P(k), P(v), P(dout), P(lse), P(delta), P(sequences.Device), P(tileDevice), I(sequences.Count), I(h), I(hkv), Fl(scale), I(causal ? 1 : 0)];
        CudaDriver.Launch(dqf.Handle, new Dim3((uint)tiles[^1], (uint)h), new Dim3((uint)block), 0, _stream.Handle, dqArgs);
        var kvf = Function("attention_mma", $"attention_mma_backward_dkdv_d{d}_bf16");
        ReadOnlySpan<ulong> kvArgs = [P(dk), P(dv), P(q), P(k), P(v), P(dout), P(lse), P(delta), P(sequences.Device), P(tileDevice), I(sequences.Count), I(h), I(hkv), Fl(scale), I(causal ? 1 : 0)];
        CudaDriver.Launch(kvf.Handle, new Dim3((uint)tiles[^1], (uint)hkv), new Dim3((uint)block), 0, _stream.Handle, kvArgs);
    }

    protected override int Multiprocessors => Device.MultiprocessorCount;

    /// <summary>
    /// The flash backward holds up to 148 KB of shared memory a block (D = 128): A100, H100 and H200 take it; GPUs with
    /// 99 KB a block (sm_86, sm_89) run the tiled kernels under Auto instead.
    /// </summary>
    protected override bool FlashFits(int headDim) =>
        Math.Max(FlashForwardSharedBytes(headDim), FlashBackwardSharedBytes(headDim)) <= Device.MaxSharedMemoryPerBlockOptin;

    private void RequireFlashFits(string op, int headDim)
    {
        if (!FlashFits(headDim))
            throw new ArgumentException($"{op}: the flash variant needs {FlashBackwardSharedBytes(headDim)} bytes of shared memory a block at head dim {headDim}; "
                + $"{Device.Name} allows {Device.MaxSharedMemoryPerBlockOptin}: use AttentionVariant.Tiled (Auto does)");
    }

    /// <summary>The tensor-core attentions' 16-byte loads and stores need every tensor 16-byte aligned.</summary>
    private static void RequireAligned(string op, string variant, params Tensor[] tensors)
    {
        foreach (var x in tensors)
            if (P(x) % 16 != 0) throw new ArgumentException($"{op}: {x} is not 16-byte aligned for the {variant} variant");
    }

    /// <summary>Launches a flash kernel with its dynamic shared memory (above 48 KB only after the function allows it).</summary>
    private void LaunchFlash(string kernel, Dim3 grid, int threads, int sharedBytes, ReadOnlySpan<ulong> args)
    {
        EnsureCurrent();
        LaunchLog?.Add(("attention_flash", kernel));
        var f = Function("attention_flash", kernel);
        if (sharedBytes > 48 * 1024 && _flashShared.Add(kernel))
            CudaDriver.SetFunctionAttribute(f.Handle, CuFunctionAttribute.MaxDynamicSharedSizeBytes, sharedBytes);
        CudaDriver.Launch(f.Handle, grid, new Dim3((uint)threads), (uint)sharedBytes, _stream.Handle, args);
    }

    private readonly HashSet<string> _flashShared = new();

    /// <summary>Shared memory of the flash kernels (bf16 tiles; rows padded by 8 where the head dim is not a multiple of 64).</summary>
    public static int FlashForwardSharedBytes(int d) => (FlashTileRows + 2 * FlashKeysPerTile) * FlashStride(d) * 2;

    public static int FlashBackwardSharedBytes(int d) =>
        (2 * FlashTileRows + 4 * FlashBackwardQueryRows) * FlashStride(d) * 2 + FlashTileRows * FlashBackwardQueryRows * 2 + 4 * FlashBackwardQueryRows * 4;

    /// <summary>Query rows per tile of the flash backward (a block's 128 keys walk them).</summary>
    public const int FlashBackwardQueryRows = 64;

    private static int FlashStride(int d) => (d / 8) % 8 == 0 ? d : d + 8;

    protected override void FlashAttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), hkv = k.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        RequireAligned("attention_forward", "flash", k, v, output);
        RequireFlashFits("attention_forward", d);
        var (tiles, tileDevice) = sequences.TileOffsets(FlashTileRows);
        if (tiles[^1] == 0) return;
        LaunchFlash($"attention_flash_forward_d{d}_bf16", new Dim3((uint)tiles[^1], (uint)h), Compiler.Tuning.Block("attention_flash"), FlashForwardSharedBytes(d),
            [P(output), P(lse), P(q), P(k), P(v), P(sequences.Device), P(tileDevice), I(sequences.Count), I(h), I(hkv), Fl(scale), I(causal ? 1 : 0)]);
    }

    protected override void FlashAttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), hkv = k.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        RequireAligned("attention_backward", "flash", k, v, output, dout);   // dq, dk, dv are written element by element
        RequireFlashFits("attention_backward", d);
        var (tiles, tileDevice) = sequences.TileOffsets(FlashTileRows);
        int splits = FlashSplitsFor(h, tiles[^1], t, d);
        using var delta = Allocate(DType.F32, t, h);
        using var partial = Allocate(DType.F32, splits, t, h, d);
        using var dkHeads = Allocate(DType.F32, t, h, d);
        using var dvHeads = Allocate(DType.F32, t, h, d);
        Launch("attention", "attention_backward_delta_bf16", WarpGrid("attention", (long)t * h), [P(delta), P(output), P(dout), I(t), I(h), I(d)]);
        CudaDriver.MemsetAsync(P(partial), 0, partial.Length * 4, _stream.Handle);
        LaunchFlash($"attention_flash_backward_d{d}_bf16", new Dim3((uint)splits, (uint)h), FlashBackwardThreads, FlashBackwardSharedBytes(d),
            [P(partial), P(dkHeads), P(dvHeads), P(q), P(k), P(v), P(dout), P(lse), P(delta), P(sequences.Device), P(tileDevice),
             I(sequences.Count), I(t), I(h), I(hkv), Fl(scale), I(causal ? 1 : 0)]);
        LaunchStride("attention_flash", "attention_flash_dq_reduce", dq.Length, [P(dq), P(partial), I(splits), L(dq.Length), Fl(scale)]);
        LaunchStride("attention_flash", "attention_flash_dkdv_reduce", dk.Length, [P(dk), P(dv), P(dkHeads), P(dvHeads), I(h), I(hkv), I(d), L(dk.Length), Fl(scale)]);
    }

    /// <summary>Threads of a flash backward block (8 warps x 16 keys).</summary>
    public const int FlashBackwardThreads = 256;

    protected override void AttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), hkv = k.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        using var delta = Allocate(DType.F32, t, h);
        Launch("attention", "attention_backward_delta" + Suffix(q), WarpGrid("attention", (long)t * h), [P(delta), P(output), P(dout), I(t), I(h), I(d)]);
        Launch("attention", "attention_backward_dq" + Suffix(q), WarpGrid("attention", (long)t * h),
            [P(dq), P(q), P(k), P(v), P(dout), P(lse), P(delta), P(sequences.Device), I(sequences.Count), I(t), I(h), I(hkv), I(d), Fl(scale), I(causal ? 1 : 0)]);
        Launch("attention", "attention_backward_dkdv" + Suffix(q), WarpGrid("attention", (long)t * hkv),
            [P(dk), P(dv), P(q), P(k), P(v), P(dout), P(lse), P(delta), P(sequences.Device), I(sequences.Count), I(t), I(h), I(hkv), I(d), Fl(scale), I(causal ? 1 : 0)]);
    }

    protected override void ScatterRowsCore(Tensor source, RowIndex rows, Tensor destination) =>
        LaunchStride("rows", "scatter_rows" + Suffix(source), source.Length, [P(destination), P(source), P(rows.Device), I(source.Rows), I(source.Cols)]);

    protected override void ScaleColumnsCore(Tensor x, Tensor scale, Tensor y) =>
        LaunchStride("rows", "scale_columns" + Suffix(x), x.Length, [P(y), P(x), P(scale), I(x.Rows), I(x.Cols)]);

    protected override void ScaleColumnsBackwardCore(Tensor dy, Tensor x, Tensor dscale, bool accumulate) =>
        Launch("rows", "scale_columns_backward" + Suffix(x), ColumnGrid("rows", x.Cols), [P(dscale), P(dy), P(x), I(x.Rows), I(x.Cols), I(accumulate ? 1 : 0)]);

    // ---- paged KV cache and sampling -------------------------------------------------------------------------------------
    protected override void KvAppendCore(Tensor k, Tensor v, RowIndex slots, Tensor kCache, Tensor vCache) =>
        LaunchStride("paged_attention", "kv_append" + Suffix(k), k.Length,
            [P(kCache), P(vCache), P(k), P(v), P(slots.Device), I(k.Dim(0)), I(k.Dim(1)), I(k.Dim(2))]);

    protected override void PagedAttentionDecodeCore(Tensor q, Tensor kCache, Tensor vCache, PagedBatch batch, Tensor output, float scale, int splitBlocks)
    {
        int splits = (batch.MaxBlocks + splitBlocks - 1) / splitBlocks, heads = q.Dim(1), dim = q.Dim(2);
        using var partialO = Allocate(DType.F32, batch.Batch * heads * splits, dim);
        using var partialLse = Allocate(DType.F32, batch.Batch * heads * splits);
        Launch("paged_attention", "paged_decode_partial" + Suffix(q), WarpGrid("paged_attention", (long)batch.Batch * heads * splits),
            [P(partialO), P(partialLse), P(q), P(kCache), P(vCache), P(batch.Tables), P(batch.Lengths), I(batch.Batch), I(batch.MaxBlocks),
             I(batch.BlockSize), I(heads), I(kCache.Dim(1)), I(dim), I(splits), I(splitBlocks), Fl(scale)]);
        Launch("paged_attention", "paged_decode_combine" + Suffix(q), WarpGrid("paged_attention", (long)batch.Batch * heads),
            [P(output), 0, P(partialO), P(partialLse), I(batch.Batch * heads), I(splits), I(dim)]);
    }

    protected override (int[] Tokens, float[] LogProbs) SampleCore(Tensor logits, SamplingInputs x, int vocab)
    {
        int n = x.Count;
        using var tTokens = Allocate(DType.I32, n);
        using var tLogp = Allocate(DType.F32, n);
        Launch("sampling", "sample" + Suffix(logits), n,
            [P(tTokens), P(tLogp), P(logits), P(x.Previous), P(x.Offsets), P(x.Temperature), P(x.TopK), P(x.TopP), P(x.MinP), P(x.Penalty), P(x.Seeds), P(x.Steps),
             I(vocab), I(logits.Dim(1))]);
        return (tTokens.ToIntArray(), tLogp.ToFloatArray());
    }

    // ---- fused GRPO loss ----------------------------------------------------------------------------------------------------
    protected override void ChunkLseUpdateCore(Tensor chunk, Tensor targets, int colOffset, float inverseTemperature, Tensor m, Tensor s, Tensor targetLogit) =>
        Launch("grpo_loss", "chunk_lse_update" + Suffix(chunk), chunk.Rows,
            [P(m), P(s), P(targetLogit), P(chunk), P(targets), I(chunk.Rows), I(chunk.Cols), I(colOffset), Fl(inverseTemperature)]);

    protected override void GrpoTokenLossCore(Tensor m, Tensor s, Tensor targetLogit, Tensor targets, Tensor oldLogp, Tensor? refLogp, Tensor advantage,
        Tensor weight, GrpoLossSettings g, Tensor loss, Tensor dlogp, Tensor logp) =>
        LaunchStride("grpo_loss", "grpo_token_loss", targets.Length,
            [P(loss), P(dlogp), P(logp), P(m), P(s), P(targetLogit), P(targets), P(oldLogp), P(refLogp), P(advantage), P(weight), I((int)targets.Length),
             Fl(g.EpsLow), Fl(g.EpsHigh), Fl(g.DualClip), Fl(g.KlCoef), I((int)g.Kl)]);

    protected override void ChunkLogitGradCore(Tensor chunk, Tensor m, Tensor s, Tensor targets, Tensor dlogp, int colOffset, float inverseTemperature) =>
        Launch("grpo_loss", "chunk_logit_grad" + Suffix(chunk), chunk.Rows,
            [P(chunk), P(m), P(s), P(targets), P(dlogp), I(chunk.Rows), I(chunk.Cols), I(colOffset), Fl(inverseTemperature)]);

    // ---- optimiser ---------------------------------------------------------------------------------------------------------
    protected override void AdamWCore(Tensor master, Tensor grad, Tensor m, Tensor v, Tensor? workingCopy, AdamWSettings s, int step, float gradScale)
    {
        var (stepSize, invSqrtBc2, decay) = Cpu.AdamWArgs.Scalars(s, step);
        // Four elements a thread with 16-byte accesses where the sizes and addresses allow; the per-element arithmetic is the same.
        bool vector = master.Length % 4 == 0 && new[] { P(master), P(grad), P(m), P(v) }.All(a => a % 16 == 0) && (workingCopy is null || P(workingCopy) % 8 == 0);
        long n = vector ? master.Length / 4 : master.Length;
        LaunchStride("adamw", vector ? "adamw_update4" : "adamw_update", n,
            [P(master), P(workingCopy), P(grad), P(m), P(v), L(n), Fl(s.Beta1), Fl(s.Beta2), Fl(s.Epsilon), Fl(stepSize), Fl(invSqrtBc2), Fl(decay), Fl(gradScale)]);
    }

    /// <summary>Elements per chunk of adamw_multi (ADAMW_CHUNK in kernels/adamw.cu).</summary>
    public const int AdamWChunk = 16384;

    /// <summary>
    /// adamw_multi's table: 16 ints (64 bytes) per tensor, the layout of struct AdamWTensor (five pointers, n,
    /// first_chunk, vector, pad), and the total chunk count.
    /// </summary>
    public static (int[] Table, long Chunks) AdamWTable(IReadOnlyList<(ulong Master, ulong Copy, ulong Grad, ulong M, ulong V, long N)> tensors)
    {
        var table = new int[tensors.Count * 16];
        long chunks = 0;
        for (int i = 0; i < tensors.Count; i++)
        {
            var t = tensors[i];
            bool vector = t.N % 4 == 0 && new[] { t.Master, t.Grad, t.M, t.V }.All(a => a % 16 == 0) && t.Copy % 8 == 0;
            var row = MemoryMarshal.Cast<int, long>(table.AsSpan(i * 16, 16));
            row[0] = (long)t.Master; row[1] = (long)t.Copy; row[2] = (long)t.Grad; row[3] = (long)t.M; row[4] = (long)t.V;
            row[5] = t.N; row[6] = chunks; row[7] = vector ? 1 : 0;
            chunks += (t.N + AdamWChunk - 1) / AdamWChunk;
        }
        return (table, chunks);
    }

    protected override void AdamWManyCore(IReadOnlyList<AdamWTensors> tensors, AdamWSettings s, int step, float gradScale)
    {
        var (stepSize, invSqrtBc2, decay) = Cpu.AdamWArgs.Scalars(s, step);
        var (table, chunks) = AdamWTable([.. tensors.Select(t => (P(t.Master), P(t.WorkingCopy), P(t.Grad), P(t.M), P(t.V), t.Master.Length))]);
        if (chunks == 0) return;
        using var device = FromArray(table, [table.Length], "adamw_table");
        Launch("adamw", "adamw_multi", OneWave("adamw", "adamw_multi", chunks),   // a block per chunk, in a grid-stride loop over chunks
            [P(device), I(tensors.Count), L(chunks), Fl(s.Beta1), Fl(s.Beta2), Fl(s.Epsilon), Fl(stepSize), Fl(invSqrtBc2), Fl(decay), Fl(gradScale)]);
    }

    protected override double SumOfSquaresCore(IReadOnlyList<Tensor> tensors)
    {
        using var total = Allocate(DType.F32, 1);
        using var partial = Allocate(DType.F32, MaxNormPartials);
        bool first = true;
        foreach (var t in tensors)
        {
            long grid = Math.Min(StrideGrid("grad_norm", t.Length), MaxNormPartials);
            Launch("grad_norm", "sumsq_partial" + Suffix(t), grid, [P(partial), P(t), L(t.Length)]);
            Launch("grad_norm", "sum_partials", 1, [P(total), P(partial), I((int)grid), I(first ? 0 : 1)]);
            first = false;
        }
        return total.ToFloatArray()[0];
    }

    private bool _disposed;

    public override void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        EnsureCurrent();
        _stream.Synchronize();
        foreach (var m in _modules.Values) m.Dispose();
        _pool.Dispose();
        CudaDriver.Free(_errorWord);
        CudaDriver.Free(_workspace);
        _cublasLt.Dispose();
        _cublas.Dispose();
        _stream.Dispose();
        _context.Dispose();
    }
}
