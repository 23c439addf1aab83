using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;
using YamlDotNet.Serialization;
using YamlDotNet.Serialization.NamingConventions;

namespace R1V2.Native.Trainer.Config;

/// <summary>Every knob of a run, from one YAML file (snake_case keys) with --set overrides; saved resolved into the run.</summary>
public sealed class TrainConfig
{
    public string Stage { get; set; } = "grpo";
    public string Model { get; set; } = "";
    public string Output { get; set; } = "runs/grpo";
    public int Seed { get; set; } = 1;
    public string Backend { get; set; } = "auto";
    public string Trainable { get; set; } = "adapter";
    public int Steps { get; set; } = 20;
    public DataConfig Data { get; set; } = new();
    public OptimConfig Optim { get; set; } = new();
    public CheckpointConfig Checkpoint { get; set; } = new();
    public GrpoConfig Grpo { get; set; } = new();
    public RewardConfig Reward { get; set; } = new();
    public MonitorConfig Monitor { get; set; } = new();
    public PairsConfig Pairs { get; set; } = new();
    public MpoConfig Mpo { get; set; } = new();
    public SftConfig Sft { get; set; } = new();
    public ParallelConfig Parallel { get; set; } = new();

    /// <summary>The model parts that train, from <see cref="Trainable"/>.</summary>
    public Engine.Models.TrainableParts TrainableParts() => Trainable switch
    {
        "adapter" => Engine.Models.TrainableParts.Adapter,
        "adapter+llm" => Engine.Models.TrainableParts.AdapterAndLlm,
        "adapter+vit" => Engine.Models.TrainableParts.AdapterAndVit,
        _ => Engine.Models.TrainableParts.All,
    };

    /// <summary>The learning-rate schedule over <see cref="Steps"/> from the optim section.</summary>
    public Optim.LearningRateSchedule Schedule() => new(Optim.Lr, Optim.Warmup, Steps,
        Optim.Schedule switch { "linear" => R1V2.Native.Trainer.Optim.ScheduleKind.Linear, "cosine" => R1V2.Native.Trainer.Optim.ScheduleKind.Cosine, _ => R1V2.Native.Trainer.Optim.ScheduleKind.Constant },
        Optim.MinLrRatio);

    /// <summary>Supervised fine-tuning: examples per step and the share of rows held out for the validation loss.</summary>
    public sealed class SftConfig
    {
        public int Batch { get; set; } = 8;
        public double HeldOut { get; set; } = 0.1;
    }

    /// <summary>Preference-pair stages (rm, mpo): pairs per step and the share of rows held out for evaluation.</summary>
    public sealed class PairsConfig
    {
        public int PairsPerStep { get; set; } = 4;
        public double HeldOut { get; set; } = 0.2;
    }

    /// <summary>
    /// MPO: beta and the weights of DPO / BCO / NLL (BCO's delta is the running mean of the implicit rewards), and
    /// iterative MPO: with rounds N &gt; 1, round 1 trains on data.path, and each later round samples new pairs from the
    /// policy the round before it made (samples per prompt of <see cref="Prompts"/>, ranked by rule + format, plus the
    /// reward model's term when one is given, kept when their margin passes), then trains on them with that policy as
    /// its reference.
    /// </summary>
    public sealed class MpoConfig
    {
        public double Beta { get; set; } = 0.1;
        public double WPref { get; set; } = 0.8;
        public double WQuality { get; set; } = 0.2;
        public double WGen { get; set; } = 1.0;
        public int Rounds { get; set; } = 1;
        /// <summary>Prompt dataset (JSONL or Parquet) the rounds after the first sample their pairs from.</summary>
        public string Prompts { get; set; } = "";
        public int Samples { get; set; } = 4;
        public double Margin { get; set; } = 0.5;
        public int MaxNewTokens { get; set; } = 64;
        public float Temperature { get; set; } = 1f;
        /// <summary>Reward-model checkpoint that ranks the later rounds' pairs with rule + format (empty: rule + format only).</summary>
        public string RewardModel { get; set; } = "";
        public double RmWeight { get; set; } = 0.25;
        /// <summary>The reward model's standardised score counts above this many standard deviations (>= 0).</summary>
        public double RmThreshold { get; set; } = 1.0;
    }

