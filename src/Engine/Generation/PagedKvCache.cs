using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Generation;

/// <summary>The cache has no free block for a reservation.</summary>
public sealed class OutOfCacheBlocksException(int needed, int free) : Exception($"the KV cache needs {needed} more blocks but has {free} free")
{
    public int Needed { get; } = needed;
    public int Free { get; } = free;
}

/// <summary>One sequence's view of the cache: its block table and how many tokens are cached.</summary>
public sealed class CacheSequence
{
    internal readonly List<int> Blocks = [];
    internal bool Released;
    public IReadOnlyList<int> BlockTable => Blocks;
    public int Length { get; internal set; }
}

/// <summary>
/// A paged KV cache: per layer K and V tensors of [blocks x block_size, Hkv, D] slots, a block allocator with
/// reference counts, forks that share every block of a prefix (the G samples of one prompt), and copy-on-write of a
/// shared, partly filled last block the first time a fork appends. When blocks run out, <see cref="Reserve"/> throws
/// <see cref="OutOfCacheBlocksException"/> before changing anything; the generator then preempts a sequence (frees its
/// blocks and recomputes it later) or, with nothing to preempt, reports that the request cannot fit.
/// </summary>
public sealed class PagedKvCache : IDisposable
{
    private readonly Backend _b;
    private readonly Tensor[] _k, _v;
    private readonly int[] _refs;
    private readonly Stack<int> _free = new();

    public PagedKvCache(Backend backend, int layers, int kvHeads, int headDim, int numBlocks, int blockSize = 16)
    {
        if (numBlocks < 1 || blockSize < 1) throw new ArgumentException("the cache needs at least one block of at least one token");
        _b = backend;
        NumBlocks = numBlocks;
        BlockSize = blockSize;
        _k = new Tensor[layers];
        _v = new Tensor[layers];
        for (int l = 0; l < layers; l++)
        {
            _k[l] = backend.Activations(numBlocks * blockSize, kvHeads, headDim);
            _v[l] = backend.Activations(numBlocks * blockSize, kvHeads, headDim);
        }
        _refs = new int[numBlocks];
        for (int i = numBlocks - 1; i >= 0; i--) _free.Push(i);
    }

    public int NumBlocks { get; }
    public int BlockSize { get; }
    public int FreeBlocks => _free.Count;
    public int UsedBlocks => NumBlocks - _free.Count;
    public int PeakUsedBlocks { get; private set; }
    public long CopiedBlocks { get; private set; }

    public Tensor Keys(int layer) => _k[layer];
    public Tensor Values(int layer) => _v[layer];

    public CacheSequence Create() => new();

    /// <summary>A sequence that shares every cached token (and block) of <paramref name="parent"/>.</summary>
    public CacheSequence Fork(CacheSequence parent)
    {
        if (parent.Released) throw new InvalidOperationException("cannot fork a released sequence");
        var child = new CacheSequence { Length = parent.Length };
        foreach (var b in parent.Blocks) { _refs[b]++; child.Blocks.Add(b); }
        return child;
    }

    /// <summary>Blocks a reservation of <paramref name="tokens"/> more tokens would take (copy-on-write included).</summary>
    public int BlocksNeeded(CacheSequence s, int tokens)
    {
        int have = s.Blocks.Count * BlockSize - s.Length;
        int fresh = tokens > have ? (tokens - have + BlockSize - 1) / BlockSize : 0;
        bool cow = tokens > 0 && s.Length % BlockSize != 0 && _refs[s.Blocks[^1]] > 1;
        return fresh + (cow ? 1 : 0);
    }

    /// <summary>Slots for the next <paramref name="tokens"/> tokens of <paramref name="s"/>; extends its length.</summary>
    public int[] Reserve(CacheSequence s, int tokens)
    {
        if (s.Released) throw new InvalidOperationException("cannot extend a released sequence");
        int needed = BlocksNeeded(s, tokens);
        if (needed > _free.Count) throw new OutOfCacheBlocksException(needed, _free.Count);
        if (tokens > 0 && s.Length % BlockSize != 0 && _refs[s.Blocks[^1]] > 1)
        {
            // Copy-on-write: this sequence is about to write into a block its forks share.
            int old = s.Blocks[^1], copy = Take();
            for (int l = 0; l < _k.Length; l++)
            {
                _b.Convert(_k[l].SliceRows(old * BlockSize, BlockSize), _k[l].SliceRows(copy * BlockSize, BlockSize));
                _b.Convert(_v[l].SliceRows(old * BlockSize, BlockSize), _v[l].SliceRows(copy * BlockSize, BlockSize));
            }
            _refs[old]--;
            s.Blocks[^1] = copy;
            CopiedBlocks++;
        }
        var slots = new int[tokens];
        for (int i = 0; i < tokens; i++)
        {
            int position = s.Length + i;
            if (position / BlockSize >= s.Blocks.Count) s.Blocks.Add(Take());
            slots[i] = s.Blocks[position / BlockSize] * BlockSize + position % BlockSize;
        }
        s.Length += tokens;
        return slots;
    }

    private int Take()
    {
        int b = _free.Pop();
        _refs[b] = 1;
        PeakUsedBlocks = Math.Max(PeakUsedBlocks, UsedBlocks);
        return b;
    }

    /// <summary>Drops the sequence's references; blocks nobody references return to the free list.</summary>
    public void Release(CacheSequence s)
    {
        if (s.Released) return;
        s.Released = true;
        foreach (var b in s.Blocks)
            if (--_refs[b] == 0) _free.Push(b);
        s.Blocks.Clear();
    }

    public void Dispose()
    {
        foreach (var t in _k) t.Dispose();
        foreach (var t in _v) t.Dispose();
    }
}
