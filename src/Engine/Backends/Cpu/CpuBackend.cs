using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Backends.Cpu;

internal sealed class CpuBlock(MemoryBuffer1D<byte, Stride1D.Dense> buffer) : DeviceBlock(buffer.Length)
{
    public MemoryBuffer1D<byte, Stride1D.Dense> Buffer { get; } = buffer;
}

/// <summary>
/// The CPU backend: fp32 compute through ILGPU's CPU accelerator (the twins of the CUDA kernels, thread per row or
/// per element) and SIMD C# GEMMs over the same host buffers. bf16 tensors can be stored (the AdamW working copy,
/// conversions) but ops compute in fp32 only.
/// </summary>
public sealed unsafe class CpuBackend : Backend
{
    private readonly Context _context;
    private readonly Accelerator _accelerator;
    private readonly MemoryPool<CpuBlock> _pool;

    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, float, float, int, int> _axpby;
    private readonly Action<Index1D, ArrayView<ushort>, ArrayView<float>, int> _toBf16;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<ushort>, int> _fromBf16;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, int> _biasAdd;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, int, int> _biasBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float, int> _rmsForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int> _rmsBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int> _rmsBackwardWeight;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float> _lnForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> _lnBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int> _lnBackwardParams;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, int, int, float, float, int> _rope;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> _swigluForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> _swigluBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, int> _geluForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> _geluBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, float> _softmaxForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, float> _softmaxBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int> _embeddingForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, ArrayView<int>, int> _embeddingBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int> _ceForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, int> _ceBackward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<ushort>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamWArgs, int> _adamw;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, long, int> _sumsqPartial;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, int> _sumPartials;

    /// <summary>
    /// Threads of a grid-stride launch: a few per core. Each simulated ILGPU thread costs about as much as a thousand
    /// fp32 operations to schedule, so the CPU twins loop like the CUDA kernels' grid-stride FOR_EACH instead.
    /// </summary>
    private const int StrideThreads = 64;
    private readonly bool _launchTwins;

    private static int Grid(long n) => (int)Math.Clamp(n, 1, StrideThreads);

    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs> _attnForward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> _attnDelta;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, AttentionArgs, int> _attnDqFlash;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int, float> _attnDqReduce;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs> _attnDkDvFlash;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs> _attnHeadsReduce;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs, int> _attnTiled;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs> _attnDqTiled;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs> _attnDkDvTiled;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs> _attnDq;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs> _attnDkDv;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int> _scatterRows;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> _scaleColumns;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int> _scaleColumnsBackward;

    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int> _kvAppend;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, PagedArgs> _pagedPartial;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> _pagedCombine;
    private readonly Action<Index1D, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, ArrayView<float>, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<ulong>, ArrayView<int>, ArrayView<byte>, SampleShape> _sample;

    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int, float> _chunkLse;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GrpoArgs> _grpoTokenLoss;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, int, float> _chunkGrad;

    /// <summary>Elements per partial sum of the norm kernels (the CUDA twin uses one block per chunk).</summary>
    private const int NormChunk = 1 << 14;