    public sealed class DataConfig
    {
        public string Path { get; set; } = "";
        public bool Shuffle { get; set; } = true;
        public bool SkipBadRows { get; set; }
    }

    public sealed class OptimConfig
    {
        public float Lr { get; set; } = 1e-5f;
        public int Warmup { get; set; }
        public string Schedule { get; set; } = "constant";
        public float MinLrRatio { get; set; } = 0.1f;
        public float WeightDecay { get; set; }
        public float Beta1 { get; set; } = 0.9f;
        public float Beta2 { get; set; } = 0.999f;
        public float Eps { get; set; } = 1e-8f;
        public double MaxGradNorm { get; set; } = 1.0;
        /// <summary>Minibatches whose gradients add up before one optimiser step.</summary>
        public int GradAccum { get; set; } = 1;
        public int MaxSkippedSteps { get; set; } = 10;
    }

    /// <summary>
    /// Several processes (mpirun / srun): the tensor-parallel size (data parallel is the world divided by it), whether
    /// AdamW's masters and moments are sharded over the data-parallel ranks (ZeRO-1), and how long one collective may
    /// wait for the other ranks before it ends the job.
    /// </summary>
    public sealed class ParallelConfig
    {
        public int Tp { get; set; } = 1;
        public bool ShardOptimizer { get; set; }
        public double TimeoutS { get; set; } = 600;
    }

    public sealed class CheckpointConfig
    {
        public int Every { get; set; } = 10;
        public int Keep { get; set; } = 2;

        /// <summary>The storage type of the stage's exported final model: bf16 (the HF release) or f32.</summary>
        public string ExportDtype { get; set; } = "bf16";

        /// <summary><see cref="ExportDtype"/> as a safetensors dtype.</summary>
        public string ExportSafetensorsDType() => ExportDtype == "f32" ? "F32" : "BF16";
    }

    public sealed class GrpoConfig
    {
        public int GroupSize { get; set; } = 4;
        public int PromptsPerStep { get; set; } = 2;
        public int Minibatches { get; set; } = 1;
        public int MaxNewTokens { get; set; } = 64;
        public float Temperature { get; set; } = 1f;
        public float TopP { get; set; } = 1f;
        public float EpsLow { get; set; } = 0.2f;
        public float EpsHigh { get; set; } = 0.28f;
        public float DualClip { get; set; }
        public float KlCoef { get; set; }
        public string Kl { get; set; } = "none";
        public string Aggregation { get; set; } = "seq_mean_token_mean";
        public string Advantage { get; set; } = "mean_std";
        public int VocabChunk { get; set; } = 8192;
        public int CacheBlocks { get; set; } = 1024;
        public SsbConfig Ssb { get; set; } = new();
        public DynamicSamplingConfig DynamicSampling { get; set; } = new();
    }

    public sealed class SsbConfig
    {
        public bool Enabled { get; set; } = true;
        public int Capacity { get; set; } = 256;
        public int MaxAge { get; set; } = 8;
    }

    public sealed class DynamicSamplingConfig
    {
        public bool Enabled { get; set; }
        public int MaxRounds { get; set; } = 3;
    }

    public sealed class RewardConfig
    {
        /// <summary>A reward-model checkpoint (engine train --stage rm output); empty: no reward model.</summary>
        public string RmPath { get; set; } = "";
        public double RmWeight { get; set; } = 1.0;
        public string RmTransform { get; set; } = "identity";
        public double RmClip { get; set; } = 5.0;
        /// <summary>The reward-model term counts only where the transformed score exceeds this (with standardise: in standard deviations).</summary>
        public double RmThreshold { get; set; } = double.NegativeInfinity;
        public double FormatWellFormed { get; set; } = 0.5;
        public double FormatEmptyAnswer { get; set; }
        public double FormatUnfinished { get; set; } = -0.5;
        public double FormatRepeated { get; set; } = -0.5;
        /// <summary>Weight of the reasoning-consistency check (the answer follows the response's own stated premises; digit scenes).</summary>
        public double ReasoningWeight { get; set; }
        /// <summary>Weight of the grounding check (what the response says it sees is the image's content; rows that give it).</summary>
        public double GroundingWeight { get; set; }
        /// <summary>
        /// How the grounding check scores: exact (1 when everything it says it sees is right, else 0) or per_digit (the
        /// share of the digits it names that are the scene's, position by position; 0 when it names a different count).
        /// </summary>
        public string GroundingCredit { get; set; } = "exact";
    }

