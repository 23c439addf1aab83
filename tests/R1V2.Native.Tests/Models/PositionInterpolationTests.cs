using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>Position embeddings resampled when tiles differ from the ViT's image_size (InternViT's bicubic rule).</summary>
[Collection("cpu")]
public sealed class PositionInterpolationTests(CpuFixture fx) : IDisposable
{
    private readonly Backend _b = fx.Backend;
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-interp-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Theory]
    [InlineData(6)]
    [InlineData(3)]
    [InlineData(5)]
    [InlineData(8)]
    public void BicubicMatrix_MatchesTorchInterpolate(int size)
    {
        using var f = SafetensorsFile.Open(Path.Combine(AppContext.BaseDirectory, "fixtures", "vlm", "interpolation.safetensors"));
        var grid = f.ReadFloats("grid");             // [1, 5, 4, 4]
        var expected = f.ReadFloats($"to_{size}x{size}");
        var m = VisionEncoder.BicubicMatrix(4, size);   // [size^2, 16]
        var got = new double[5 * size * size];
        for (int ch = 0; ch < 5; ch++)
            for (int o = 0; o < size * size; o++)
                for (int i = 0; i < 16; i++) got[ch * size * size + o] += (double)m[o * 16 + i] * grid[ch * 16 + i];
        Check.Close(got, expected, 1e-6, 1e-6, $"4x4 -> {size}x{size}");
    }

    [Fact]
    public void LargerTiles_RunEndToEnd_AndThePositionGradientMatchesFiniteDifferences()
    {
        // The 6B-style fixture at 42 px tiles: 6 x 6 patches per tile from a 4 x 4 position grid, 9 tokens per tile.
        var src = VlmParityTests.FixtureDir("internvit6b");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(src, "config.json")))!.AsObject();
        config["force_image_size"] = 42;
        File.WriteAllText(Path.Combine(_dir, "config.json"), config.ToJsonString());
        foreach (var file in new[] { "model.safetensors", "tokenizer.json" }) File.Copy(Path.Combine(src, file), Path.Combine(_dir, file));
        using var model = VisionLanguageModel.Load(_b, _dir, TrainableParts.AdapterAndVit);
        Assert.Equal(9, model.Config.TokensPerTile);
        int ctx = model.ImageContextId;
        int[] ids = [5, 7, ctx - 2, .. Enumerable.Repeat(ctx, 9), ctx - 1, 11, 12, 13];
        var pixels = TestData.Uniform(8, 3 * 42 * 42, 1.5f);
        var batch = VlmBatch.Single(ids, pixels, 1);
        using (var pass = model.Forward(batch)) model.Backward(pass);
        var pos = model.Parameters["vision_model.embeddings.position_embedding"];
        var grad = pos.Grad!.ToFloatArray();
        var w = pos.Value.ToFloatArray();
        foreach (int i in Enumerable.Range(0, grad.Length).OrderByDescending(i => Math.Abs(grad[i])).Take(4))
        {
            float x = w[i];
            double Loss(float v)
            {
                w[i] = v; pos.Value.CopyFrom(w);
                using var p = model.Forward(batch);
                return p.Loss;
            }
            double fd = (Loss(x + 1e-2f) - Loss(x - 1e-2f)) / 2e-2;
            Loss(x);
            Assert.True(Math.Abs(fd - grad[i]) <= 5e-4 + 2e-2 * Math.Abs(grad[i]), $"position_embedding[{i}]: finite difference {fd:E4}, backward {grad[i]:E4}");
        }
    }
}
