using R1V2.Native.Trainer.Config;

namespace R1V2.Native.Tests.Trainer;

public sealed class TrainConfigTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-cfg-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private string Write(string yaml)
    {
        var path = Path.Combine(_dir, "run.yaml");
        File.WriteAllText(path, yaml);
        return path;
    }

    [Fact]
    public void Load_ReadsSnakeCaseKeys_AndAppliesOverrides()
    {
        var path = Write("stage: grpo\nsteps: 7\ngrpo:\n  group_size: 6\n  ssb:\n    capacity: 32\noptim:\n  lr: 0.001\n");
        var c = TrainConfig.Load(path, ["grpo.group_size=8", "grpo.dynamic_sampling.enabled=true", "seed=42"]);
        Assert.Equal(7, c.Steps);
        Assert.Equal(8, c.Grpo.GroupSize);
        Assert.Equal(32, c.Grpo.Ssb.Capacity);
        Assert.True(c.Grpo.DynamicSampling.Enabled);
        Assert.Equal(42, c.Seed);
        Assert.Equal(1e-3f, c.Optim.Lr);
        var again = TrainConfig.Load(Write(c.ToYaml()));
        Assert.Equal(c.ToYaml(), again.ToYaml()); // the resolved config round-trips
    }

    [Fact]
    public void UnknownKeys_AreErrorsNamingThem()
    {
        var e = Assert.Throws<InvalidDataException>(() => TrainConfig.Load(Write("grpo:\n  group_sise: 4\n")));
        Assert.Contains("group_sise", e.Message);
        var o = Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["optim.learning_rate=1"]));
        Assert.Contains("learning_rate", o.Message);
    }

    [Theory]
    [InlineData("grpo.group_size=1", "group_size must be at least 2")]
    [InlineData("grpo.kl=k2.5", "grpo.kl must be none, k1 (reward penalty), k2 or k3 (loss terms)")]
    [InlineData("stage=ppo", "stage must be sft, rm, mpo or grpo")]
    [InlineData("sft.batch=0", "sft.batch must be at least 1")]
    public void InvalidValues_AreErrors(string set, string message)
    {
        var e = Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, [set]));
        Assert.Contains(message, e.Message);
    }
}
