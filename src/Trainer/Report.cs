using System.Globalization;
using System.Text;
using System.Text.Json;

namespace R1V2.Native.Trainer;

/// <summary>PNG plots (ScottPlot) and a markdown summary of a run's metrics.jsonl (a GRPO run or a preference stage).</summary>
public static class Report
{
    public static IReadOnlyList<string> Write(string runDirectory)
    {
        var metricsPath = Path.Combine(runDirectory, "metrics.jsonl");
        if (!File.Exists(metricsPath)) throw new FileNotFoundException($"{runDirectory} has no metrics.jsonl", metricsPath);
        var lines = File.ReadAllLines(metricsPath).Where(l => l.Trim().Length > 0).ToList();
        if (lines.Count == 0) throw new InvalidDataException($"{metricsPath} holds no steps");
        var first = JsonDocument.Parse(lines[0]).RootElement;
        if (first.TryGetProperty(nameof(PreferenceStepMetrics.Margin), out _))
            return WritePreference(runDirectory, lines.Select(l => JsonSerializer.Deserialize<PreferenceStepMetrics>(l)!).ToList());
        if (first.TryGetProperty(nameof(SftStepMetrics.Tokens), out _) && !first.TryGetProperty(nameof(GrpoStepMetrics.Reward), out _))
            return WriteSft(runDirectory, lines.Select(l => JsonSerializer.Deserialize<SftStepMetrics>(l)!).ToList());
        return WriteGrpo(runDirectory, lines.Select(l => JsonSerializer.Deserialize<GrpoStepMetrics>(l)!).ToList());
    }

    private static Action<string, string, (string Label, double[] Values)[]> Plotter(string runDirectory, double[] steps, List<string> written)
    {
        var plots = Path.Combine(runDirectory, "plots");
        Directory.CreateDirectory(plots);
        return (name, title, series) =>
        {
            var plot = new ScottPlot.Plot();
            foreach (var (label, values) in series)
            {
                var line = plot.Add.Scatter(steps, values);
                line.LegendText = label;
            }
            plot.Title(title);
            plot.XLabel("step");
            if (series.Length > 1) plot.ShowLegend();
            var path = Path.Combine(plots, name + ".png");
            plot.SavePng(path, 800, 450);
            written.Add(path);
        };
    }

    private static IReadOnlyList<string> WriteSft(string runDirectory, List<SftStepMetrics> rows)
    {
        var written = new List<string>();
        var plot = Plotter(runDirectory, rows.Select(r => (double)r.Step).ToArray(), written);
        plot("loss", "Loss (mean NLL per response token)", [("train", rows.Select(r => r.Loss).ToArray()),
            ("held out", rows.Select(r => r.HeldOutLoss ?? double.NaN).ToArray())]);
        plot("grad_norm", "Gradient norm", [("grad norm", rows.Select(r => r.GradNorm).ToArray())]);
        var inv = CultureInfo.InvariantCulture;
        var md = new StringBuilder();
        md.AppendLine($"# Run summary: {Path.GetFileName(Path.GetFullPath(runDirectory))}").AppendLine();
        md.AppendLine($"{rows.Count} supervised steps. First and last steps:").AppendLine();
        md.AppendLine("| step | loss | held-out loss | grad norm | lr | tokens |").AppendLine("| --- | --- | --- | --- | --- | --- |");
        foreach (var r in rows.Take(3).Concat(rows.Count > 6 ? rows.TakeLast(3) : rows.Skip(3)))
            md.AppendLine(string.Format(inv, "| {0} | {1:F4} | {2} | {3:F3} | {4:E2} | {5} |", r.Step, r.Loss, r.HeldOutLoss is { } h ? h.ToString("F4", inv) : "-", r.GradNorm, r.LearningRate, r.Tokens));
        var summaryJson = Path.Combine(runDirectory, "summary.json");
        if (File.Exists(summaryJson) && JsonSerializer.Deserialize<SftSummary>(File.ReadAllText(summaryJson)) is { } s)
            md.AppendLine().AppendLine(string.Format(inv, "{0} training examples; held-out loss {1} before, {2} after ({3} examples).", s.TrainExamples,
                s.HeldOutLossBefore is { } b ? b.ToString("F4", inv) : "-", s.HeldOutLossAfter is { } a ? a.ToString("F4", inv) : "-", s.HeldOutExamples));
        md.AppendLine().AppendLine(string.Join("\n", written.Select(p => $"![{Path.GetFileNameWithoutExtension(p)}](plots/{Path.GetFileName(p)})")));
        var summary = Path.Combine(runDirectory, "summary.md");
        File.WriteAllText(summary, md.ToString());
        written.Add(summary);
        return written;
    }

