using R1V2.Native.Engine.Text;

namespace R1V2.Native.Trainer.Rewards;

/// <summary>What a rollout is scored against: the reference answer and, for multiple choice, the options.</summary>
public sealed record RewardContext(string Reference, IReadOnlyList<string>? Choices = null)
{
    /// <summary>
    /// Whether a response's conclusion follows from the premises it states (for a digit scene: the answer is the one the
    /// digits it says it sees imply, right or wrong); null: the prompt has no such check. Needs only the response.
    /// </summary>
    public Func<string, bool?>? FollowsPremises { get; init; }

    /// <summary>Whether what a response says it sees is what the image holds; null: the image's content is not known.</summary>
    public Func<string, bool?>? MatchesImage { get; init; }

    /// <summary>
    /// The share of what a response says it sees that the image holds, in [0, 1] (1 exactly when
    /// <see cref="MatchesImage"/> is true); null: the image's content is not known. For partial grounding credit.
    /// </summary>
    public Func<string, double?>? ImageAgreement { get; init; }
}

/// <summary>How the grounding term scores a response: all or nothing, or the share of its claims that are right.</summary>
public enum GroundingCredit { Exact, Share }

/// <summary>
/// The format reward: the response must close its reasoning with one <c>&lt;/think&gt;</c> and then give a non-empty
/// answer. Unfinished reasoning (no <c>&lt;/think&gt;</c>) and repeated reasoning blocks are penalised.
/// </summary>
public sealed record FormatReward(double WellFormed = 1.0, double EmptyAnswer = 0.0, double Unfinished = -1.0, double Repeated = -1.0)
{
    public double Score(string response)
    {
        int closes = Count(response, "</think>"), opens = Count(response, "<think>");
        if (closes == 0) return Unfinished;
        if (closes > 1 || opens > 1) return Repeated;
        return ChatTemplate.Split(response).Answer.Length == 0 ? EmptyAnswer : WellFormed;
    }

    private static int Count(string s, string what)
    {
        int n = 0;
        for (int i = s.IndexOf(what, StringComparison.Ordinal); i >= 0; i = s.IndexOf(what, i + 1, StringComparison.Ordinal)) n++;
        return n;
    }
}

public enum RewardModelTransform { Identity, Clip, Standardise }

/// <summary>
/// How reward-model scores enter the hybrid reward: identity, clipped to [lo, hi], or standardised by the running
/// mean and variance of the scores of earlier steps (Welford). The thresholded term is f(s) [f(s) > t] with t >= 0
/// (or no threshold, t = -inf): a monotone map, so a better score never earns less. With standardisation the threshold
/// is in standard deviations, so it means the same for any reward model (only responses the reward model rates clearly
/// above its usual score earn a bonus, and groups whose rule rewards tie mostly keep zero advantage for the Selective
/// Sample Buffer).
/// <para>
/// A step's scores are transformed together (<see cref="ApplyStep"/>) with the statistics from before the step, and
/// only then folded into them: equal raw scores in one step get equal terms, so a group of identical responses keeps
/// zero advantage. The first step, with no history, is standardised by its own scores. (With dynamic sampling a step
/// scores each sampling round as one batch.)
/// </para>
/// </summary>
public sealed class RewardModelScaling
{
    private long _count;
    private double _mean, _m2;
    private readonly double _clipLow, _clipHigh;

    public RewardModelScaling(RewardModelTransform transform = RewardModelTransform.Identity, double clipLow = -5, double clipHigh = 5,
        double threshold = double.NegativeInfinity)
    {
        if (double.IsNaN(threshold) || (threshold < 0 && !double.IsNegativeInfinity(threshold)))
            throw new ArgumentOutOfRangeException(nameof(threshold), threshold,
                "the reward-model threshold must be >= 0 (or -inf for none): a negative one would pay scores just below it 0 and scores further below it their negative value");
        if (transform == RewardModelTransform.Clip && !(clipLow <= clipHigh)) throw new ArgumentOutOfRangeException(nameof(clipLow), $"clip range [{clipLow}, {clipHigh}] is empty");
        Transform = transform;
        Threshold = threshold;
        (_clipLow, _clipHigh) = (clipLow, clipHigh);
    }

    public RewardModelTransform Transform { get; }
    public double Threshold { get; }
    public (long Count, double Mean, double M2) State => (_count, _mean, _m2);

    public void Restore((long Count, double Mean, double M2) state) => (_count, _mean, _m2) = state;

    /// <summary>The mapping from a raw score s to the reward term, in words (for summaries).</summary>
    public string Describe()
    {
        string f = Transform switch
        {
            RewardModelTransform.Identity => "s",
            RewardModelTransform.Clip => $"clip(s, {_clipLow:G4}, {_clipHigh:G4})",
            _ => "(s - mean) / std of the scores before (a first batch: of its own)",
        };
        return double.IsNegativeInfinity(Threshold) ? $"f(s) = {f}" : $"f(s) [f(s) > {Threshold:G4}] with f(s) = {f}";
    }

