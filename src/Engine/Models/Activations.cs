using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>Tensors a forward keeps for its backward; disposing returns them all to the pool.</summary>
public sealed class Activations : IDisposable
{
    private readonly List<IDisposable> _held = [];

    public T Keep<T>(T item) where T : IDisposable
    {
        _held.Add(item);
        return item;
    }

    public void Dispose()
    {
        foreach (var t in _held) t.Dispose();
        _held.Clear();
    }
}