    private static IReadOnlyList<string> WritePreference(string runDirectory, List<PreferenceStepMetrics> rows)
    {
        var written = new List<string>();
        var plot = Plotter(runDirectory, rows.Select(r => (double)r.Step).ToArray(), written);
        plot("loss", "Loss", [("loss", rows.Select(r => r.Loss).ToArray())]);
        plot("accuracy", "Pair accuracy (train batch)", [("accuracy", rows.Select(r => r.Accuracy).ToArray())]);
        plot("margin", "Reward margin, chosen minus rejected", [("margin", rows.Select(r => r.Margin).ToArray())]);
        if (rows.Any(r => r.Delta != 0)) plot("bco_delta", "BCO delta (moving average of implicit rewards)", [("delta", rows.Select(r => r.Delta).ToArray())]);
        plot("grad_norm", "Gradient norm", [("grad norm", rows.Select(r => r.GradNorm).ToArray())]);
        var inv = CultureInfo.InvariantCulture;
        var md = new StringBuilder();
        md.AppendLine($"# Run summary: {Path.GetFileName(Path.GetFullPath(runDirectory))}").AppendLine();
        md.AppendLine($"{rows.Count} steps. First and last steps:").AppendLine();
        md.AppendLine("| step | loss | accuracy | margin | delta | grad norm | lr |");
        md.AppendLine("| --- | --- | --- | --- | --- | --- | --- |");
        foreach (var r in rows.Take(3).Concat(rows.Count > 6 ? rows.TakeLast(3) : rows.Skip(3)))
            md.AppendLine(string.Format(inv, "| {0} | {1:F4} | {2:F3} | {3:F3} | {4:F3} | {5:F3} | {6:E2} |", r.Step, r.Loss, r.Accuracy, r.Margin, r.Delta, r.GradNorm, r.LearningRate));
        var summaryJson = Path.Combine(runDirectory, "summary.json");
        if (File.Exists(summaryJson) && JsonSerializer.Deserialize<PreferenceSummary>(File.ReadAllText(summaryJson)) is { } s)
            md.AppendLine().AppendLine(string.Format(inv, "Stage {0}: {1} training pairs, held-out accuracy {2} on {3} pairs.", s.Stage, s.TrainPairs,
                s.HeldOutAccuracy is { } a ? a.ToString("F3", inv) : "-", s.HeldOutPairs));
        md.AppendLine().AppendLine(string.Join("\n", written.Select(p => $"![{Path.GetFileNameWithoutExtension(p)}](plots/{Path.GetFileName(p)})")));
        var summary = Path.Combine(runDirectory, "summary.md");
        File.WriteAllText(summary, md.ToString());
        written.Add(summary);
        return written;
    }

    private static IReadOnlyList<string> WriteGrpo(string runDirectory, List<GrpoStepMetrics> rows)
    {
        var written = new List<string>();
        var plotter = Plotter(runDirectory, rows.Select(r => (double)r.Step).ToArray(), written);
        void Plot(string name, string title, params (string Label, double[] Values)[] series) => plotter(name, title, series);
        Plot("reward", "Reward (mean over samples)", ("reward", rows.Select(r => r.Reward).ToArray()));
        Plot("accuracy", "Rule accuracy", ("accuracy", rows.Select(r => r.Accuracy).ToArray()));
        Plot("effective_ratio", "Effective-sample ratio", ("update batch", rows.Select(r => r.EffectiveRatio).ToArray()),
            ("fresh rollouts only", rows.Select(r => r.FreshInformativeRatio).ToArray()));
        Plot("response_length", "Response length (tokens)", ("length", rows.Select(r => r.ResponseLength).ToArray()));
        Plot("policy_ratio", "Mean PPO ratio and clipped fraction", ("mean ratio", rows.Select(r => r.MeanRatio).ToArray()),
            ("clipped fraction", rows.Select(r => r.ClippedFraction).ToArray()));
        if (rows.Any(r => r.Kl is not null))
            Plot("kl", "KL(policy || reference), k3 estimate", ("kl", rows.Select(r => r.Kl ?? double.NaN).ToArray()));
        if (rows.Any(r => r.RewardModelMean is not null))
            Plot("reward_model", "Reward-model score", ("mean", rows.Select(r => r.RewardModelMean ?? double.NaN).ToArray()),
                ("std", rows.Select(r => r.RewardModelStd ?? double.NaN).ToArray()));
        if (rows.All(r => r.HallucinationRate is not null))
            Plot("hallucination", "Hallucination rate (digits or objects claimed but absent)", ("rate", rows.Select(r => r.HallucinationRate!.Value).ToArray()));

        var md = new StringBuilder();
        var inv = CultureInfo.InvariantCulture;
        md.AppendLine($"# Run summary: {Path.GetFileName(Path.GetFullPath(runDirectory))}").AppendLine();
        md.AppendLine($"{rows.Count} steps. First and last steps:").AppendLine();
        md.AppendLine("| step | reward | accuracy | format rate | length | effective ratio | replayed | loss | grad norm | tokens/s |");
        md.AppendLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        foreach (var r in rows.Take(3).Concat(rows.Count > 6 ? rows.TakeLast(3) : rows.Skip(3)))
            md.AppendLine(string.Format(inv, "| {0} | {1:F3} | {2:F3} | {3:F3} | {4:F1} | {5:F3} | {6} | {7:E3} | {8:F3} | {9:F0} |",
                r.Step, r.Reward, r.Accuracy, r.FormatRate, r.ResponseLength, r.EffectiveRatio, r.Replayed, r.Loss, r.GradNorm, r.TokensPerSecond));
        var warnings = rows.Where(r => r.Warning is not null).ToList();
        md.AppendLine().AppendLine(warnings.Count == 0 ? "No reward-hacking warnings." : $"{warnings.Count} warnings; the first at step {warnings[0].Step}: {warnings[0].Warning}");
        md.AppendLine().AppendLine(string.Join("\n", written.Select(p => $"![{Path.GetFileNameWithoutExtension(p)}](plots/{Path.GetFileName(p)})")));
        var summary = Path.Combine(runDirectory, "summary.md");
        File.WriteAllText(summary, md.ToString());
        written.Add(summary);
        return written;
    }
}
