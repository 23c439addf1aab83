namespace R1V2.Native.Trainer.Mpo;

/// <summary>Loss of one preference pair and its gradients with respect to the summed policy log-probs of each response.</summary>
public readonly record struct PairLoss(double Loss, double Preference, double Quality, double Generation, double GradChosen, double GradRejected);

/// <summary>
/// Mixed Preference Optimisation on one pair, in double: L = w_pref DPO + w_quality BCO + w_gen NLL with
/// lr(y) = log pi(y|x) - log pi_ref(y|x) (summed over the response):
/// DPO: -log sigmoid(beta lr(y_c) - beta lr(y_r)); BCO: -log sigmoid(beta lr(y_c) - delta) - log sigmoid(-(beta lr(y_r) - delta));
/// NLL: -log pi(y_c|x) / |y_c|. delta is the running mean of the implicit rewards (BcoDelta). Defaults 0.8 / 0.2 / 1.0.
/// </summary>
public static class MpoMath
{
    public static double LogSigmoid(double x) => x >= 0 ? -Math.Log(1 + Math.Exp(-x)) : x - Math.Log(1 + Math.Exp(x));
    public static double Sigmoid(double x) => x >= 0 ? 1 / (1 + Math.Exp(-x)) : Math.Exp(x) / (1 + Math.Exp(x));

    public static PairLoss Loss(double chosenLogp, double chosenRef, int chosenLength, double rejectedLogp, double rejectedRef, double beta, double delta,
        double wPref = 0.8, double wQuality = 0.2, double wGen = 1.0)
    {
        if (chosenLength < 1) throw new ArgumentException("the chosen response must have at least one token");
        double lc = chosenLogp - chosenRef, lr = rejectedLogp - rejectedRef;
        double z = beta * (lc - lr);
        double pref = -LogSigmoid(z);
        double qc = beta * lc - delta, qr = -(beta * lr - delta);
        double quality = -LogSigmoid(qc) - LogSigmoid(qr);
        double gen = -chosenLogp / chosenLength;
        // d(-log sigmoid(x))/dx = -(1 - sigmoid(x))
        double dPref = -(1 - Sigmoid(z));
        double gradChosen = wPref * dPref * beta + wQuality * -(1 - Sigmoid(qc)) * beta + wGen * -1.0 / chosenLength;
        double gradRejected = wPref * dPref * -beta + wQuality * -(1 - Sigmoid(qr)) * -beta;
        return new PairLoss(wPref * pref + wQuality * quality + wGen * gen, pref, quality, gen, gradChosen, gradRejected);
    }

    /// <summary>Bradley-Terry loss of a reward model on one pair, -log sigmoid(r_c - r_r), and d/d r_c (= -d/d r_r).</summary>
    public static (double Loss, double GradChosen) BradleyTerry(double chosen, double rejected) =>
        (-LogSigmoid(chosen - rejected), -(1 - Sigmoid(chosen - rejected)));
}

/// <summary>
/// BCO's reward shift delta: the running mean of the implicit rewards beta lr(y) of the chosen and the rejected responses
/// of every batch so far, the current one included (it is updated before the batch's loss uses it, as the BCO paper
/// and TRL do). No decay and no start value to pull it toward 0; its count and mean are saved in checkpoints.
/// </summary>
public sealed class BcoDelta
{
    public long Count { get; private set; }
    public double Value { get; private set; }

    /// <summary>Folds one batch's implicit rewards (chosen and rejected alike) into the mean.</summary>
    public void Update(IEnumerable<double> rewards)
    {
        foreach (var r in rewards)
        {
            Count++;
            Value += (r - Value) / Count;
        }
    }

    public void Restore(long count, double value) => (Count, Value) = (count, value);
}
