using System.Text.Json;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Config;

namespace R1V2.Native.Tests.Trainer;

/// <summary>Reward-model (Bradley-Terry) and MPO stages on the tiny checkpoint with a learnable preference.</summary>
[Collection("cpu")]
public sealed class PreferenceTrainerTests(CpuFixture fx) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-pref-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private TrainConfig Config(string stage, int steps, string lr)
    {
        var ckpt = Path.Combine(_dir, "tiny");
        if (!Directory.Exists(ckpt)) InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 8);
        var data = Path.Combine(_dir, "pairs.jsonl");
        // The preferred answer always says yes, the other no: a pattern both stages can learn and apply to held-out rows.
        File.WriteAllLines(data, Enumerable.Range(0, 25).Select(i =>
            JsonSerializer.Serialize(new { prompt = $"Is {i} a number?", chosen = $"yes, {i} is", rejected = $"no, {i} is not" })));
        return TrainConfig.Load(null, [$"stage={stage}", $"model={ckpt}", $"output={Path.Combine(_dir, stage)}", $"data.path={data}", $"steps={steps}",
            "trainable=all", $"optim.lr={lr}", "pairs.pairs_per_step=4", "pairs.held_out=0.2", "mpo.beta=0.5"]);
    }

    [Fact]
    public void RewardModel_LearnsThePreference_AndScoresHeldOutPairs()
    {
        using var t = new PreferenceTrainer(Config("rm", 25, "0.003"), fx.Backend);
        var summary = t.Run();
        Assert.Equal(5, summary.HeldOutPairs);
        Assert.True(t.History[0].Loss > 0.6, $"initial Bradley-Terry loss {t.History[0].Loss} should be near ln 2 (a zero head)");
        Assert.True(t.History[^1].Loss < 0.2, $"final loss {t.History[^1].Loss}");
        Assert.Equal(1.0, summary.HeldOutAccuracy);
        using var rm = RewardModel.Load(fx.Backend, Path.Combine(_dir, "rm", "final"), TrainableParts.None); // the head round-trips
        Assert.Contains(rm.Weight.Value.ToFloatArray(), w => w != 0);
    }

    [Fact]
    public void Mpo_RaisesTheChosenOverTheRejected_OnHeldOutPairs()
    {
        using var t = new PreferenceTrainer(Config("mpo", 20, "0.002"), fx.Backend);
        var summary = t.Run();
        Assert.True(t.History[^1].Loss < t.History[0].Loss, $"loss {t.History[0].Loss} -> {t.History[^1].Loss}");
        Assert.True(t.History[^1].Margin > 1, $"implicit reward margin {t.History[^1].Margin}");
        Assert.Equal(1.0, summary.HeldOutAccuracy);
        Assert.NotEqual(0, t.History[^1].Delta); // BCO's delta follows the implicit rewards
    }
}
