using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Ssb;

namespace R1V2.Native.Trainer.Grpo;

/// <summary>
/// Rollouts packed into one batch (prompt + response per sequence, each with its image tiles). Position t predicts
/// token t + 1, so rollout i's response tokens are the targets of the positions from <see cref="ResponseStarts"/>[i]
/// (its prompt's last position) on; every other target is ignored. Only image-context tokens inside a prompt take
/// image features.
/// </summary>
public sealed record PackedRollouts(VlmBatch Batch, int[] ResponseStarts)
{
    public static PackedRollouts Pack(IReadOnlyList<Rollout> rollouts, int imageContextId)
    {
        if (rollouts.Count == 0) throw new ArgumentException("nothing to pack: no rollouts");
        var ids = new List<int>();
        var targets = new List<int>();
        var cu = new List<int> { 0 };
        var pixels = new List<float>();
        var imageRows = new List<int>();
        var starts = new int[rollouts.Count];
        int tiles = 0;
        for (int i = 0; i < rollouts.Count; i++)
        {
            var r = rollouts[i];
            int p = r.PromptIds.Length;
            if (p == 0) throw new ArgumentException($"rollout {i} has an empty prompt");
            for (int k = 0; k < p; k++) if (r.PromptIds[k] == imageContextId) imageRows.Add(ids.Count + k);
            starts[i] = ids.Count + p - 1;
            ids.AddRange(r.PromptIds);
            ids.AddRange(r.Response);
            for (int t = 0; t < p + r.Response.Length; t++)
            {
                int k = t - (p - 1);
                targets.Add(k >= 0 && k < r.Response.Length ? r.Response[k] : Backend.IgnoreIndex);
            }
            cu.Add(ids.Count);
            if (r.Tiles > 0) { pixels.AddRange(r.Pixels ?? throw new ArgumentException($"rollout {i} has tiles but no pixels")); tiles += r.Tiles; }
        }
        return new PackedRollouts(new VlmBatch([.. ids], [.. targets], [.. cu], tiles > 0 ? [.. pixels] : null, tiles, [.. imageRows]), starts);
    }
}
