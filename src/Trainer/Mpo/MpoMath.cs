namespace R1V2.Native.Trainer.Mpo;

/// <summary>Loss of one preference pair and its gradients with respect to the summed policy log-probs of each response.</summary>
public readonly record struct PairLoss(double Loss, double Preference, double Quality, double Generation, double GradChosen, double GradRejected);

/// <summary>
/// Mixed Preference Optimisation on one pair, in double: L = w_pref DPO + w_quality BCO + w_gen NLL with
/// lr(y) = log pi(y|x) - log pi_ref(y|x) (summed over the response):
/// DPO: -log sigmoid(beta lr(y_c) - beta lr(y_r)); BCO: -log sigmoid(beta lr(y_c) - delta) - log sigmoid(-(beta lr(y_r) - delta));
/// NLL: -log pi(y_c|x) / |y_c|. delta is the moving average of rewards (BcoDelta). Defaults 0.8 / 0.2 / 1.0.
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

/// <summary>BCO's delta: an exponential moving average of the rewards seen.</summary>
public sealed class BcoDelta(double decay = 0.99, double initial = 0)
{
    public double Value { get; private set; } = initial;
    public void Update(double reward) => Value = decay * Value + (1 - decay) * reward;
    public void Restore(double value) => Value = value;
}
