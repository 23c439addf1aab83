namespace R1V2.Native.Engine.Layers;

/// <summary>
/// The frozen parameters a backend holds, each once: a frozen tensor loaded from the same checkpoint file (the same
/// path, size and modification time) by several models (the policy, its KL reference, a reward model over the same
/// base) is one device tensor that they all reference. A reference model then costs only the parts that train in the
/// policy (with the adapter alone trainable, the adapter's size, not the model's). Counted: the last holder to
/// release a parameter frees it. Trainable parameters are never shared.
/// </summary>
public sealed class SharedFrozenParameters
{
    /// <summary>A frozen tensor's source: the file it was read from (identified by path, size and modification time) and its name.</summary>
    public readonly record struct Key(string File, long Bytes, long ModifiedTicks, string Name);

    private readonly Dictionary<Key, (Parameter Parameter, int Holders)> _held = new();
    private readonly Dictionary<Parameter, Key> _keyOf = new(ReferenceEqualityComparer.Instance);
    private readonly object _gate = new();

    /// <summary>The key of tensor <paramref name="name"/> in <paramref name="file"/>.</summary>
    public static Key KeyOf(string file, string name)
    {
        var info = new FileInfo(file);
        return new Key(Path.GetFullPath(file), info.Length, info.LastWriteTimeUtc.Ticks, name);
    }

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