    public sealed class MonitorConfig
    {
        /// <summary>Warn when reward rose by at least this much over the window while grounding fell by at least GroundingDrop.</summary>
        public int Window { get; set; } = 5;
        public double RewardRise { get; set; } = 0.1;
        public double GroundingDrop { get; set; } = 0.05;
        /// <summary>Object words the grounding check looks for in answers, beside every image_objects entry of the dataset.</summary>
        public List<string> ObjectWords { get; set; } = [];
        /// <summary>A regex whose first group holds the digits a response claims to see (searched in the whole response); empty: the answer's digits.</summary>
        public string ClaimPattern { get; set; } = "";
    }

    private static IDeserializer Deserializer() => new DeserializerBuilder().WithNamingConvention(UnderscoredNamingConvention.Instance).Build();

    /// <summary>Loads a YAML file (or defaults when <paramref name="path"/> is null) and applies key.path=value overrides.</summary>
    public static TrainConfig Load(string? path, IEnumerable<string>? overrides = null)
    {
        var stream = new YamlStream();
        string source = path ?? "(defaults)";
        if (path is not null)
        {
            if (!File.Exists(path)) throw new FileNotFoundException($"config not found: {path}", path);
            try { stream.Load(new StringReader(File.ReadAllText(path))); }
            catch (YamlException e) { throw new InvalidDataException($"{path}:{e.Start.Line}: {e.Message}", e); }
            catch (InvalidOperationException e) { throw new InvalidDataException($"{path}: not a readable YAML document ({e.Message})", e); } // a malformed alias
        }
        var root = stream.Documents.Count > 0 && stream.Documents[0].RootNode is YamlMappingNode m ? m : new YamlMappingNode();
        foreach (var o in overrides ?? [])
        {
            int eq = o.IndexOf('=');
            if (eq <= 0) throw new ArgumentException($"--set '{o}': expected key.path=value");
            var keys = o[..eq].Trim().Split('.');
            var node = root;
            for (int i = 0; i < keys.Length - 1; i++)
            {
                if (!node.Children.TryGetValue(new YamlScalarNode(keys[i]), out var child) || child is not YamlMappingNode next)
                {
                    next = new YamlMappingNode();
                    node.Children[new YamlScalarNode(keys[i])] = next;
                }
                node = next;
            }
            node.Children[new YamlScalarNode(keys[^1])] = new YamlScalarNode(o[(eq + 1)..].Trim());
        }
        var text = new YamlStream(new YamlDocument(root));
        using var writer = new StringWriter();
        text.Save(writer, assignAnchors: false);
        try
        {
            var config = Deserializer().Deserialize<TrainConfig>(writer.ToString()) ?? new TrainConfig();
            config.RequireSections(source);
            config.Validate(source);
            return config;
        }
        catch (InvalidOperationException e) when (e.Source?.StartsWith("YamlDotNet", StringComparison.Ordinal) == true)
        {
            throw new InvalidDataException($"{source}: not a readable YAML config ({e.Message})", e);
        }
        catch (YamlException e)
        {
            var inner = e.InnerException?.Message ?? e.Message;
            // An unknown key that a --set named (the same key in the same section): say so, with the section.
            var unknown = System.Text.RegularExpressions.Regex.Match(inner, "Property '([^']+)' not found on type '([^']+)'");
            var set = unknown.Success ? (overrides ?? []).LastOrDefault(o =>
            {
                if (o.IndexOf('=') <= 0) return false;
                var keys = o[..o.IndexOf('=')].Trim().Split('.');
                return keys[^1] == unknown.Groups[1].Value && SectionType(keys[..^1])?.FullName == unknown.Groups[2].Value;
            }) : null;
            if (set is not null)
            {
                var keys = set[..set.IndexOf('=')].Trim().Split('.');
                throw new InvalidDataException($"--set '{set}': unknown key '{keys[^1]}'{(keys.Length > 1 ? $" in '{string.Join('.', keys[..^1])}'" : "")}", e);
            }
            throw new InvalidDataException($"{source}: {inner.Replace("Property '", "unknown key '").Replace("' not found on type", "' (not a setting of")}{(inner.Contains("not found on type") ? ")" : "")}", e);
        }
    }

