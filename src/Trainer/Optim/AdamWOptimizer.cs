using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Trainer.Optim;

/// <summary>Result of one optimiser step.</summary>
public readonly record struct StepReport(int Step, double GradNorm, double ClipScale, float LearningRate, bool Skipped);

/// <summary>
/// AdamW over the trainable parameters: fp32 moments, the fused update kernel on the fp32 master weights, the bf16
/// working copy refreshed in the same pass, and global-norm clipping folded into the update as a gradient scale.
/// A step whose gradient norm is not finite is skipped (no state changes) and reported.
/// </summary>
public sealed class AdamWOptimizer : IDisposable
{
    private readonly Backend _b;
    private readonly List<(Parameter P, Tensor M, Tensor V)> _state = [];

    public AdamWOptimizer(Backend backend, IEnumerable<Parameter> parameters, AdamWSettings settings, double maxGradNorm = 1.0)
    {
        _b = backend;
        Settings = settings;
        MaxGradNorm = maxGradNorm;
        foreach (var p in parameters.Where(p => p.Trainable))
            _state.Add((p, backend.Allocate(DType.F32, p.Weights.Shape.ToArray(), p.Name + ".exp_avg"), backend.Allocate(DType.F32, p.Weights.Shape.ToArray(), p.Name + ".exp_avg_sq")));
    }

    public AdamWSettings Settings { get; }
    public double MaxGradNorm { get; }
    public int StepCount { get; private set; }

    /// <summary>The moments of every trainable parameter by name, and the step count (for checkpoints).</summary>
    public (int Step, IReadOnlyList<(string Name, int[] Shape, float[] M, float[] V)> Moments) Export() =>
        (StepCount, _state.Select(s => (s.P.Name, s.M.Shape.ToArray(), s.M.ToFloatArray(), s.V.ToFloatArray())).ToList());

    /// <summary>The names of the parameters this optimiser updates, in order.</summary>
    public IEnumerable<string> ParameterNames => _state.Select(s => s.P.Name);

    public void Import(int step, IReadOnlyDictionary<string, (float[] M, float[] V)> moments)
    {
        foreach (var (p, m, v) in _state)
        {
            if (!moments.TryGetValue(p.Name, out var mv)) throw new InvalidDataException($"optimiser state has no moments for '{p.Name}'");
            m.CopyFrom(mv.M);
            v.CopyFrom(mv.V);
        }
        StepCount = step;
    }

    public void ZeroGrad()
    {
        foreach (var (p, _, _) in _state) p.ZeroGrad();
    }

    public StepReport Step(float learningRate)
    {
        var grads = _state.Select(s => s.P.Grad!).ToList();
        double norm = _b.GlobalNorm(grads);
        if (!double.IsFinite(norm)) return new StepReport(StepCount, norm, 0, learningRate, Skipped: true);
        double scale = MaxGradNorm > 0 ? Backend.ClipScale(norm, MaxGradNorm) : 1.0;
        StepCount++;
        var s = Settings with { LearningRate = learningRate };
        foreach (var (p, m, v) in _state)
            _b.AdamW(p.Weights, p.Grad!, m, v, p.Master is null ? null : p.Value, s, StepCount, (float)scale);
        return new StepReport(StepCount, norm, scale, learningRate, Skipped: false);
    }

    public void Dispose()
    {
        foreach (var (_, m, v) in _state) { m.Dispose(); v.Dispose(); }
    }
}
