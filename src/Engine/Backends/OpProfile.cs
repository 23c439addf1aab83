using System.Diagnostics;

namespace R1V2.Native.Engine.Backends;

/// <summary>Calls and synchronized wall time per backend op (<see cref="Backend.StartProfiling"/>).</summary>
public sealed class OpProfile
{
    private readonly Dictionary<string, (int Calls, long Ticks)> _ops = new(StringComparer.Ordinal);

    public sealed record Entry(string Op, int Calls, double Milliseconds);

    /// <summary>Every op seen, the most expensive first.</summary>
    public IReadOnlyList<Entry> Entries =>
        [.. _ops.Select(kv => new Entry(kv.Key, kv.Value.Calls, kv.Value.Ticks * 1000.0 / Stopwatch.Frequency)).OrderByDescending(e => e.Milliseconds)];

    public double TotalMilliseconds => _ops.Values.Sum(v => v.Ticks) * 1000.0 / Stopwatch.Frequency;

    public void Clear() => _ops.Clear();

    internal void Add(string op, long ticks)
    {
        _ops.TryGetValue(op, out var e);
        _ops[op] = (e.Calls + 1, e.Ticks + ticks);
    }

    /// <summary>
    /// Times one op (started after the backend has drained earlier work, stopped after the op's own), and is the op's
    /// boundary for a backend that stages storage per op (<paramref name="staged"/>: it ends the op on dispose).
    /// </summary>
    public readonly struct Scope(Backend backend, OpProfile? profile, string op, bool staged = false) : IDisposable
    {
        private readonly long _start = Stopwatch.GetTimestamp();

        public void Dispose()
        {
            if (staged) backend.EndOp();
            if (profile is null) return;
            backend.Synchronize();
            profile.Add(op, Stopwatch.GetTimestamp() - _start);
        }
    }
}