    /// <summary>A section given as null (`grpo:` with nothing under it, or `grpo: ~`) or a null string: an error naming it.</summary>
    private void RequireSections(string source)
    {
        void Check(object node, string prefix)
        {
            foreach (var p in node.GetType().GetProperties())
            {
                if (p.GetIndexParameters().Length > 0 || p.SetMethod is null) continue;
                var key = prefix + UnderscoredNamingConvention.Instance.Apply(p.Name);
                var value = p.GetValue(node);
                if (value is null) throw new InvalidDataException($"{source}: '{key}' is empty; give it a value or leave it out");
                if (p.PropertyType.IsClass && p.PropertyType.DeclaringType == typeof(TrainConfig)) Check(value, key + ".");
            }
        }
        Check(this, "");
    }

    /// <summary>The settings class a key path's section names (snake_case properties from the root), or null.</summary>
    private static Type? SectionType(string[] section)
    {
        Type? type = typeof(TrainConfig);
        foreach (var key in section)
            type = type?.GetProperties().FirstOrDefault(p => UnderscoredNamingConvention.Instance.Apply(p.Name) == key)?.PropertyType;
        return type;
    }

    /// <summary>A deep copy (through the resolved YAML).</summary>
    public TrainConfig Clone() => Deserializer().Deserialize<TrainConfig>(ToYaml());

    public string ToYaml() => new SerializerBuilder().WithNamingConvention(UnderscoredNamingConvention.Instance).Build().Serialize(this);

