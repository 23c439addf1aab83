namespace R1V2.Native.Engine.Kernels;

/// <summary>
/// Tunable launch parameters per kernel family. Each becomes a -D define when the family is compiled (so
/// __launch_bounds__ and the code see it) and is the block size the host launches with, so the two always agree.
/// `engine tune` searches them per device and shape bucket (<see cref="KernelTuner"/>, <see cref="TuningCache"/>); the
/// defaults are the values measured as sound and stand wherever no tuning was cached.
/// </summary>
public sealed class KernelTuning
{
    private readonly Dictionary<string, int> _blocks;

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

    public KernelTuning(IReadOnlyDictionary<string, int>? overrides = null)
    {
        _blocks = new Dictionary<string, int>(DefaultBlocks);
        if (overrides is null) return;
        foreach (var (family, block) in overrides)
        {
            if (!_blocks.ContainsKey(family)) throw new ArgumentException($"tuning: unknown kernel family '{family}'");
            if (block < 32 || block > 1024 || block % 32 != 0) throw new ArgumentException($"tuning: block size of {family} must be a multiple of 32 in [32, 1024], got {block}");
            if (family == "attention_mma" && block != 128) throw new ArgumentException("tuning: attention_mma is fixed at 128 threads (4 warps x 16 query rows per 64-row tile)");
            if (family == "attention_flash" && block != 128) throw new ArgumentException("tuning: attention_flash is fixed at 128 threads (4 warps x 32 query rows per 128-row tile)");
            _blocks[family] = block;
        }
    }

    public static KernelTuning Default { get; } = new();

    /// <summary>
    /// A family's variant space for `engine tune`: the block sizes worth trying (powers of two from 64 up to the largest
    /// that compiles without spilling registers for sm_80 and sm_90: 256 for the row-wise attention's backward, 512 for
    /// sampling and the row gather/scale kernels, 1024 elsewhere; the tensor-core attention is fixed by its warp layout).
    /// Each is a -D define; `engine kernels --all-variants` compiles every one.
    /// </summary>
    public static IReadOnlyList<int> Space(string family)
    {
        if (!DefaultBlocks.ContainsKey(family)) throw new ArgumentException($"tuning: unknown kernel family '{family}'");
        if (family is "attention_mma" or "attention_flash") return [128];
        int largest = family switch { "attention" => 256, "sampling" or "rows" => 512, _ => 1024 };
        return [.. new[] { 64, 128, 256, 512, 1024 }.Where(b => b <= largest)];
    }

    public int Block(string family) =>
        _blocks.TryGetValue(family, out var b) ? b : throw new ArgumentException($"tuning: unknown kernel family '{family}'");

    /// <summary>The -D defines of one family, e.g. -DRMSNORM_BLOCK=256.</summary>
    public IEnumerable<string> Defines(string family) => [$"-D{family.ToUpperInvariant()}_BLOCK={Block(family)}"];
}
