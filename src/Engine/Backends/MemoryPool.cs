namespace R1V2.Native.Engine.Backends;

/// <summary>A block of device memory owned by a backend's pool.</summary>
public abstract class DeviceBlock
{
    protected DeviceBlock(long bytes) => Bytes = bytes;

    /// <summary>Capacity in bytes (the rounded size the pool allocated).</summary>
    public long Bytes { get; }
}

/// <summary>Memory statistics of a backend's pool.</summary>
public readonly record struct MemoryStats(long BytesInUse, long PeakBytesInUse, long BytesReserved, long Allocations, long Reuses);

/// <summary>
/// A caching allocator: freed blocks go to a free list keyed by their rounded size and are handed out again before
/// the device allocator is asked, so a training step that frees and re-allocates the same shapes allocates nothing.
/// </summary>
public sealed class MemoryPool<TBlock> : IDisposable where TBlock : DeviceBlock
{
    private const long SmallGranularity = 512;
    private const long SmallThreshold = 4096;
    private const int ClassesPerOctave = 8;

    private readonly Func<long, TBlock> _allocate;
    private readonly Action<TBlock> _free;
    private readonly Dictionary<long, Stack<TBlock>> _freeLists = new();
    private readonly object _gate = new();
    private long _inUse, _peak, _reserved, _allocations, _reuses;

    public MemoryPool(Func<long, TBlock> allocate, Action<TBlock> free)
    {
        _allocate = allocate;
        _free = free;
    }

    /// <summary>
    /// Rounds a request to the pool's size classes: 512 B steps up to 4 KiB, then 8 classes per power of two (at most
    /// 12.5 % over the request). Packed batches change their token count every step; coarse classes let a step reuse
    /// the blocks of one a little longer instead of allocating (and first touching) new ones.
    /// </summary>
    public static long RoundUp(long bytes)
    {
        bytes = Math.Max(bytes, 1);
        if (bytes <= SmallThreshold) return (bytes + SmallGranularity - 1) / SmallGranularity * SmallGranularity;
        int octave = 63 - System.Numerics.BitOperations.LeadingZeroCount((ulong)(bytes - 1)); // 2^octave < bytes <= 2^(octave + 1)
        long step = 1L << (octave - 3);
        return (bytes + step - 1) / step * step;
    }

    public TBlock Rent(long bytes)
    {
        long size = RoundUp(bytes);
        lock (_gate)
        {
            TBlock block;
            if (_freeLists.TryGetValue(size, out var list) && list.Count > 0)
            {
                block = list.Pop();
                _reuses++;
            }
            else
            {
                block = _allocate(size);
                _reserved += size;
                _allocations++;
            }
            _inUse += size;
            _peak = Math.Max(_peak, _inUse);
            return block;
        }
    }

    public void Return(TBlock block)
    {
        lock (_gate)
        {
            _inUse -= block.Bytes;
            if (!_freeLists.TryGetValue(block.Bytes, out var list)) _freeLists[block.Bytes] = list = new Stack<TBlock>();
            list.Push(block);
        }
    }

    public MemoryStats Stats
    {
        get { lock (_gate) return new MemoryStats(_inUse, _peak, _reserved, _allocations, _reuses); }
    }

    public void ResetPeak()
    {
        lock (_gate) _peak = _inUse;
    }

    /// <summary>Frees every cached (unused) block back to the device.</summary>
    public void Trim()
    {
        lock (_gate)
        {
            foreach (var list in _freeLists.Values)
                while (list.Count > 0)
                {
                    var b = list.Pop();
                    _reserved -= b.Bytes;
                    _free(b);
                }
        }
    }

    public void Dispose() => Trim();
}
