namespace R1V2.Native.Trainer.Optim;

public enum ScheduleKind { Constant, Linear, Cosine }

/// <summary>Linear warm-up to the peak, then constant, linear or cosine decay to <c>MinRatio</c> x peak at the last step.</summary>
public sealed record LearningRateSchedule(float Peak, int WarmupSteps, int TotalSteps, ScheduleKind Kind = ScheduleKind.Cosine, float MinRatio = 0.1f)
{
    /// <summary>Learning rate of step <paramref name="step"/> (counting from 1).</summary>
    public float At(int step)
    {
        if (step < 1) throw new ArgumentOutOfRangeException(nameof(step), "steps count from 1");
        if (WarmupSteps > 0 && step <= WarmupSteps) return Peak * step / WarmupSteps;
        if (Kind == ScheduleKind.Constant || TotalSteps <= WarmupSteps) return Peak;
        double progress = Math.Clamp((double)(step - WarmupSteps) / (TotalSteps - WarmupSteps), 0, 1);
        double decay = Kind == ScheduleKind.Linear ? 1 - progress : 0.5 * (1 + Math.Cos(Math.PI * progress));
        return (float)(Peak * (MinRatio + (1 - MinRatio) * decay));
    }
}
