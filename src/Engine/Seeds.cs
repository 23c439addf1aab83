namespace R1V2.Native.Engine;

/// <summary>
/// Seeds derived from several values, the same in every process and on every machine (unlike
/// <see cref="HashCode"/>, which is randomised per process): a run reproduces from its seed after a restart.
/// </summary>
public static class Seeds
{
    /// <summary>SplitMix64's finaliser: a bijective mix of 64 bits.</summary>
    public static ulong Mix(ulong x)
    {
        x += 0x9E3779B97F4A7C15ul;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ul;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBul;
        return x ^ (x >> 31);
    }

    /// <summary>A 64-bit seed from an ordered list of values.</summary>
    public static ulong Combine(params long[] values)
    {
        ulong h = 0x243F6A8885A308D3ul;
        foreach (var v in values) h = Mix(h ^ (ulong)v);
        return h;
    }

    /// <summary>A non-negative 31-bit seed for <see cref="Random"/>.</summary>
    public static int ForRandom(params long[] values) => (int)(Combine(values) & 0x7fffffff);

    /// <summary>FNV-1a of a string's UTF-16 code units: a stable hash for names.</summary>
    public static long Hash(string s)
    {
        ulong h = 14695981039346656037ul;
        foreach (char ch in s) { h ^= ch; h *= 1099511628211ul; }
        return (long)h;
    }
}
