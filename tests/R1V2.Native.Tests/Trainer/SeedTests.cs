using System.Diagnostics;
using R1V2.Native.Engine;
using R1V2.Native.Trainer.Data;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Seeds are the same in every process: runs reproduce from their seed after a restart.</summary>
public sealed class SeedTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-seeds-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Seeds_MatchSplitMix64AndFnv1a_ComputedIndependently()
    {
        Assert.Equal(0xE220A8397B1DCDAFul, Seeds.Mix(0)); // SplitMix64's first output from state 0
        Assert.Equal(0xCD8D705991914EA1ul, Seeds.Combine(1, 2, 3));
        Assert.Equal(0x4E68389F0748AA13ul, Seeds.Combine(-1));
        Assert.Equal(unchecked((long)0x14940281A21270B8ul), Seeds.Hash("mlp1.1.weight"));
        Assert.NotEqual(Seeds.Combine(1, 2), Seeds.Combine(2, 1));
    }

    [Fact]
    public void ShuffledOrder_IsPinnedBySeedAndEpoch()
    {
        var path = Path.Combine(_dir, "p.jsonl");
        File.WriteAllLines(path, Enumerable.Range(0, 8).Select(i => $"{{\"question\":\"q{i}\",\"answer\":\"{i}\"}}"));
        var order = new PromptDataset(path, seed: 5).Next(8).Select(r => r.Index).ToArray();
        var expected = Enumerable.Range(0, 8).ToArray();
        new Random(Seeds.ForRandom(5, 0)).Shuffle(expected);
        Assert.Equal(expected, order);
    }

    [Fact]
    public void EngineInit_InTwoProcesses_WritesIdenticalWeights()
    {
        string Init(string name)
        {
            var output = Path.Combine(_dir, name);
            var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in new[] { Path.Combine(AppContext.BaseDirectory, "engine.dll"), "init", "--config", Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), "--out", output, "--seed", "7" })
                psi.ArgumentList.Add(a);
            using var p = Process.Start(psi)!;
            var err = p.StandardError.ReadToEndAsync();
            p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            Assert.True(p.ExitCode == 0, err.Result);
            return Path.Combine(output, "model.safetensors");
        }
        Assert.Equal(File.ReadAllBytes(Init("a")), File.ReadAllBytes(Init("b")));
    }
}
