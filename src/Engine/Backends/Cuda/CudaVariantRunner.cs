using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Kernels;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Interop;

namespace R1V2.Native.Engine.Backends.Cuda;

/// <summary>The shapes `engine tune` times at: rows of activations, the model width, the MLP width and a vocabulary.</summary>
public sealed record TuningShapes(int Rows, int Hidden, int Intermediate, int Vocabulary)
{
    /// <summary>The standard shapes (those of `engine bench kernels`).</summary>
    public static readonly TuningShapes Standard = new(8192, 4096, 11008, 32768);
}

/// <summary>
/// Runs a family's variant on the GPU for <see cref="KernelTuner"/>: the check runs the family's op at a small, ragged
/// shape (rows and columns that no block size divides) in fp32 on a backend compiled with that block size and compares
/// it with the CPU twin; the time is the median of CUDA-event timings of the op in bf16 at the tuned shapes, after
/// warm-up. Families without an op here (attention, paged attention, sampling, the GRPO loss, bias, rows) keep their defaults.
/// </summary>
public sealed class CudaVariantRunner(int device, TuningShapes shapes, string? kernelCache = null, int repeats = 25) : IVariantRunner
{
    /// <summary>An op of a family: given a backend and a shape (rows, columns), its inputs from a fixed seed, the launch, and its result.</summary>
    private delegate (Action Run, Func<float[]> Result, IDisposable Inputs) Op(Backend b, DType type, int rows, int cols);

    private static readonly Dictionary<string, Op> Ops = new()
    {
        ["rmsnorm"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), In(b, t, [c], 2), b.Allocate(t, r, c), b.Allocate(DType.F32, r)],
            x => b.RmsNormForward(x[0], x[1], x[2], x[3], 1e-6f), x => x[2]),
        ["layernorm"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), In(b, t, [c], 2), In(b, t, [c], 3), b.Allocate(t, r, c), b.Allocate(DType.F32, r), b.Allocate(DType.F32, r)],
            x => b.LayerNormForward(x[0], x[1], x[2], x[3], x[4], x[5], 1e-6f), x => x[3]),
        ["softmax"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), b.Allocate(t, r, c)], x => b.SoftmaxForward(x[0], x[1]), x => x[1]),
        ["swiglu"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), In(b, t, [r, c], 2), b.Allocate(t, r, c)], x => b.SwiGluForward(x[0], x[1], x[2]), x => x[2]),
        ["gelu"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), b.Allocate(t, r, c)], x => b.GeluForward(x[0], x[1], GeluApproximation.Erf), x => x[1]),
        ["elementwise"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), In(b, t, [r, c], 2), b.Allocate(t, r, c)], x => b.Add(x[2], x[0], x[1]), x => x[2]),
        ["cross_entropy"] = (b, t, r, c) => With(b, [In(b, t, [r, c], 1), b.FromArray(Enumerable.Range(0, r).Select(i => i * 7919 % c).ToArray(), [r]),
            b.Allocate(DType.F32, r), b.Allocate(DType.F32, r)], x => b.CrossEntropyForward(x[0], x[1], x[2], x[3]), x => x[2]),
        ["embedding"] = (b, t, r, c) => With(b, [In(b, t, [97, c], 1), b.FromArray(Enumerable.Range(0, r).Select(i => i * 31 % 97).ToArray(), [r]), b.Allocate(t, r, c)],
            x => b.EmbeddingForward(x[0], x[1], x[2]), x => x[2]),
        ["adamw"] = (b, t, r, c) => With(b, [In(b, DType.F32, [r * c], 1), In(b, DType.F32, [r * c], 2), In(b, DType.F32, [r * c], 3), Pos(b, r * c)],
            x => b.AdamW(x[0], x[1], x[2], x[3], null, new AdamWSettings(1e-3f, WeightDecay: 0.01f), 3), x => x[0]),
        ["grad_norm"] = (b, t, r, c) =>
        {
            var g = In(b, DType.F32, [r * c], 1);
            double value = 0;
            return (() => value = b.GlobalNorm([g]), () => [(float)value], g);
        },
    };

    private static Tensor In(Backend b, DType t, int[] shape, int seed)
    {
        var rng = new Random(seed);
        long n = shape.Aggregate(1L, (x, y) => x * y);
        var values = new float[n];
        for (long i = 0; i < n; i++) values[i] = (float)(rng.NextDouble() * 2 - 1);
        return b.FromArray(values, t, shape);
    }

    private static Tensor Pos(Backend b, int n) => b.FromArray(Enumerable.Range(0, n).Select(i => 0.01f + i % 13 * 0.001f).ToArray(), DType.F32, [n]);

    private static (Action, Func<float[]>, IDisposable) With(Backend b, Tensor[] tensors, Action<Tensor[]> run, Func<Tensor[], Tensor> result) =>
        (() => run(tensors), () => result(tensors).ToFloatArray(), new Owned(tensors));

    private sealed class Owned(Tensor[] tensors) : IDisposable
    {
        public void Dispose() { foreach (var t in tensors) t.Dispose(); }
    }

    /// <summary>The families this runner can check and time.</summary>
    public static IReadOnlyCollection<string> Families => Ops.Keys;

    private CudaBackend Variant(string family, KernelVariant variant, DType activations) =>
        new(device, new KernelCompiler(kernelCache, new KernelTuning(new Dictionary<string, KernelVariant> { [family] = variant })), activations);

    public string? Check(string family, KernelVariant variant)
    {
        const int rows = 67, cols = 1000;   // ragged: no block size divides either
        using var gpu = Variant(family, variant, DType.F32);
        using var cpu = new CpuBackend();
        var (runGpu, gpuResult, gpuInputs) = Ops[family](gpu, DType.F32, rows, cols);
        var (runCpu, cpuResult, cpuInputs) = Ops[family](cpu, DType.F32, rows, cols);
        using (gpuInputs)
        using (cpuInputs)
        {
            runGpu();
            runCpu();
            float[] a = gpuResult(), e = cpuResult();
            double scale = e.Max(v => Math.Abs((double)v)) + 1e-6;
            for (int i = 0; i < e.Length; i++)
                if (!(Math.Abs(a[i] - e[i]) <= 1e-4 * scale))
                    return $"element {i} is {a[i]}, the CPU twin's {e[i]}";
            return null;
        }
    }

    public double Time(string family, KernelVariant variant)
    {
        var (rows, cols) = family switch
        {
            "swiglu" => (shapes.Rows, shapes.Intermediate),
            "cross_entropy" => (Math.Min(shapes.Rows, 2048), shapes.Vocabulary),
            "adamw" or "grad_norm" => (shapes.Intermediate, shapes.Hidden),
            _ => (shapes.Rows, shapes.Hidden),
        };
        using var gpu = Variant(family, variant, DType.BF16);
        var (run, _, inputs) = Ops[family](gpu, DType.BF16, rows, cols);
        using (inputs)
        {
            for (int i = 0; i < 3; i++) run();
            gpu.Synchronize();
            var times = new double[repeats];
            using var start = new CudaEvent();
            using var end = new CudaEvent();
            for (int i = 0; i < repeats; i++)
            {
                start.Record(gpu.Stream);
                run();
                end.Record(gpu.Stream);
                end.Synchronize();
                times[i] = CudaEvent.Elapsed(start, end);
            }
            Array.Sort(times);
            return times[repeats / 2];
        }
    }
}
