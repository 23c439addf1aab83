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

    /// <summary>Every numeric key once out of its range: the error names the key.</summary>
    public static TheoryData<string, string> OutOfRange() => new()
    {
        { "steps=0", "steps must be at least 1" },
        { "sft.batch=0", "sft.batch" }, { "sft.held_out=1", "sft.held_out" }, { "pairs.pairs_per_step=0", "pairs.pairs_per_step" }, { "pairs.held_out=-0.1", "pairs.held_out" },
        { "mpo.beta=0", "mpo.beta must be in (0, inf)" }, { "mpo.w_pref=-1", "mpo.w_pref" }, { "mpo.w_quality=-1", "mpo.w_quality" }, { "mpo.w_gen=-0.5", "mpo.w_gen" },
        { "mpo.rounds=0", "mpo.rounds" }, { "mpo.samples=1", "mpo.samples" }, { "mpo.margin=-1", "mpo.margin" }, { "mpo.max_new_tokens=0", "mpo.max_new_tokens" },
        { "mpo.temperature=0", "mpo.temperature" }, { "mpo.rm_weight=-1", "mpo.rm_weight" }, { "mpo.rm_threshold=-1", "mpo.rm_threshold" },
        { "optim.lr=-1", "optim.lr must be in (0, inf), not -1" }, { "optim.lr=0", "optim.lr" }, { "optim.warmup=-1", "optim.warmup" },
        { "optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1]" }, { "optim.weight_decay=-0.1", "optim.weight_decay" }, { "optim.beta1=1", "optim.beta1 must be in [0, 1)" },
        { "optim.beta2=-0.5", "optim.beta2" }, { "optim.eps=0", "optim.eps" }, { "optim.max_grad_norm=-1", "optim.max_grad_norm" }, { "optim.grad_accum=0", "optim.grad_accum" },
        { "optim.max_skipped_steps=0", "optim.max_skipped_steps" }, { "checkpoint.every=0", "checkpoint.every" }, { "checkpoint.keep=0", "checkpoint.keep" },
        { "grpo.group_size=1", "grpo.group_size" }, { "grpo.prompts_per_step=0", "grpo.prompts_per_step" }, { "grpo.minibatches=0", "grpo.minibatches" },
        { "grpo.max_new_tokens=0", "grpo.max_new_tokens" }, { "grpo.temperature=0", "grpo.temperature" }, { "grpo.top_p=0", "grpo.top_p must be in (0, 1]" }, { "grpo.top_p=1.5", "grpo.top_p" },
        { "grpo.eps_low=1", "grpo.eps_low" }, { "grpo.eps_high=-0.1", "grpo.eps_high" }, { "grpo.dual_clip=0.5", "grpo.dual_clip must be 0 (off) or > 1" },
        { "grpo.kl_coef=-1", "grpo.kl_coef" }, { "grpo.vocab_chunk=0", "grpo.vocab_chunk" }, { "grpo.cache_blocks=0", "grpo.cache_blocks" },
        { "grpo.ssb.capacity=0", "grpo.ssb.capacity" }, { "grpo.ssb.max_age=0", "grpo.ssb.max_age" }, { "grpo.dynamic_sampling.max_rounds=0", "grpo.dynamic_sampling.max_rounds" },
        { "reward.rm_weight=-1", "reward.rm_weight" }, { "reward.rm_clip=0", "reward.rm_clip" }, { "reward.rm_threshold=-2", "reward.rm_threshold" },
        { "reward.format_well_formed=.nan", "reward.format_well_formed" }, { "reward.format_empty_answer=.inf", "reward.format_empty_answer" },
        { "reward.format_unfinished=-.inf", "reward.format_unfinished" }, { "reward.format_repeated=.nan", "reward.format_repeated" },
        { "reward.reasoning_weight=-1", "reward.reasoning_weight" }, { "reward.grounding_weight=-1", "reward.grounding_weight" },
        { "parallel.tp=0", "parallel.tp" }, { "parallel.timeout_s=0", "parallel.timeout_s" },
        { "monitor.window=0", "monitor.window" }, { "monitor.reward_rise=-1", "monitor.reward_rise" }, { "monitor.grounding_drop=2", "monitor.grounding_drop" },
    };

    [Theory]
    [MemberData(nameof(OutOfRange))]
    public void EveryNumericKey_OutOfRange_IsAnErrorNamingIt(string set, string message)
    {
        var e = Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, [set]));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void TheRangeTable_CoversEveryNumericKey()
    {
        // A new numeric key needs a range and a row above; seed takes any value.
        var covered = OutOfRange().Select(row => ((string)row[0]).Split('=')[0]).ToHashSet();
        static IEnumerable<string> Numeric(Type type, string prefix)
        {
            foreach (var p in type.GetProperties())
            {
                string key = prefix + YamlDotNet.Serialization.NamingConventions.UnderscoredNamingConvention.Instance.Apply(p.Name);
                if (p.PropertyType.IsClass && p.PropertyType.DeclaringType == typeof(TrainConfig))
                    foreach (var k in Numeric(p.PropertyType, key + ".")) yield return k;
                else if (p.PropertyType == typeof(int) || p.PropertyType == typeof(float) || p.PropertyType == typeof(double)) yield return key;
            }
        }
        var missing = Numeric(typeof(TrainConfig), "").Where(k => k != "seed" && !covered.Contains(k)).ToList();
        Assert.True(missing.Count == 0, $"numeric keys without an out-of-range case: {string.Join(", ", missing)}");
    }

    [Fact]
    public void ABadClaimPattern_IsAConfigError()
    {
        var e = Assert.Throws<InvalidDataException>(() => TrainConfig.Load(null, ["monitor.claim_pattern=no group"]));
        Assert.Contains("monitor.claim_pattern needs a group", e.Message);
    }
}