    /// <param name="threads">Simulated multiprocessors (each runs a warp of 2 threads); measured fastest at the core count.</param>
    /// <param name="launchTwins">Launch the ILGPU twins for the ops that otherwise run as host loops (<see cref="HostOps"/>):
    /// the same results, bit for bit, far slower; for the tests that hold the two together.</param>
    /// <param name="activationType">
    /// F32 (the default), or BF16: activations and working weights stored in bf16 where the CUDA backend stores them.
    /// Each op then reads its bf16 tensors widened to fp32 and rounds what it wrote back to bf16 when it ends (round to
    /// nearest even), as a CUDA kernel loads bf16, computes in fp32 and rounds on store: the reference that puts the
    /// roundings where the CUDA model has them.
    /// </param>
    public CpuBackend(int threads = 0, bool launchTwins = false, DType activationType = DType.F32)
    {
        if (activationType == DType.I32) throw new ArgumentException("activation type must be fp32 or bf16");
        _bf16 = activationType == DType.BF16;
        _launchTwins = launchTwins;
        _context = Context.Create(b => b.CPU(new CPUDevice(2, 1, threads > 0 ? threads : Environment.ProcessorCount)));
        _accelerator = _context.CreateCPUAccelerator(0);
        _pool = new MemoryPool<CpuBlock>(bytes => new CpuBlock(_accelerator.Allocate1D<byte>(bytes)), b => b.Buffer.Dispose());

        var acc = _accelerator;
        _axpby = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, float, float, int, int>(ElementwiseKernels.Axpby);
        _toBf16 = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<ushort>, ArrayView<float>, int>(ElementwiseKernels.ConvertF32ToBf16);
        _fromBf16 = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<ushort>, int>(ElementwiseKernels.ConvertBf16ToF32);
        _biasAdd = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, int>(BiasKernels.Add);
        _biasBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, int, int>(BiasKernels.Backward);
        _rmsForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float, int>(RmsNormKernels.Forward);
        _rmsBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int>(RmsNormKernels.Backward);
        _rmsBackwardWeight = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int>(RmsNormKernels.BackwardWeight);
        _lnForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float>(LayerNormKernels.Forward);
        _lnBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>(LayerNormKernels.Backward);
        _lnBackwardParams = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int>(LayerNormKernels.BackwardParams);
        _rope = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, int, int, float, float, int>(RopeKernels.Rotate);
        _swigluForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>(SwiGluKernels.Forward);
        _swigluBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>(SwiGluKernels.Backward);
        _geluForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, int>(GeluKernels.Forward);
        _geluBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>(GeluKernels.Backward);
        _softmaxForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, float>(SoftmaxKernels.Forward);
        _softmaxBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, float>(SoftmaxKernels.Backward);
        _embeddingForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int>(EmbeddingKernels.Forward);
        _embeddingBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, ArrayView<int>, int>(EmbeddingKernels.Backward);
        _ceForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int>(CrossEntropyKernels.Forward);
        _ceBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, int>(CrossEntropyKernels.Backward);
        _adamw = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<ushort>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamWArgs, int>(AdamWKernels.Update);
        _sumsqPartial = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, long, int>(GradNormKernels.SumSquaresPartial);
        _attnForward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs>(AttentionKernels.Forward);
        _attnTiled = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs, int>(AttentionKernels.ForwardTiled);
        _attnDqTiled = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs>(AttentionKernels.BackwardDqTiled);
        _attnDkDvTiled = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs>(AttentionKernels.BackwardDkDvTiled);
        _attnDelta = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>(AttentionKernels.Delta);
        _attnDqFlash = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, AttentionArgs, int>(AttentionKernels.BackwardDqFlash);
        _attnDqReduce = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, float>(AttentionKernels.FlashDqReduce);
        _attnDkDvFlash = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs>(AttentionKernels.BackwardDkDvFlash);
        _attnHeadsReduce = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionKernels.FlashHeadsReduce);
        _attnDq = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs>(AttentionKernels.BackwardDq);
        _attnDkDv = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, AttentionArgs>(AttentionKernels.BackwardDkDv);
        _scatterRows = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int>(RowsKernels.ScatterRows);
        _scaleColumns = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>(RowsKernels.ScaleColumns);
        _scaleColumnsBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, int>(RowsKernels.ScaleColumnsBackward);
        _kvAppend = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int>(PagedAttentionKernels.KvAppend);
        _pagedPartial = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, PagedArgs>(PagedAttentionKernels.DecodePartial);
        _pagedCombine = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>(PagedAttentionKernels.Combine);
        _sample = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<int>, ArrayView<float>, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<ulong>, ArrayView<int>, ArrayView<byte>, SampleShape>(SamplingKernels.Sample);
        _chunkLse = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, int, int, float>(GrpoLossKernels.ChunkLseUpdate);
        _grpoTokenLoss = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GrpoArgs>(GrpoLossKernels.TokenLoss);
        _chunkGrad = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, int, float>(GrpoLossKernels.ChunkLogitGrad);
        _sumPartials = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int, int>(GradNormKernels.SumPartials);
    }

    /// <summary>
    /// Run attention (row-wise forward and backward, paged decode) through the ILGPU twins of kernels/attention.cu and
    /// kernels/paged_attention.cu (what the twin tests check) instead of the SIMD host path <see cref="CpuAttention"/>
    /// (the default: the same results to fp32 rounding, several times faster on a CPU).
    /// </summary>
    public bool AttentionTwins { get; set; }

    public override string Name => "cpu";
    public override DType ActivationType => _bf16 ? DType.BF16 : DType.F32;

    private readonly bool _bf16;

    // bf16 storage: per op, each bf16 region read as fp32 (keyed by block, offset and length, so an in-place op's input
    // and output share one buffer), rounded back when the outermost op ends.
    private readonly Dictionary<(DeviceBlock Block, long Offset, long Length), CpuBlock> _staged = new();

    protected override bool StagesOps => _bf16;

    private CpuBlock Staged(Tensor t)
    {
        if (!InOp) throw new InvalidOperationException($"bf16 storage: {t} was read outside an op");
        var key = (t.Block, t.ByteOffset, t.Length);
        if (_staged.TryGetValue(key, out var s)) return s;
        _accelerator.Synchronize();
        s = _pool.Rent(Math.Max(4, t.Length * 4));
        HostOps.FromBf16((float*)s.Buffer.NativePtr, (ushort*)((byte*)((CpuBlock)t.Block).Buffer.NativePtr + t.ByteOffset), t.Length);
        _staged[key] = s;
        return s;
    }

    protected override void OpFinished()
    {
        if (_staged.Count == 0) return;
        _accelerator.Synchronize();
        foreach (var ((block, offset, length), s) in _staged)
        {
            HostOps.ToBf16((ushort*)((byte*)((CpuBlock)block).Buffer.NativePtr + offset), (float*)s.Buffer.NativePtr, length);
            _pool.Return(s);
        }
        _staged.Clear();
    }
    public override MemoryStats Memory => _pool.Stats;
    public override void ResetPeakMemory() => _pool.ResetPeak();

    protected override void CheckSupported(DType dtype) { }

    protected override void CheckCompute(Tensor t, string op, string name)
    {
        if (t.DType != DType.F32 && !(_bf16 && t.DType == DType.BF16)) throw new ArgumentException($"{op}: {name} ({t}) is {t.DType.Name()}; the cpu backend computes in fp32 only");
    }

    // ---- memory -----------------------------------------------------------------------------------------
    protected override DeviceBlock RentBlock(long bytes) => _pool.Rent(bytes);
    internal override void Release(DeviceBlock block) => _pool.Return((CpuBlock)block);
    public override void Synchronize() => _accelerator.Synchronize();

    private static ArrayView<byte> Bytes(Tensor t) => ((CpuBlock)t.Block).Buffer.View.SubView(t.ByteOffset, t.Bytes);
    /// <summary>A float tensor's elements as fp32 (a bf16 tensor's staged fp32 copy under bf16 storage).</summary>
    private ArrayView<float> F(Tensor t) => (_bf16 && t.DType == DType.BF16 ? StagedBytes(t) : Bytes(t)).Cast<float>();

    private ArrayView<byte> StagedBytes(Tensor t) => Staged(t).Buffer.View.SubView(0, t.Length * 4);
    private static ArrayView<int> I(Tensor t) => Bytes(t).Cast<int>();
    private static ArrayView<ushort> H(Tensor t) => Bytes(t).Cast<ushort>();
    private ArrayView<float> F(Tensor? t, Tensor fallback) => t is null ? F(fallback) : F(t);

    /// <summary>Host pointers to the first fp32 / int32 element, after the launched kernels have finished.</summary>
    private float* P(Tensor t)
    {
        if (!(_bf16 && t.DType == DType.BF16)) return (float*)Pointer(t);
        var s = Staged(t);
        _accelerator.Synchronize();
        return (float*)s.Buffer.NativePtr;
    }
    private int* Pi(Tensor t) => (int*)Pointer(t);

    /// <summary>Host pointer to the first element (CPU accelerator memory is host memory).</summary>
    private void* Pointer(Tensor t)
    {
        _accelerator.Synchronize();
        return (byte*)((CpuBlock)t.Block).Buffer.NativePtr + t.ByteOffset;
    }

    public override void Zero(Tensor t)
    {
        Own(t, "zero");
        var at = (byte*)Pointer(t);
        for (long done = 0; done < t.Bytes;) // spans are int-sized; a real-width embedding holds 3 GB
        {
            int n = (int)Math.Min(t.Bytes - done, 1 << 30);
            new Span<byte>(at + done, n).Clear();
            done += n;
        }
    }

    protected override void UploadFloats(Tensor t, ReadOnlySpan<float> data)
    {
        if (t.DType == DType.F32) data.CopyTo(new Span<float>(Pointer(t), data.Length));
        else
        {
            var dst = new Span<ushort>(Pointer(t), data.Length);
            for (int i = 0; i < data.Length; i++) dst[i] = BFloat16.FromFloat(data[i]);
        }
    }

    protected override void UploadBytesCore(Tensor t, long byteOffset, ReadOnlySpan<byte> bytes) =>
        bytes.CopyTo(new Span<byte>((byte*)Pointer(t) + byteOffset, bytes.Length));

    protected override void UploadInts(Tensor t, ReadOnlySpan<int> data) => data.CopyTo(new Span<int>(Pointer(t), data.Length));

    protected override float[] DownloadFloatsCore(Tensor t)
    {
        int n = checked((int)t.Length);
        if (t.DType == DType.F32) return new ReadOnlySpan<float>(Pointer(t), n).ToArray();
        var src = new ReadOnlySpan<ushort>(Pointer(t), n);
        var result = new float[n];
        for (int i = 0; i < n; i++) result[i] = BFloat16.ToFloat(src[i]);
        return result;
    }

    protected override int[] DownloadIntsCore(Tensor t) => new ReadOnlySpan<int>(Pointer(t), checked((int)t.Length)).ToArray();

    // ---- ops -----------------------------------------------------------------------------------------------
    protected override void GemmCore(Tensor a, bool transA, Tensor b, bool transB, Tensor c, Tensor? bias, float alpha, float beta, int batch, int m, int n, int k)
    {
        var pa = P(a);
        var pb = P(b);
        var pc = P(c);
        for (int i = 0; i < batch; i++)
            CpuGemm.Gemm(pa + (long)i * m * k, transA, pb + (long)i * k * n, transB, pc + (long)i * m * n, m, n, k, alpha, beta);
        if (bias is null) return;
        if (!_launchTwins) { HostOps.BiasAdd(pc, P(bias), n, c.Length); return; }
        int g = Grid(c.Length);
        _biasAdd(g, F(c), F(bias), n, g);
    }

    protected override void BiasBackwardCore(Tensor dy, Tensor dbias, bool accumulate)
    {
        if (!_launchTwins) { HostOps.BiasBackward(P(dbias), P(dy), dy.Rows, dy.Cols, accumulate); return; }
        _biasBackward(dy.Cols, F(dbias), F(dy), dy.Rows, dy.Cols, accumulate ? 1 : 0);
    }

    protected override void AxpbyCore(Tensor output, Tensor a, Tensor? b, float alpha, float beta)
    {
        if (!_launchTwins) { HostOps.Axpby(P(output), P(a), b is null ? null : P(b), alpha, beta, output.Length); return; }
        int g = Grid(output.Length);
        _axpby(g, F(output), F(a), F(b, a), alpha, beta, b is null ? 0 : 1, g);
    }

    protected override void ConvertCore(Tensor source, Tensor destination)
    {
        int g = Grid(source.Length);
        switch (source.DType, destination.DType)
        {
            case (DType.F32, DType.BF16) when !_launchTwins: HostOps.ToBf16((ushort*)Pointer(destination), P(source), source.Length); break;
            case (DType.F32, DType.BF16): _toBf16(g, H(destination), F(source), g); break;
            case (DType.BF16, DType.F32) when !_launchTwins: HostOps.FromBf16(P(destination), (ushort*)Pointer(source), source.Length); break;
            case (DType.BF16, DType.F32): _fromBf16(g, F(destination), H(source), g); break;
            case (DType.F32, DType.F32): AxpbyCore(destination, source, null, 1f, 0f); break;
            default: new ReadOnlySpan<byte>(Pointer(source), checked((int)source.Bytes)).CopyTo(new Span<byte>(Pointer(destination), checked((int)destination.Bytes))); break;
        }
    }

    protected override void RmsNormForwardCore(Tensor x, Tensor weight, Tensor y, Tensor rstd, float eps)
    {
        if (!_launchTwins) { HostOps.RmsNormForward(P(y), P(rstd), P(x), P(weight), x.Rows, x.Cols, eps); return; }
        int g = Grid(x.Rows);
        _rmsForward(g, F(y), F(rstd), F(x), F(weight), x.Rows, x.Cols, eps, g);
    }

    protected override void RmsNormBackwardCore(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate)
    {
        // The weight gradient reads dy before dx is written (dx may alias dy).
        if (!_launchTwins)
        {
            if (dweight is not null) HostOps.RmsNormBackwardWeight(P(dweight), P(dy), P(x), P(rstd), x.Rows, x.Cols, accumulate);
            HostOps.RmsNormBackward(P(dx), P(dy), P(x), P(weight), P(rstd), x.Rows, x.Cols);
            return;
        }
        if (dweight is not null) _rmsBackwardWeight(x.Cols, F(dweight), F(dy), F(x), F(rstd), x.Rows, x.Cols, accumulate ? 1 : 0);
        int g = Grid(x.Rows);
        _rmsBackward(g, F(dx), F(dy), F(x), F(weight), F(rstd), x.Rows, x.Cols, g);
    }

    protected override void LayerNormForwardCore(Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor mean, Tensor rstd, float eps)
    {
        if (!_launchTwins) { HostOps.LayerNormForward(P(y), P(mean), P(rstd), P(x), P(weight), bias is null ? null : P(bias), x.Rows, x.Cols, eps); return; }
        _lnForward(x.Rows, F(y), F(mean), F(rstd), F(x), F(weight), F(bias, weight), bias is null ? 0 : 1, x.Cols, eps);
    }

    protected override void LayerNormBackwardCore(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor dx, Tensor? dweight, Tensor? dbias, bool accumulate)
    {
        if (!_launchTwins)
        {
            if (dweight is not null)
                HostOps.LayerNormBackwardParams(P(dweight), dbias is null ? null : P(dbias), P(dy), P(x), P(mean), P(rstd), x.Rows, x.Cols, accumulate);
            HostOps.LayerNormBackward(P(dx), P(dy), P(x), P(weight), P(mean), P(rstd), x.Rows, x.Cols);
            return;
        }
        if (dweight is not null)
            _lnBackwardParams(x.Cols, F(dweight), F(dbias, dweight), dbias is null ? 0 : 1, F(dy), F(x), F(mean), F(rstd), x.Rows, x.Cols, accumulate ? 1 : 0);
        _lnBackward(x.Rows, F(dx), F(dy), F(x), F(weight), F(mean), F(rstd), x.Cols);
    }

    protected override void RopeCore(Tensor x, Tensor positions, Tensor y, float theta, RopeTable? table, bool forward)
    {
        var values = table?.Values ?? x; // no table: zero rows, the view is never read
        int rows = table?.Positions ?? 0;
        if (!_launchTwins) { HostOps.Rope(P(y), P(x), Pi(positions), P(values), rows, x.Dim(1), x.Dim(2), theta, forward ? 1f : -1f, x.Length); return; }
        int g = Grid(x.Length / 2);
        _rope(g, F(y), F(x), I(positions), F(values), rows, x.Dim(1), x.Dim(2), theta, forward ? 1f : -1f, g);
    }

    protected override void SwiGluForwardCore(Tensor gate, Tensor up, Tensor y)
    {
        if (!_launchTwins) { HostOps.SwiGluForward(P(y), P(gate), P(up), gate.Length); return; }
        int g = Grid(gate.Length);
        _swigluForward(g, F(y), F(gate), F(up), g);
    }

    protected override void SwiGluBackwardCore(Tensor dy, Tensor gate, Tensor up, Tensor dgate, Tensor dup)
    {
        if (!_launchTwins) { HostOps.SwiGluBackward(P(dgate), P(dup), P(dy), P(gate), P(up), gate.Length); return; }
        int g = Grid(gate.Length);
        _swigluBackward(g, F(dgate), F(dup), F(dy), F(gate), F(up), g);
    }

    protected override void GeluForwardCore(Tensor x, Tensor y, GeluApproximation approximation)
    {
        if (!_launchTwins) { HostOps.GeluForward(P(y), P(x), (int)approximation, x.Length); return; }
        int g = Grid(x.Length);
        _geluForward(g, F(y), F(x), (int)approximation, g);
    }

    protected override void GeluBackwardCore(Tensor dy, Tensor x, Tensor dx, GeluApproximation approximation)
    {
        if (!_launchTwins) { HostOps.GeluBackward(P(dx), P(dy), P(x), (int)approximation, x.Length); return; }
        int g = Grid(x.Length);
        _geluBackward(g, F(dx), F(dy), F(x), (int)approximation, g);
    }

    protected override void SoftmaxForwardCore(Tensor x, Tensor y, float scale) => _softmaxForward(x.Rows, F(y), F(x), x.Cols, scale);

    protected override void SoftmaxBackwardCore(Tensor dy, Tensor y, Tensor dx, float scale) => _softmaxBackward(y.Rows, F(dx), F(dy), F(y), y.Cols, scale);

    /// <summary>Host-side range check: CPU memory is host memory, so ids are checked before any thread reads them.</summary>
    private void CheckIds(Tensor ids, int vocab, string op, string tensor, int? ignoreIndex = null)
    {
        var span = new ReadOnlySpan<int>(Pointer(ids), checked((int)ids.Length));
        for (int i = 0; i < span.Length; i++)
            if ((span[i] < 0 || span[i] >= vocab) && span[i] != ignoreIndex)
                throw IdOutOfRange(op, tensor, i, span[i], vocab);
    }

    protected override void EmbeddingForwardCore(Tensor table, Tensor ids, Tensor output)
    {
        CheckIds(ids, table.Dim(0), "embedding_forward", "ids");
        if (!_launchTwins) { HostOps.EmbeddingForward(P(output), P(table), Pi(ids), table.Dim(1), output.Length); return; }
        int g = Grid(output.Length);
        _embeddingForward(g, F(output), F(table), I(ids), table.Dim(1), g);
    }

    protected override void EmbeddingBackwardCore(Tensor doutput, Tensor order, Tensor starts, Tensor rows, Tensor dtable)
    {
        if (!_launchTwins)
        {
            HostOps.EmbeddingBackward(P(dtable), P(doutput), Pi(order), Pi(starts), Pi(rows), (int)rows.Length, dtable.Dim(1));
            return;
        }
        _embeddingBackward(checked((int)(rows.Length * dtable.Dim(1))), F(dtable), F(doutput), I(order), I(starts), I(rows), dtable.Dim(1));
    }

    protected override void CrossEntropyForwardCore(Tensor logits, Tensor targets, Tensor logprob, Tensor lse, int ignoreIndex)
    {
        CheckIds(targets, logits.Cols, "cross_entropy_forward", "targets", ignoreIndex);
        if (!_launchTwins) { HostOps.CrossEntropyForward(P(logprob), P(lse), P(logits), Pi(targets), logits.Rows, logits.Cols, ignoreIndex); return; }
        _ceForward(logits.Rows, F(logprob), F(lse), F(logits), I(targets), logits.Cols, ignoreIndex);
    }

    protected override void CrossEntropyBackwardCore(Tensor logits, Tensor targets, Tensor lse, Tensor dlogprob, Tensor dlogits, int ignoreIndex)
    {
        CheckIds(targets, logits.Cols, "cross_entropy_backward", "targets", ignoreIndex);
        if (!_launchTwins)
        {
            HostOps.CrossEntropyBackward(P(dlogits), P(logits), P(lse), Pi(targets), P(dlogprob), logits.Rows, logits.Cols, ignoreIndex);
            return;
        }
        _ceBackward(logits.Rows, F(dlogits), F(logits), F(lse), I(targets), F(dlogprob), logits.Cols, ignoreIndex);
    }

    protected override void AdamWCore(Tensor master, Tensor grad, Tensor m, Tensor v, Tensor? workingCopy, AdamWSettings s, int step, float gradScale)
    {
        var args = AdamWArgs.Of(s, step, gradScale, workingCopy is not null);
        if (!_launchTwins)
        {
            HostOps.AdamW(P(master), workingCopy is null ? null : (ushort*)Pointer(workingCopy), P(grad), P(m), P(v), args, master.Length);
            return;
        }
        var copy = workingCopy is null ? Bytes(master).Cast<ushort>() : H(workingCopy);
        int g = Grid(master.Length);
        _adamw(g, F(master), copy, F(grad), F(m), F(v), args, g);
    }

    private static AttentionArgs AttnArgs(Tensor q, Tensor k, PackedSequences seq, float scale, bool causal) =>
        new(seq.Count, q.Dim(0), q.Dim(1), k.Dim(1), q.Dim(2), scale, causal ? 1 : 0);

    protected override void AttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        if (q.Dim(0) == 0) return;
        if (!AttentionTwins)
        {
            CpuAttention.Forward(P(q), P(k), P(v), P(output), P(lse), sequences.Host,
                q.Dim(1), k.Dim(1), q.Dim(2), scale, causal);
            return;
        }
        _attnForward(q.Dim(0) * q.Dim(1), F(output), F(lse), F(q), F(k), F(v), I(sequences.Device), AttnArgs(q, k, sequences, scale, causal));
    }

    protected override void TiledAttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        if (q.Dim(0) == 0) return;
        _attnTiled(q.Dim(0) * q.Dim(1), F(output), F(lse), F(q), F(k), F(v), I(sequences.Device), AttnArgs(q, k, sequences, scale, causal), q.Dim(2) >= 128 ? 32 : 64);
    }

    protected override void TiledAttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        if (q.Dim(0) == 0) return;
        var a = AttnArgs(q, k, sequences, scale, causal);
        using var delta = Allocate(DType.F32, q.Dim(0), q.Dim(1));
        _attnDelta(q.Dim(0) * q.Dim(1), F(delta), F(output), F(dout), q.Dim(2));
        _attnDqTiled(q.Dim(0) * q.Dim(1), F(dq), F(q), F(k), F(v), F(dout), F(lse), F(delta), I(sequences.Device), a);
        _attnDkDvTiled(k.Dim(0) * k.Dim(1), F(dk), F(dv), F(q), F(k), F(v), F(dout), F(lse), F(delta), I(sequences.Device), a);
    }

    /// <summary>The flash forward's twin is the tiled forward's with 64 keys per tile at every head dim (the kernel's tile).</summary>
    protected override void FlashAttentionForwardCore(Tensor q, Tensor k, Tensor v, PackedSequences sequences, Tensor output, Tensor lse, float scale, bool causal)
    {
        if (q.Dim(0) == 0) return;
        _attnTiled(q.Dim(0) * q.Dim(1), F(output), F(lse), F(q), F(k), F(v), I(sequences.Device), AttnArgs(q, k, sequences, scale, causal), FlashKeysPerTile);
    }

    protected override void FlashAttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        int t = q.Dim(0), h = q.Dim(1), d = q.Dim(2);
        if (t == 0) return;
        var a = AttnArgs(q, k, sequences, scale, causal);
        var (tiles, tileDevice) = sequences.TileOffsets(FlashTileRows);
        int splits = FlashSplitsFor(h, tiles[^1], t, d);
        using var delta = Allocate(DType.F32, t, h);
        using var partial = Allocate(DType.F32, splits, t, h, d);
        using var dkHeads = Allocate(DType.F32, t, h, d);
        using var dvHeads = Allocate(DType.F32, t, h, d);
        _attnDelta(t * h, F(delta), F(output), F(dout), d);
        _attnDqFlash(t * h, F(partial), F(q), F(k), F(v), F(dout), F(lse), F(delta), I(sequences.Device), I(tileDevice), a, splits);
        _attnDqReduce((int)dq.Length, F(dq), F(partial), splits, scale);
        _attnDkDvFlash(t * h, F(dkHeads), F(dvHeads), F(q), F(k), F(v), F(dout), F(lse), F(delta), I(sequences.Device), a);
        _attnHeadsReduce(t * k.Dim(1), F(dk), F(dv), F(dkHeads), F(dvHeads), a);
    }

    protected override void AttentionBackwardCore(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, PackedSequences sequences,
        Tensor dq, Tensor dk, Tensor dv, float scale, bool causal)
    {
        if (q.Dim(0) == 0) return;
        if (!AttentionTwins)
        {
            CpuAttention.Backward(P(dout), P(q), P(k), P(v), P(output), P(lse),
                P(dq), P(dk), P(dv), sequences.Host, q.Dim(1), k.Dim(1), q.Dim(2), scale, causal);
            return;
        }
        var a = AttnArgs(q, k, sequences, scale, causal);
        using var delta = Allocate(DType.F32, q.Dim(0), q.Dim(1));
        _attnDelta(q.Dim(0) * q.Dim(1), F(delta), F(output), F(dout), q.Dim(2));
        _attnDq(q.Dim(0) * q.Dim(1), F(dq), F(q), F(k), F(v), F(dout), F(lse), F(delta), I(sequences.Device), a);
        _attnDkDv(k.Dim(0) * k.Dim(1), F(dk), F(dv), F(q), F(k), F(v), F(dout), F(lse), F(delta), I(sequences.Device), a);
    }

    protected override void ScatterRowsCore(Tensor source, RowIndex rows, Tensor destination)
    {
        if (!_launchTwins) { HostOps.ScatterRows(P(destination), P(source), Pi(rows.Device), source.Cols, source.Length); return; }
        int g = Grid(source.Length);
        _scatterRows(g, F(destination), F(source), I(rows.Device), source.Cols, g);
    }

    protected override void ScaleColumnsCore(Tensor x, Tensor scale, Tensor y)
    {
        if (!_launchTwins) { HostOps.ScaleColumns(P(y), P(x), P(scale), x.Cols, x.Length); return; }
        int g = Grid(x.Length);
        _scaleColumns(g, F(y), F(x), F(scale), x.Cols, g);
    }

    protected override void ScaleColumnsBackwardCore(Tensor dy, Tensor x, Tensor dscale, bool accumulate)
    {
        if (!_launchTwins) { HostOps.ScaleColumnsBackward(P(dscale), P(dy), P(x), x.Rows, x.Cols, accumulate); return; }
        _scaleColumnsBackward(x.Cols, F(dscale), F(dy), F(x), x.Rows, x.Cols, accumulate ? 1 : 0);
    }

    protected override void KvAppendCore(Tensor k, Tensor v, RowIndex slots, Tensor kCache, Tensor vCache)
    {
        if (!_launchTwins) { HostOps.KvAppend(P(kCache), P(vCache), P(k), P(v), Pi(slots.Device), k.Dim(1) * k.Dim(2), k.Length); return; }
        int g = Grid(k.Length);
        _kvAppend(g, F(kCache), F(vCache), F(k), F(v), I(slots.Device), k.Dim(1) * k.Dim(2), g);
    }

    protected override void PagedAttentionDecodeCore(Tensor q, Tensor kCache, Tensor vCache, PagedBatch batch, Tensor output, float scale, int splitBlocks)
    {
        int splits = (batch.MaxBlocks + splitBlocks - 1) / splitBlocks, heads = q.Dim(1), dim = q.Dim(2);
        if (!_launchTwins && !AttentionTwins)
        {
            CpuAttention.PagedDecode(P(q), P(kCache), P(vCache), Pi(batch.Tables), Pi(batch.Lengths), P(output), batch.Batch, batch.MaxBlocks, batch.BlockSize,
                heads, kCache.Dim(1), dim, scale);
            return;
        }
        using var partialO = Allocate(DType.F32, batch.Batch * heads * splits, dim);
        using var partialLse = Allocate(DType.F32, batch.Batch * heads * splits);
        var a = new PagedArgs(batch.Batch, batch.MaxBlocks, batch.BlockSize, heads, kCache.Dim(1), dim, splits, splitBlocks, scale);
        _pagedPartial(batch.Batch * heads * splits, F(partialO), F(partialLse), F(q), F(kCache), F(vCache), I(batch.Tables), I(batch.Lengths), a);
        _pagedCombine(batch.Batch * heads, F(output), F(partialO), F(partialLse), splits, dim);
    }

    protected override (int[] Tokens, float[] LogProbs) SampleCore(Tensor logits, SamplingInputs x, int vocab)
    {
        int n = x.Count, stride = logits.Dim(1);
        using var tTokens = Allocate(DType.I32, n);
        using var tLogp = Allocate(DType.F32, n);
        if (!_launchTwins)
        {
            HostOps.Sample(Pi(tTokens), P(tLogp), P(logits), Pi(x.Previous), Pi(x.Offsets), P(x.Temperature), Pi(x.TopK), P(x.TopP), P(x.MinP),
                P(x.Penalty), (ulong*)Pointer(x.Seeds), Pi(x.Steps), n, new SampleShape(vocab, stride));
            return (tTokens.ToIntArray(), tLogp.ToFloatArray());
        }
        using var seen = Allocate(DType.I32, (int)(((long)n * stride + 3) / 4));
        _sample(n, I(tTokens), F(tLogp), F(logits), I(x.Previous), I(x.Offsets), F(x.Temperature), I(x.TopK), F(x.TopP), F(x.MinP), F(x.Penalty),
            Bytes(x.Seeds).Cast<ulong>(), I(x.Steps), Bytes(seen).Cast<byte>(), new SampleShape(vocab, stride));
        return (tTokens.ToIntArray(), tLogp.ToFloatArray());
    }

    protected override void ChunkLseUpdateCore(Tensor chunk, Tensor targets, int colOffset, float inverseTemperature, Tensor m, Tensor s, Tensor targetLogit)
    {
        if (!_launchTwins) { HostOps.ChunkLseUpdate(P(m), P(s), P(targetLogit), P(chunk), Pi(targets), chunk.Rows, chunk.Cols, colOffset, inverseTemperature); return; }
        _chunkLse(chunk.Rows, F(m), F(s), F(targetLogit), F(chunk), I(targets), chunk.Cols, colOffset, inverseTemperature);
    }

    protected override void GrpoTokenLossCore(Tensor m, Tensor s, Tensor targetLogit, Tensor targets, Tensor oldLogp, Tensor? refLogp, Tensor advantage,
        Tensor weight, GrpoLossSettings g, Tensor loss, Tensor dlogp, Tensor logp) =>
        _grpoTokenLoss((int)targets.Length, F(loss), F(dlogp), F(logp), F(m), F(s), F(targetLogit), I(targets), F(oldLogp), F(refLogp, oldLogp), F(advantage), F(weight),
            new GrpoArgs(g.EpsLow, g.EpsHigh, g.DualClip, g.KlCoef, (int)g.Kl, refLogp is null ? 0 : 1));

    protected override void ChunkLogitGradCore(Tensor chunk, Tensor m, Tensor s, Tensor targets, Tensor dlogp, int colOffset, float inverseTemperature)
    {
        if (!_launchTwins) { HostOps.ChunkLogitGrad(P(chunk), P(m), P(s), Pi(targets), P(dlogp), chunk.Rows, chunk.Cols, colOffset, inverseTemperature); return; }
        _chunkGrad(chunk.Rows, F(chunk), F(m), F(s), I(targets), F(dlogp), chunk.Cols, colOffset, inverseTemperature);
    }

    protected override double SumOfSquaresCore(IReadOnlyList<Tensor> tensors)
    {
        if (!_launchTwins)
        {
            float sum = 0f;
            bool started = false;
            foreach (var t in tensors)
            {
                float part = HostOps.SumOfSquares(P(t), t.Length, NormChunk);
                sum = started ? sum + part : part;
                started = true;
            }
            return sum;
        }
        using var total = Allocate(DType.F32, 1);
        bool first = true;
        foreach (var t in tensors)
        {
            int chunks = (int)Math.Max(1, (t.Length + NormChunk - 1) / NormChunk);
            using var partial = Allocate(DType.F32, chunks);
            _sumsqPartial(chunks, F(partial), F(t), t.Length, NormChunk);
            _sumPartials(1, F(total), F(partial), chunks, first ? 0 : 1);
            first = false;
        }
        return total.ToFloatArray()[0];
    }

    public override void Dispose()
    {
        _pool.Dispose();
        _accelerator.Dispose();
        _context.Dispose();
    }
}
