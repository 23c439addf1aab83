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
/// mean and variance of all scores seen so far (Welford). Transformed scores at or below the threshold contribute
/// nothing: with standardisation the threshold is in standard deviations, so it means the same for any reward model
/// (only responses the reward model rates clearly above its usual score earn a bonus, and groups whose rule rewards tie
/// mostly keep zero advantage for the Selective Sample Buffer).
/// </summary>
public sealed class RewardModelScaling(RewardModelTransform transform = RewardModelTransform.Identity, double clipLow = -5, double clipHigh = 5,
    double threshold = double.NegativeInfinity)
{
    private long _count;
    private double _mean, _m2;

    public RewardModelTransform Transform { get; } = transform;
    public double Threshold { get; } = threshold;
    public (long Count, double Mean, double M2) State => (_count, _mean, _m2);

    public void Restore((long Count, double Mean, double M2) state) => (_count, _mean, _m2) = state;

    /// <summary>f(score), or 0 when f(score) does not pass the threshold. Standardisation updates its statistics first.</summary>
    public double Apply(double score)
    {
        if (Transform == RewardModelTransform.Standardise)
        {
            _count++;
            double delta = score - _mean;
            _mean += delta / _count;
            _m2 += delta * (score - _mean);
        }
        double f = Transform switch
        {
            RewardModelTransform.Identity => score,
            RewardModelTransform.Clip => Math.Clamp(score, clipLow, clipHigh),
            RewardModelTransform.Standardise => _count < 2 ? 0 : (score - _mean) / (Math.Sqrt(_m2 / (_count - 1)) + 1e-8),
            _ => throw new InvalidOperationException(),
        };
        return f > Threshold ? f : 0;
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

    /// <param name="rewardModelScore">The reward model's raw score, or null when no reward model is used.</param>
    public RewardBreakdown Score(string response, RewardContext context, double? rewardModelScore = null)
    {
        double rule = AnswerVerifier.Score(ChatTemplate.Split(response).Answer is { Length: > 0 } a ? a : response, context.Reference, context.Choices);
        double fmt = format.Score(response);
        double raw = rewardModelScore ?? 0, rm = rewardModelScore is null || rewardModelWeight == 0 ? 0 : rewardModelWeight * _scaling.Apply(raw);
        double reason = reasoningWeight != 0 && context.FollowsPremises?.Invoke(response) is { } follows ? reasoningWeight * (follows ? 1 : 0) : 0;
        double ground = groundingWeight == 0 ? 0 : groundingCredit == GroundingCredit.Share
            ? context.ImageAgreement?.Invoke(response) is { } share ? groundingWeight * share : 0
            : context.MatchesImage?.Invoke(response) is { } matches ? groundingWeight * (matches ? 1 : 0) : 0;
        return new RewardBreakdown(rule, raw, rm, fmt, rule + rm + fmt + reason + ground) { Reasoning = reason, Grounding = ground };
    }
}
