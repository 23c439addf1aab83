using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Layers;

/// <summary>
/// A trainable tensor: the working value in the backend's activation type (bf16 on CUDA), an fp32 master copy when
/// the value is not fp32 and the parameter trains (the optimiser updates the master and refreshes the value), and an
/// fp32 gradient. Frozen parameters have no master, no gradient and no optimiser state.
/// </summary>
public sealed class Parameter : IDisposable
{
    private Parameter(string name, Tensor value, Tensor? master, Tensor? grad)
    {
        Name = name;
        Value = value;
        Master = master;
        Grad = grad;
    }

    public string Name { get; }

    /// <summary>What the forward reads: [..] in the activation type.</summary>
    public Tensor Value { get; }

    /// <summary>fp32 master weights, or null when <see cref="Value"/> is itself fp32.</summary>
    public Tensor? Master { get; private set; }

    /// <summary>
    /// Frees the fp32 master (the optimiser keeps its own shard of it: ZeRO-1); <see cref="Weights"/> is then the
    /// working copy, which the optimiser refreshes from its shard after each step.
    /// </summary>
    public void ReleaseMaster()
    {
        Master?.Dispose();
        Master = null;
    }

    /// <summary>fp32 gradient, accumulated by backward; null for a frozen parameter.</summary>
    public Tensor? Grad { get; }

    public bool Trainable => Grad is not null;

    /// <summary>The fp32 weights the optimiser updates.</summary>
    public Tensor Weights => Master ?? Value;

    /// <summary>
    /// A parameter with <paramref name="init"/> as its values. A trainable one on a bf16 device also gets its fp32
    /// master; a frozen one is its stored values alone (bf16 on CUDA: nothing updates it, so no master is kept).
    /// </summary>
    public static Parameter Create(Backend backend, string name, int[] shape, ReadOnlySpan<float> init, bool trainable = true)
    {
        var value = backend.FromArray(init, backend.ActivationType, shape, name);
        var master = backend.ActivationType == DType.F32 || !trainable ? null : backend.FromArray(init, DType.F32, shape, name + ".master");
        var grad = trainable ? backend.Allocate(DType.F32, shape, name + ".grad") : null;
        return new Parameter(name, value, master, grad);
    }

    /// <summary>
    /// A parameter whose values <paramref name="fill"/> writes straight into its device tensors (a checkpoint's
    /// <c>ReadInto</c>: no host copy of the tensor): the value, and for a trainable parameter on a bf16 device its fp32 master.
    /// </summary>
    public static Parameter Load(Backend backend, string name, int[] shape, Action<Tensor> fill, bool trainable)
    {
        Tensor? value = null, master = null;
        try
        {
            value = backend.Allocate(backend.ActivationType, shape, name);
            fill(value);
            if (trainable && backend.ActivationType != DType.F32)
            {
                master = backend.Allocate(DType.F32, shape, name + ".master");
                fill(master);
            }
            var grad = trainable ? backend.Allocate(DType.F32, shape, name + ".grad") : null;
            return new Parameter(name, value, master, grad);
        }
        catch
        {
            value?.Dispose();
            master?.Dispose();
            throw;
        }
    }

    public void ZeroGrad()
    {
        if (Grad is not null) Grad.Backend.Zero(Grad);
    }

    public void Dispose()
    {
        Value.Dispose();
        Master?.Dispose();
        Grad?.Dispose();
    }
}
