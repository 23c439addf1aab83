namespace R1V2.Native.Engine.Layers;

/// <summary>
/// The frozen parameters a backend holds, each once: a frozen tensor with the same name, stored type, shape and
/// content (a 128-bit xxHash of its stored bytes) loaded by several models (the policy, its KL reference, a reward
/// model whose checkpoint holds the same backbone, from whichever file) is one device tensor that they all reference. A reference model then costs only the parts that train in the
/// policy (with the adapter alone trainable, the adapter's size, not the model's). Counted: the last holder to
/// release a parameter frees it. Trainable parameters are never shared.
/// </summary>
public sealed class SharedFrozenParameters
{
    /// <summary>A frozen tensor's identity: its name, stored type, shape and a 128-bit hash of its stored bytes.</summary>
    public readonly record struct Key(string Name, string DType, string Shape, UInt128 Content);

    private readonly Dictionary<Key, (Parameter Parameter, int Holders)> _held = new();
    private readonly Dictionary<Parameter, Key> _keyOf = new(ReferenceEqualityComparer.Instance);
    private readonly object _gate = new();

    /// <summary>The parameter held for <paramref name="key"/> (one more holder), or a new one from <paramref name="create"/>.</summary>
    public Parameter Acquire(Key key, Func<Parameter> create)
    {
        lock (_gate)
        {
            if (_held.TryGetValue(key, out var entry))
            {
                _held[key] = (entry.Parameter, entry.Holders + 1);
                return entry.Parameter;
            }
            var p = create();
            if (p.Trainable) throw new InvalidOperationException($"{key.Name}: a trainable parameter cannot be shared");
            _held[key] = (p, 1);
            _keyOf[p] = key;
            return p;
        }
    }

    /// <summary>Whether <paramref name="p"/> is held here (its holders release it instead of disposing it).</summary>
    public bool Holds(Parameter p)
    {
        lock (_gate) return _keyOf.ContainsKey(p);
    }

    /// <summary>One holder fewer; the last frees the tensor.</summary>
    public void Release(Parameter p)
    {
        lock (_gate)
        {
            if (!_keyOf.TryGetValue(p, out var key)) throw new InvalidOperationException($"{p.Name} is not a shared parameter");
            var (parameter, holders) = _held[key];
            if (holders > 1) { _held[key] = (parameter, holders - 1); return; }
            _held.Remove(key);
            _keyOf.Remove(p);
            p.Dispose();
        }
    }

    /// <summary>How many distinct frozen tensors are held.</summary>
    public int Count
    {
        get { lock (_gate) return _held.Count; }
    }
}
