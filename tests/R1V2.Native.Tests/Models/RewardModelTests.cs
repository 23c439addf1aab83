using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>The reward model's scores: packing several sequences (with their images) into one pass changes nothing.</summary>
[Collection("cpu")]
public sealed class RewardModelTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-rm-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void PackedScores_EqualEachSequenceScoredAlone()
    {
        var init = ModelFactory.Init(Path.Combine(AppContext.BaseDirectory, "configs", "digits-tiny.json"), _dir, seed: 4);
        using var rm = RewardModel.Load(fx.Backend, _dir, TrainableParts.None, trainHead: false);
        var rng = new Random(11);
        int d = rm.Vlm.Config.Llm.HiddenSize, side = rm.Vlm.Config.ForceImageSize;
        rm.Weight.Value.CopyFrom(Enumerable.Range(0, d).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray());
        rm.Bias.Value.CopyFrom([0.25f]);
        float[] Image() => Enumerable.Range(0, 3 * side * side).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        int[] Text(int n) => Enumerable.Range(0, n).Select(_ => rng.Next(3, 200)).ToArray();
        int[] WithImage(int before, int after) => [.. Text(before), .. Enumerable.Repeat(init.ImageContextId, init.TokensPerTile), .. Text(after)];
        var reply = Text(12);
        reply[^2] = init.ImageContextId;        // a response may emit the image-context token: it stays a plain token
        var sequences = new List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)>
        {
            (WithImage(3, 2), Text(7), Image(), 1),
            (Text(4), Text(3), null, 0),        // a text-only sequence between two with images
            (WithImage(1, 5), reply, Image(), 1),
        };

        // Each sequence's score in a batch of its own.
        void ScoreAsAlone(List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)> batch, float[] scores)
        {
            for (int i = 0; i < batch.Count; i++)
            {
                var (prompt, response, pixels, tiles) = batch[i];
                int[] ids = [.. prompt, .. response];
                var imageRows = Enumerable.Range(0, prompt.Length).Where(k => ids[k] == init.ImageContextId).ToArray();
                using var alone = rm.Score(new VlmBatch(ids, Enumerable.Repeat(Engine.Backends.Backend.IgnoreIndex, ids.Length).ToArray(), [0, ids.Length], pixels, tiles, imageRows));
                Assert.Equal(alone.Scores[0], scores[i], 1e-4f * Math.Max(1, Math.Abs(alone.Scores[0])));
            }
        }

        var packed = rm.ScoreSequences(sequences);
        Assert.Equal(3, packed.Length);
        ScoreAsAlone(sequences, packed);
        Assert.True(packed.Distinct().Count() == 3, "the three sequences should not score alike");
        Assert.Empty(rm.ScoreSequences([]));
        // Repeats (the same prompt and pixel arrays, equal responses) score as their first copy; a copied pixel array is another image.
        var (p0, r0, px0, t0) = sequences[0];
        var repeated = rm.ScoreSequences([sequences[0], (p0, [.. r0], px0, t0), sequences[2], (p0, r0, px0!.ToArray(), t0)]);
        Assert.Equal([packed[0], packed[0], packed[2]], repeated[..3]);
        Assert.Equal(packed[0], repeated[3], 1e-4f * Math.Max(1, Math.Abs(packed[0])));
        // A group's different responses to one prompt share its rows and score as each alone.
        var group = new List<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)> { (p0, Text(5), px0, t0), sequences[1], (p0, Text(9), px0, t0), (p0, r0, px0, t0) };
        Assert.NotNull(VlmBatch.PackShared(group, init.ImageContextId).Batch.ExpandRows);
        ScoreAsAlone(group, rm.ScoreSequences(group));
    }
}