    private void Validate(string source)
    {
        void Require(bool ok, string what) { if (!ok) throw new InvalidDataException($"{source}: {what}"); }
        Require(Stage is "grpo" or "mpo" or "rm" or "sft", $"stage must be sft, rm, mpo or grpo, not '{Stage}'");
        Require(Sft.Batch >= 1, "sft.batch must be at least 1");
        Require(Sft.HeldOut is >= 0 and < 1, "sft.held_out must be in [0, 1)");
        Require(Pairs.PairsPerStep >= 1, "pairs.pairs_per_step must be at least 1");
        Require(Optim.GradAccum >= 1, "optim.grad_accum must be at least 1");
        Require(Mpo.Rounds >= 1, "mpo.rounds must be at least 1");
        Require(Mpo.Rounds == 1 || (Stage == "mpo" && Mpo.Prompts.Length > 0), "mpo.rounds > 1 needs stage mpo and mpo.prompts (the prompts later rounds sample their pairs from)");
        Require(Mpo.Samples >= 2 && Mpo.MaxNewTokens >= 1 && Mpo.Temperature > 0, "mpo.samples must be at least 2, mpo.max_new_tokens at least 1, mpo.temperature > 0");
        Require(Mpo.RmThreshold >= 0 || double.IsNegativeInfinity(Mpo.RmThreshold), $"mpo.rm_threshold must be >= 0 (or -.inf for none), not {Mpo.RmThreshold}");
        Require(Reward.RmTransform is "identity" or "clip" or "standardise", $"reward.rm_transform must be identity, clip or standardise, not '{Reward.RmTransform}'");
        Require(Reward.GroundingCredit is "exact" or "per_digit", $"reward.grounding_credit must be exact or per_digit, not '{Reward.GroundingCredit}'");
        Require(Pairs.HeldOut >= 0 && Pairs.HeldOut < 1, "pairs.held_out must be in [0, 1)");
        Require(Steps >= 1, "steps must be at least 1");
        Require(Grpo.GroupSize >= 2, "grpo.group_size must be at least 2 (advantages compare samples of one prompt)");
        Require(Grpo.PromptsPerStep >= 1, "grpo.prompts_per_step must be at least 1");
        Require(Grpo.Minibatches >= 1, "grpo.minibatches must be at least 1");
        Require(Grpo.Kl is "none" or "k1" or "k2" or "k3", $"grpo.kl must be none, k1 (reward penalty), k2 or k3 (loss terms), not '{Grpo.Kl}'");
        Require((Grpo.Kl == "none") == (Grpo.KlCoef == 0), Grpo.Kl == "none"
            ? $"grpo.kl_coef is {Grpo.KlCoef} but grpo.kl is none: name the estimator (k1, k2 or k3)"
            : $"grpo.kl is {Grpo.Kl} but grpo.kl_coef is 0: give its coefficient (or grpo.kl=none)");
        Require(Grpo.DynamicSampling.MaxRounds >= 1, "grpo.dynamic_sampling.max_rounds must be at least 1");
        Require(Optim.GradAccum == 1 || Stage == "grpo", $"optim.grad_accum applies to the grpo stage only (the {Stage} stage takes one optimiser step per batch): leave it at 1");
        Require(Reward.RmThreshold >= 0 || double.IsNegativeInfinity(Reward.RmThreshold),
            $"reward.rm_threshold must be >= 0 (or -.inf for none), not {Reward.RmThreshold}: the term is f(s) [f(s) > t], and a negative t would pay scores just below it 0 and lower ones their negative value");
        Require(Grpo.Aggregation is "seq_mean_token_mean" or "token_mean", $"grpo.aggregation must be seq_mean_token_mean or token_mean, not '{Grpo.Aggregation}'");
        Require(Grpo.Advantage is "mean_std" or "mean_only" or "leave_one_out", $"grpo.advantage must be mean_std, mean_only or leave_one_out, not '{Grpo.Advantage}'");
        Require(Optim.Schedule is "constant" or "linear" or "cosine", $"optim.schedule must be constant, linear or cosine, not '{Optim.Schedule}'");
        Require(Checkpoint.Every >= 1 && Checkpoint.Keep >= 1, "checkpoint.every and checkpoint.keep must be at least 1");
        Require(Checkpoint.ExportDtype is "bf16" or "f32", $"checkpoint.export_dtype must be bf16 or f32, got '{Checkpoint.ExportDtype}'");
        Require(Trainable is "adapter" or "adapter+llm" or "adapter+vit" or "all", $"trainable must be adapter, adapter+llm, adapter+vit or all, not '{Trainable}'");
        Require(Backend is "auto" or "cpu" or "cuda", $"backend must be auto, cpu or cuda, not '{Backend}'");
        // Numeric ranges: every number a run reads, checked before any work starts.
        void Range(double v, string key, double lo, double hi, bool loOpen = false, bool hiOpen = false)
        {
            bool ok = !double.IsNaN(v) && (loOpen ? v > lo : v >= lo) && (hiOpen ? v < hi : v <= hi);
            string range = $"{(loOpen ? "(" : "[")}{Show(lo)}, {Show(hi)}{(hiOpen ? ")" : "]")}";
            Require(ok, $"{key} must be in {range}, not {Show(v)}");
        }
        static string Show(double x) => double.IsPositiveInfinity(x) ? "inf" : double.IsNegativeInfinity(x) ? "-inf" : x.ToString("G6", System.Globalization.CultureInfo.InvariantCulture);
        const double Inf = double.PositiveInfinity;
        Range(Optim.Lr, "optim.lr", 0, Inf, loOpen: true, hiOpen: true);
        Range(Optim.Warmup, "optim.warmup", 0, Inf, hiOpen: true);
        Range(Optim.MinLrRatio, "optim.min_lr_ratio", 0, 1);
        Range(Optim.WeightDecay, "optim.weight_decay", 0, Inf, hiOpen: true);
        Range(Optim.Beta1, "optim.beta1", 0, 1, hiOpen: true);
        Range(Optim.Beta2, "optim.beta2", 0, 1, hiOpen: true);
        Range(Optim.Eps, "optim.eps", 0, Inf, loOpen: true, hiOpen: true);
        Range(Optim.MaxGradNorm, "optim.max_grad_norm", 0, Inf, hiOpen: true);
        Range(Optim.MaxSkippedSteps, "optim.max_skipped_steps", 1, Inf, hiOpen: true);
        Range(Grpo.MaxNewTokens, "grpo.max_new_tokens", 1, Inf, hiOpen: true);
        Range(Grpo.Temperature, "grpo.temperature", 0, Inf, loOpen: true, hiOpen: true);
        Range(Grpo.TopP, "grpo.top_p", 0, 1, loOpen: true);
        Range(Grpo.EpsLow, "grpo.eps_low", 0, 1, hiOpen: true);
        Range(Grpo.EpsHigh, "grpo.eps_high", 0, Inf, hiOpen: true);
        Require(Grpo.DualClip == 0 || Grpo.DualClip > 1, $"grpo.dual_clip must be 0 (off) or > 1, not {Show(Grpo.DualClip)}");
        Range(Grpo.KlCoef, "grpo.kl_coef", 0, Inf, hiOpen: true);
        Range(Grpo.VocabChunk, "grpo.vocab_chunk", 1, Inf, hiOpen: true);
        Range(Grpo.CacheBlocks, "grpo.cache_blocks", 1, Inf, hiOpen: true);
        Range(Grpo.Ssb.Capacity, "grpo.ssb.capacity", 1, Inf, hiOpen: true);
        Range(Grpo.Ssb.MaxAge, "grpo.ssb.max_age", 1, Inf, hiOpen: true);
        Range(Mpo.Beta, "mpo.beta", 0, Inf, loOpen: true, hiOpen: true);
        Range(Mpo.WPref, "mpo.w_pref", 0, Inf, hiOpen: true);
        Range(Mpo.WQuality, "mpo.w_quality", 0, Inf, hiOpen: true);
        Range(Mpo.WGen, "mpo.w_gen", 0, Inf, hiOpen: true);
        Range(Mpo.Margin, "mpo.margin", 0, Inf, hiOpen: true);
        Range(Mpo.RmWeight, "mpo.rm_weight", 0, Inf, hiOpen: true);
        Range(Reward.RmWeight, "reward.rm_weight", 0, Inf, hiOpen: true);
        Range(Reward.RmClip, "reward.rm_clip", 0, Inf, loOpen: true, hiOpen: true);
        Range(Reward.ReasoningWeight, "reward.reasoning_weight", 0, Inf, hiOpen: true);
        Range(Reward.GroundingWeight, "reward.grounding_weight", 0, Inf, hiOpen: true);
        foreach (var (v, key) in new[] { (Reward.FormatWellFormed, "reward.format_well_formed"), (Reward.FormatEmptyAnswer, "reward.format_empty_answer"),
                     (Reward.FormatUnfinished, "reward.format_unfinished"), (Reward.FormatRepeated, "reward.format_repeated") })
            Range(v, key, -Inf, Inf, loOpen: true, hiOpen: true);
        Range(Monitor.Window, "monitor.window", 1, Inf, hiOpen: true);
        Range(Parallel.TimeoutS, "parallel.timeout_s", 0, Inf, loOpen: true, hiOpen: true);
        Range(Parallel.Tp, "parallel.tp", 1, Inf, hiOpen: true);
        Range(Monitor.RewardRise, "monitor.reward_rise", 0, Inf, hiOpen: true);
        Range(Monitor.GroundingDrop, "monitor.grounding_drop", 0, 1);
        if (Monitor.ClaimPattern.Length > 0)
        {
            try { Grounding.ClaimRegex(Monitor.ClaimPattern, "monitor.claim_pattern"); }
            catch (ArgumentException e) { throw new InvalidDataException($"{source}: {e.Message}", e); }
        }
    }
}
