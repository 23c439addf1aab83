namespace R1V2.Native.Engine.Tensors;

/// <summary>Element types of device tensors.</summary>
public enum DType
{
    F32,
    BF16,
    I32,
}

public static class DTypeExtensions
{
    public static int Size(this DType t) => t switch
    {
        DType.F32 => 4,
        DType.BF16 => 2,
        DType.I32 => 4,
        _ => throw new ArgumentOutOfRangeException(nameof(t), t, "unknown dtype"),
    };

    public static string Name(this DType t) => t switch
    {
        DType.F32 => "fp32",
        DType.BF16 => "bf16",
        DType.I32 => "int32",
        _ => t.ToString(),
    };
}

/// <summary>Host-side bf16 conversion with the same rounding as the kernels (round to nearest even).</summary>
public static class BFloat16
{
    public static ushort FromFloat(float f)
    {
        uint u = BitConverter.SingleToUInt32Bits(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return (ushort)(u >> 16);
    }

    public static float ToFloat(ushort bits) => BitConverter.UInt32BitsToSingle((uint)bits << 16);

    /// <summary>The value after a round trip through bf16.</summary>
    public static float Round(float f) => ToFloat(FromFloat(f));
}