    /// <summary>
    /// The terms of one step's raw scores: each transformed with the statistics from before the step and thresholded;
    /// the statistics are then updated once with all of them.
    /// </summary>
    public double[] ApplyStep(IReadOnlyList<double> scores)
    {
        var (count, mean, m2) = (_count, _mean, _m2);
        if (Transform == RewardModelTransform.Standardise && count < 2) (count, mean, m2) = Fold((0, 0, 0), scores);
        double std = count < 2 ? 0 : Math.Sqrt(m2 / (count - 1));
        // No spread yet (fewer than 2 scores, or all of them equal to float precision): no standardised term, rather
        // than a difference divided by a std of ~0.
        bool spread = std > 1e-6 * Math.Max(1, Math.Abs(mean));
        var terms = new double[scores.Count];
        for (int i = 0; i < scores.Count; i++)
        {
            double s = scores[i];
            double f = Transform switch
            {
                RewardModelTransform.Identity => s,
                RewardModelTransform.Clip => Math.Clamp(s, _clipLow, _clipHigh),
                RewardModelTransform.Standardise => spread ? (s - mean) / std : 0,
                _ => throw new InvalidOperationException(),
            };
            terms[i] = f > Threshold ? f : 0;
        }
        if (Transform == RewardModelTransform.Standardise) (_count, _mean, _m2) = Fold((_count, _mean, _m2), scores);
        return terms;
    }

    private static (long Count, double Mean, double M2) Fold((long Count, double Mean, double M2) state, IReadOnlyList<double> scores)
    {
        var (count, mean, m2) = state;
        foreach (var s in scores)
        {
            count++;
            double delta = s - mean;
            mean += delta / count;
            m2 += delta * (s - mean);
        }
        return (count, mean, m2);
    }
}

/// <summary>The parts of one rollout's reward, for the hallucination monitor and the metrics.</summary>
public sealed record RewardBreakdown(double Rule, double RewardModelRaw, double RewardModel, double Format, double Total)
{
    /// <summary>The weighted reasoning-consistency term (0 when unweighted or unchecked).</summary>
    public double Reasoning { get; init; }

    /// <summary>The weighted grounding term (0 when unweighted or the image's content is unknown).</summary>
    public double Grounding { get; init; }
}

/// <summary>
/// r = r_rule + w_rm f(r_rm) + r_format (as the paper) + w_reason [the conclusion follows the stated premises] +
/// w_ground [what it says it sees is in the image]; the last two are 0 unless weighted and checkable. With
/// <see cref="GroundingCredit.Share"/> the grounding term is w_ground times the share of its claims that are right.
/// </summary>
public sealed class HybridReward(FormatReward format, double rewardModelWeight = 0, RewardModelScaling? scaling = null, double reasoningWeight = 0,
    double groundingWeight = 0, GroundingCredit groundingCredit = GroundingCredit.Exact)
{
    private readonly RewardModelScaling _scaling = scaling ?? new RewardModelScaling();

    public RewardModelScaling Scaling => _scaling;

    /// <summary>One response's reward without a reward model.</summary>
    public RewardBreakdown Score(string response, RewardContext context) => Score(response, context, 0, 0);

    /// <summary>
    /// The rewards of one step's responses. With reward-model scores (raw, one per response), the scores are transformed
    /// together (<see cref="RewardModelScaling.ApplyStep"/>): equal scores in a step earn equal terms.
    /// </summary>
    /// <param name="stepScores">Data parallel: every rank's scores of the step (in the global order), which the scaling
    /// moves by, and where this rank's responses sit in it; null: <paramref name="rewardModelScores"/> are the step's.</param>
    public RewardBreakdown[] ScoreStep(IReadOnlyList<string> responses, IReadOnlyList<RewardContext> contexts, IReadOnlyList<double>? rewardModelScores = null,
        (IReadOnlyList<double> All, Func<int, int> PositionOf)? stepScores = null)
    {
        if (contexts.Count != responses.Count) throw new ArgumentException($"{contexts.Count} reward contexts for {responses.Count} responses");
        if (rewardModelScores is not null && rewardModelScores.Count != responses.Count)
            throw new ArgumentException($"{rewardModelScores.Count} reward-model scores for {responses.Count} responses");
        double[]? terms = null;
        if (rewardModelScores is not null && rewardModelWeight != 0)
        {
            if (stepScores is { } step)
            {
                var all = _scaling.ApplyStep(step.All);
                terms = [.. Enumerable.Range(0, responses.Count).Select(i => all[step.PositionOf(i)])];
            }
            else terms = _scaling.ApplyStep(rewardModelScores);
        }
        var result = new RewardBreakdown[responses.Count];
        for (int i = 0; i < responses.Count; i++)
            result[i] = Score(responses[i], contexts[i], rewardModelScores?[i] ?? 0, terms is null ? 0 : rewardModelWeight * terms[i]);
        return result;
    }

    private RewardBreakdown Score(string response, RewardContext context, double raw, double rm)
    {
        double rule = AnswerVerifier.ScoreResponse(response, context.Reference, context.Choices);
        double fmt = format.Score(response);
        double reason = reasoningWeight != 0 && context.FollowsPremises?.Invoke(response) is { } follows ? reasoningWeight * (follows ? 1 : 0) : 0;
        double ground = groundingWeight == 0 ? 0 : groundingCredit == GroundingCredit.Share
            ? context.ImageAgreement?.Invoke(response) is { } share ? groundingWeight * share : 0
            : context.MatchesImage?.Invoke(response) is { } matches ? groundingWeight * (matches ? 1 : 0) : 0;
        return new RewardBreakdown(rule, raw, rm, fmt, rule + rm + fmt + reason + ground) { Reasoning = reason, Grounding = ground };
    }
}
