using R1V2.Native.Trainer.Tasks;

namespace R1V2.Native.Tests.Trainer;

/// <summary>GRPO learns what it is rewarded for: the reward-control task's training reward rises on prompts that never repeat.</summary>
[Collection("cpu")]
public sealed class RewardControlTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-control-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Prompts_NeverRepeat_AndTheRewardIsTheShareOfTheNamedDigit()
    {
        var prompts = Enumerable.Range(0, 2000).Select(i => RewardControl.Prompt(i, 1)).ToList();
        Assert.Equal(prompts.Count, prompts.Select(p => p.Question).Distinct().Count());
        Assert.Equal(10, prompts.Select(p => p.Answer).Distinct().Count());
        Assert.All(prompts, p => Assert.Contains($"digit {p.Answer},", p.Question));
        var seven = prompts.First(p => p.Answer == "7");
        Assert.Equal(0.5, RewardControl.Reward("7a7b", seven).Total);
        Assert.Equal(0, RewardControl.Reward("", seven).Total);
        Assert.Equal(1, RewardControl.Reward("777", seven).Rule);
    }

    [Fact]
    public void Grpo_RaisesTheMeanTrainingReward_FromTheFirstToTheLastQuarter()
    {
        // 60 steps of 16 fresh prompts x 8 samples from a fresh tiny model. Measured with seeds 1, 2, 3: the reward
        // rises from about 0.01 to 0.08-0.13. The margin (a rise of 0.04 and a last quarter at least 3x the first)
        // is out of reach of a reward GRPO does not follow (mutation checks in the trainer, seed 1): the advantage's sign
        // flipped gave 0.0025 -> 0.0002, advantages shuffled across samples 0.0039 -> 0.0137, a zero gradient
        // 0.0037 -> 0.0034.
        var result = RewardControl.Run(new RewardControlSettings { Output = Path.Combine(_dir, "run"), Steps = 60 }, fx.Backend);
        Assert.Equal(60, result.Steps);
        Assert.True(result.Rise > 0.04 && result.LastQuarter > 3 * result.FirstQuarter,
            $"mean training reward {result.FirstQuarter:F4} -> {result.LastQuarter:F4}: GRPO should raise a reward this easy to earn");
        Assert.True(File.Exists(Path.Combine(_dir, "run", "summary.md")));
    }
}
