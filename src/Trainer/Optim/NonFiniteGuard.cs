namespace R1V2.Native.Trainer.Optim;

/// <summary>
/// The NaN/Inf guard of a training loop: the optimiser already skips a step whose gradient norm is not finite; this
/// counts such steps in a row and stops the run with a clear message after <paramref name="maxInARow"/> of them.
/// </summary>
public sealed class NonFiniteGuard(int maxInARow)
{
    /// <summary>Skipped steps since the last good one (saved in checkpoints).</summary>
    public int InARow { get; set; }

    /// <summary>One optimiser step at <paramref name="lr"/>; <paramref name="step"/> (0-based) names it in the error.</summary>
    public StepReport Step(AdamWOptimizer opt, float lr, int step)
    {
        var report = opt.Step(lr);
        if (!report.Skipped) { InARow = 0; return report; }
        if (++InARow >= maxInARow)
            throw new InvalidOperationException($"step {step + 1}: {InARow} updates in a row had a non-finite gradient norm; stopping (optim.max_skipped_steps; lower optim.lr or check the data)");
        return report;
    }
}
