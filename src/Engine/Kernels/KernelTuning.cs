namespace R1V2.Native.Engine.Kernels;

/// <summary>
/// Tunable launch parameters per kernel family. Each becomes a -D define when the family is compiled (so
/// __launch_bounds__ and the code see it) and is the block size the host launches with, so the two always agree.
/// `engine tune` searches them per device and shape bucket (<see cref="KernelTuner"/>, <see cref="TuningCache"/>); the
/// defaults are the values measured as sound and stand wherever no tuning was cached.
/// </summary>
public sealed class KernelTuning
{
    private readonly Dictionary<string, KernelVariant> _variants;

    public static readonly IReadOnlyDictionary<string, int> DefaultBlocks = new Dictionary<string, int>
    {
        ["adamw"] = 256,
        ["attention"] = 128,
        ["attention_flash"] = 128,
        ["attention_mma"] = 128,
        ["bias"] = 256,
        ["cross_entropy"] = 512,
        ["elementwise"] = 256,
        ["embedding"] = 256,
        ["gelu"] = 256,
        ["grad_norm"] = 512,
        ["grpo_loss"] = 256,
        ["layernorm"] = 256,
        ["paged_attention"] = 128,
        ["rmsnorm"] = 256,
        ["rope"] = 256,
        ["rows"] = 256,
        ["sampling"] = 256,
        ["softmax"] = 256,
        ["swiglu"] = 256,
    };

    /// <summary>
    /// Families whose row kernels keep their row in registers, with the values a thread keeps (-D&lt;FAMILY&gt;_KEPT): with
    /// the block size it sets the threads per row (a row up to kept x block wide is read once).
    /// </summary>
    public static readonly IReadOnlyList<string> KeptFamilies = ["layernorm", "rmsnorm", "softmax"];

    public static readonly IReadOnlyList<int> KeptSpace = [8, 16, 32];

    public const int DefaultKept = 32;

    /// <summary>A family's default variant: its default block and, for the row kernels, 32 kept values a thread.</summary>
    public static KernelVariant DefaultVariant(string family) =>
        DefaultBlocks.TryGetValue(family, out int b) ? new KernelVariant(b, KeptFamilies.Contains(family) ? DefaultKept : 0)
            : throw new ArgumentException($"tuning: unknown kernel family '{family}'");

    public KernelTuning(IReadOnlyDictionary<string, KernelVariant>? overrides = null)
    {
        _variants = DefaultBlocks.Keys.ToDictionary(f => f, DefaultVariant);
        if (overrides is null) return;
        foreach (var (family, variant) in overrides)
        {
            if (!_variants.ContainsKey(family)) throw new ArgumentException($"tuning: unknown kernel family '{family}'");
            int block = variant.Block;
            if (block < 32 || block > 1024 || block % 32 != 0) throw new ArgumentException($"tuning: block size of {family} must be a multiple of 32 in [32, 1024], got {block}");
            if (family == "attention_mma" && block != 128) throw new ArgumentException("tuning: attention_mma is fixed at 128 threads (4 warps x 16 query rows per 64-row tile)");
            if (family == "attention_flash" && block != 128) throw new ArgumentException("tuning: attention_flash is fixed at 128 threads (4 warps x 32 query rows per 128-row tile)");
            int kept = variant.Kept;
            if (KeptFamilies.Contains(family))
            {
                if (kept == 0) kept = DefaultKept;
                if (!KeptSpace.Contains(kept)) throw new ArgumentException($"tuning: {family} keeps {string.Join(", ", KeptSpace)} values a thread, got {kept}");
            }
            else if (kept != 0) throw new ArgumentException($"tuning: {family} has no kept-values parameter (got {kept})");
            _variants[family] = new KernelVariant(block, kept);
        }
    }

    /// <summary>Block sizes only (the other parameters at their defaults).</summary>
    public KernelTuning(IReadOnlyDictionary<string, int> blocks) : this(blocks.ToDictionary(b => b.Key, b => new KernelVariant(b.Value))) { }

    public static KernelTuning Default { get; } = new();

    /// <summary>
    /// A family's variant space for `engine tune`: the block sizes worth trying (powers of two from 64 up to the largest
    /// that compiles without spilling registers for sm_80 and sm_90: 256 for the row-wise attention's backward, 512 for
    /// sampling and the row gather/scale kernels, 1024 elsewhere; the tensor-core attentions are fixed by their warp
    /// layout), times the kept values a thread for the row kernels that keep their row in registers. Each parameter is a
    /// -D define; `engine kernels --all-variants` compiles every variant.
    /// </summary>
    public static IReadOnlyList<KernelVariant> Space(string family)
    {
        if (!DefaultBlocks.ContainsKey(family)) throw new ArgumentException($"tuning: unknown kernel family '{family}'");
        if (family is "attention_mma" or "attention_flash") return [new KernelVariant(128)];
        int largest = family switch { "attention" => 256, "sampling" or "rows" => 512, _ => 1024 };
        var blocks = new[] { 64, 128, 256, 512, 1024 }.Where(b => b <= largest);
        return KeptFamilies.Contains(family)
            ? [.. blocks.SelectMany(b => KeptSpace.Select(k => new KernelVariant(b, k)))]
            : [.. blocks.Select(b => new KernelVariant(b))];
    }

    public int Block(string family) => Variant(family).Block;

    public KernelVariant Variant(string family) =>
        _variants.TryGetValue(family, out var v) ? v : throw new ArgumentException($"tuning: unknown kernel family '{family}'");

    /// <summary>The -D defines of one family, e.g. -DRMSNORM_BLOCK=256 -DRMSNORM_KEPT=32.</summary>
    public IEnumerable<string> Defines(string family)
    {
        var v = Variant(family);
        var name = family.ToUpperInvariant();
        return v.Kept == 0 ? [$"-D{name}_BLOCK={v.Block}"] : [$"-D{name}_BLOCK={v.Block}", $"-D{name}_KEPT={v.Kept}"];
    }
}

/// <summary>One point of a family's variant space: its block size and, for the row kernels, the values a thread keeps (0: none).</summary>
public readonly record struct KernelVariant(int Block, int Kept = 0)
{
    public static implicit operator KernelVariant(int block) => new(block);

    /// <summary>"256", or "256x16" (block x kept values).</summary>
    public override string ToString() => Kept == 0 ? Block.ToString(System.Globalization.CultureInfo.InvariantCulture) : $"{Block}x{Kept}";

    public static bool TryParse(string text, out KernelVariant variant)
    {
        variant = default;
        var parts = text.Split('x');
        if (parts.Length is < 1 or > 2 || !int.TryParse(parts[0], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int b)) return false;
        int k = 0;
        if (parts.Length == 2 && !int.TryParse(parts[1], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out k)) return false;
        variant = new KernelVariant(b, k);
        return true;
    }
}
