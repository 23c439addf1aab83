using R1V2.Native.Engine.Backends;

namespace R1V2.Native.Engine.Tensors;

/// <summary>
/// A dense row-major tensor in one backend's memory. A tensor made by <see cref="Backend.Allocate"/> owns its block
/// and returns it to the backend's pool on dispose; views (<see cref="Reshape"/>, <see cref="SliceRows"/>) share it.
/// </summary>
public sealed class Tensor : IDisposable
{
    private readonly int[] _shape;
    private bool _disposed;

    internal Tensor(Backend backend, DeviceBlock block, DType dtype, int[] shape, long elementOffset, bool owner, string? name)
    {
        Backend = backend;
        Block = block;
        DType = dtype;
        _shape = shape;
        ElementOffset = elementOffset;
        OwnsBlock = owner;
        Name = name ?? "tensor";
        Length = ShapeLength(shape);
    }

    public Backend Backend { get; }
    public DType DType { get; }
    public ReadOnlySpan<int> Shape => _shape;
    public int Rank => _shape.Length;
    public long Length { get; }
    public long Bytes => Length * DType.Size();
    public string Name { get; set; }

    internal DeviceBlock Block { get; }
    internal long ElementOffset { get; }
    internal bool OwnsBlock { get; }
    internal long ByteOffset => ElementOffset * DType.Size();

    /// <summary>Size of dimension <paramref name="dim"/>; negative counts from the end.</summary>
    public int Dim(int dim) => _shape[dim < 0 ? _shape.Length + dim : dim];

    /// <summary>Product of all dimensions but the last (the row count of a [.., C] tensor).</summary>
    public int Rows => Rank == 0 ? 1 : checked((int)(Length / Math.Max(1, _shape[^1])));

    /// <summary>The last dimension.</summary>
    public int Cols => Rank == 0 ? 1 : _shape[^1];

    public string ShapeString => "[" + string.Join(", ", _shape) + "]";
    public override string ToString() => $"{Name} {ShapeString} {DType.Name()}";

    /// <summary>The same elements seen with another shape of equal length.</summary>
    public Tensor Reshape(params int[] shape)
    {
        ThrowIfDisposed();
        if (ShapeLength(shape) != Length)
            throw new ArgumentException($"cannot reshape {this} to [{string.Join(", ", shape)}]: lengths differ", nameof(shape));
        return new Tensor(Backend, Block, DType, (int[])shape.Clone(), ElementOffset, owner: false, Name);
    }

    /// <summary>Rows [start, start + count) of the first dimension, sharing memory (for weight slices and batches).</summary>
    public Tensor SliceRows(int start, int count)
    {
        ThrowIfDisposed();
        if (Rank == 0 || start < 0 || count < 0 || start + count > _shape[0])
            throw new ArgumentOutOfRangeException(nameof(start), $"rows [{start}, {start + count}) outside {this}");
        var shape = (int[])_shape.Clone();
        shape[0] = count;
        long rowLength = Length / Math.Max(1, _shape[0]);
        return new Tensor(Backend, Block, DType, shape, ElementOffset + start * rowLength, owner: false, $"{Name}[{start}:{start + count}]");
    }

    public float[] ToFloatArray() => Backend.DownloadFloats(this);
    public int[] ToIntArray() => Backend.DownloadInts(this);
    public void CopyFrom(ReadOnlySpan<float> data) => Backend.Upload(this, data);
    public void CopyFrom(ReadOnlySpan<int> data) => Backend.Upload(this, data);

    internal void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (OwnsBlock) Backend.Release(Block);
    }

    internal static long ShapeLength(ReadOnlySpan<int> shape)
    {
        long n = 1;
        foreach (var d in shape)
        {
            if (d < 0) throw new ArgumentException($"negative dimension {d} in shape");
            n = checked(n * d);
        }
        return n;
    }
}
