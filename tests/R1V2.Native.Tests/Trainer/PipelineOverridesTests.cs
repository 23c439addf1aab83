using System.Text.Json;
using R1V2.Native.Trainer.Pipeline;

namespace R1V2.Native.Tests.Trainer;

/// <summary>`engine train --pipeline key=value`: the default pipeline's settings by name, and the run directory's memory of them.</summary>
public sealed class PipelineOverridesTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-pipeline-settings-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Keys_AreThePropertiesInSnakeCase_ButOutputAndSeed()
    {
        Assert.Equal("grpo_top_p", PipelineOverrides.SnakeCase("GrpoTopP"));
        Assert.Equal("rm_min_accuracy", PipelineOverrides.SnakeCase("RmMinAccuracy"));
        Assert.Contains("grpo_steps", PipelineOverrides.Keys);
        Assert.Contains("worked_traces", PipelineOverrides.Keys);
        Assert.Contains("model_config", PipelineOverrides.Keys);
        Assert.DoesNotContain("output", PipelineOverrides.Keys);
        Assert.DoesNotContain("seed", PipelineOverrides.Keys);
        // Every settable property of the record is reachable by exactly one key.
        Assert.Equal(typeof(PipelineSettings).GetProperties().Count(p => p.CanWrite && p.Name is not ("EqualityContract" or "Output" or "Seed")), PipelineOverrides.Keys.Count);
    }

    [Fact]
    public void Apply_SetsEachTypeByName_InOrder_AndLeavesTheRest()
    {
        var start = new PipelineSettings { Output = "runs/x", Seed = 4 };
        var s = PipelineOverrides.Apply(start, ["grpo_steps=300", "grpo_lr=5e-5", "worked_traces=0.25", "grpo_trainable=adapter", "model_config=configs/other.json",
            "grpo_steps=250", "reasoning_weight=0.5", "grounding_credit=exact"]);
        Assert.Equal(250, s.GrpoSteps); // the later value wins
        Assert.Equal(5e-5f, s.GrpoLr);
        Assert.Equal(0.25, s.WorkedTraces);
        Assert.Equal("adapter", s.GrpoTrainable);
        Assert.Equal("configs/other.json", s.ModelConfig);
        Assert.Equal(0.5, s.ReasoningWeight);
        Assert.Equal("exact", s.GroundingCredit);
        Assert.Equal(("runs/x", 4), (s.Output, s.Seed));
        Assert.Equal(new PipelineSettings().SftSteps, s.SftSteps);
        Assert.Equal(new PipelineSettings().GrpoSteps, start.GrpoSteps); // the settings given are not changed
        Assert.Null(PipelineOverrides.Apply(s, ["model_config="]).ModelConfig); // empty: the built-in config again
        // Changed lists what differs from the defaults, in declaration order, in the form --pipeline takes.
        Assert.Equal(["model_config=configs/other.json", "grpo_steps=250", "grpo_lr=5E-05", "grpo_trainable=adapter", "reasoning_weight=0.5", "grounding_credit=exact", "worked_traces=0.25"],
            PipelineOverrides.Changed(s));
        Assert.Equal(s, PipelineOverrides.Apply(start, PipelineOverrides.Changed(s)));
        Assert.Empty(PipelineOverrides.Changed(new PipelineSettings { Output = "elsewhere", Seed = 9 }));
    }

    [Theory]
    [InlineData("grpo_stepz=3", "--pipeline grpo_stepz: no such setting; the settings are ")]
    [InlineData("grpo_steps=many", "--pipeline grpo_steps=many: a whole number expected")]
    [InlineData("grpo_lr=fast", "--pipeline grpo_lr=fast: a number expected")]
    [InlineData("grpo_steps", "--pipeline 'grpo_steps': expected key=value")]
    [InlineData("seed=3", "--pipeline seed: set it with --seed")]
    [InlineData("output=runs/a", "--pipeline output: set it with --out")]
    [InlineData("grpo_top_p=1.5", "pipeline setting grpo_top_p = 1.5 is out of range")]
    [InlineData("sft_lr=-1e-3", "pipeline setting sft_lr = -0.001 is out of range")]
    [InlineData("grpo_steps=0", "pipeline setting grpo_steps = 0 is out of range")]
    [InlineData("worked_traces=2", "pipeline setting worked_traces = 2 is out of range")]
    [InlineData("group_size=1", "pipeline setting group_size = 1: GRPO needs at least 2 samples per prompt")]
    [InlineData("grpo_trainable=vit", "pipeline setting grpo_trainable = 'vit': adapter, adapter+llm, adapter+vit or all expected")]
    [InlineData("grpo_advantage=median", "pipeline setting grpo_advantage = 'median': mean_std, mean_only or leave_one_out expected")]
    [InlineData("grounding_credit=some", "pipeline setting grounding_credit = 'some': exact or per_digit expected")]
    public void BadOverride_IsAnErrorNamingTheKey(string o, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => PipelineOverrides.Apply(new PipelineSettings(), [o]));
        Assert.StartsWith(message, e.Message);
    }

    [Fact]
    public void ZeroStagesThatMayBeSkipped_AreAllowed()
    {
        var s = PipelineOverrides.Apply(new PipelineSettings(), ["warmup_steps=0", "vision_steps=0", "worked_traces=0"]);
        Assert.Equal((0, 0), (s.WarmupSteps, s.VisionSteps));
    }

    [Fact]
    public void RunDirectory_RemembersItsSettings_AndRefusesOthers_WithoutTouchingTheFile()
    {
        var run = Path.Combine(_dir, "run");
        var s = new PipelineSettings { Output = run, GrpoSteps = 7 };
        PipelineOverrides.Remember(s, run);
        var path = Path.Combine(run, PipelineOverrides.FileName);
        var saved = File.ReadAllText(path);
        Assert.Equal(7, JsonDocument.Parse(saved).RootElement.GetProperty("grpo_steps").GetInt32());
        PipelineOverrides.Remember(s with { Output = Path.Combine(_dir, "moved") }, run); // the same settings continue, wherever the directory is now
        var e = Assert.Throws<InvalidOperationException>(() => PipelineOverrides.Remember(s with { GrpoSteps = 8, GrpoLr = 3e-4f }, run));
        Assert.StartsWith(path + ": this run directory was trained with other settings (", e.Message);
        Assert.Contains("grpo_steps 7 -> 8", e.Message);
        Assert.Contains("grpo_lr", e.Message);
        Assert.Equal(saved, File.ReadAllText(path));
        File.WriteAllText(path, "not json");
        var bad = Assert.Throws<InvalidDataException>(() => PipelineOverrides.Remember(s, run));
        Assert.StartsWith(path + ": not a settings file", bad.Message);
    }
}
