using R1V2.Native.Engine.Checkpoints;
using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Mpo;
using R1V2.Native.Trainer.Optim;
using R1V2.Native.Trainer.Parallel;

namespace R1V2.Native.Trainer;

/// <summary>One logged step of a preference stage (reward model or MPO).</summary>
public sealed record PreferenceStepMetrics(int Step, double Loss, double Accuracy, double Margin, double Delta, double GradNorm, float LearningRate);

/// <summary>The end of a preference stage: accuracy on the held-out pairs (never trained on).</summary>
public sealed record PreferenceSummary(string Stage, int Steps, int TrainPairs, int HeldOutPairs, double? HeldOutAccuracy, double FinalLoss);

/// <summary>
/// The two preference stages. rm: the reward model (VLM + scalar head on the last token) trained with the
/// Bradley-Terry loss -log sigmoid(r_c - r_r). mpo: the policy trained with DPO + BCO + the chosen answer's
/// length-normalised NLL against a frozen reference copy (log-probs of the reference are computed with the same
/// scoring pass). A fixed share of the pairs (the last rows of the file) is held out and only evaluated. Checkpoints
/// every N steps (weights, optimiser moments, data position, BCO delta, guard counters) make a run resumable: a new
/// trainer on the same output continues from the newest one, bit for bit on the CPU backend. The trained model is
/// saved to output/final (temporary directory, then renamed).
/// </summary>
public sealed class PreferenceTrainer : IDisposable
{
    private readonly TrainConfig _c;
    private readonly Backend _b;
    private readonly TextTokenizer _tokenizer;
    private readonly ResponsePacker _packer;
    private readonly PreferenceDataset _data;
    private readonly HashSet<int> _heldOut;
    private readonly RewardModel? _rm;
    private readonly VisionLanguageModel? _policy, _reference;
    private readonly AdamWOptimizer _opt;
    private readonly LearningRateSchedule _schedule;
    private readonly BcoDelta _delta;
    private int _step;
    private readonly NonFiniteGuard _guard;

    /// <param name="dataParallel">The ranks this run trains on together (each scores its share of every step's pairs); one process by default.</param>
    public PreferenceTrainer(TrainConfig config, Backend backend, DataParallel? dataParallel = null)
    {
        _c = config;
        _b = backend;
        _dp = dataParallel ?? DataParallel.Single;
        var parts = config.TrainableParts();
        Directory.CreateDirectory(config.Output);
        var resume = RunCheckpoints.Latest(config.Output, cleanup: _dp.Writes);
        if (resume is not null) RunCheckpoints.CheckStage(resume, config.Stage);
        var source = resume ?? config.Model;
        _tokenizer = TextTokenizer.Load(config.Model);
        _data = new PreferenceDataset(config.Data.Path, config.Seed, config.Data.Shuffle, config.Data.SkipBadRows);
        int held = (int)Math.Floor(_data.Count * config.Pairs.HeldOut);
        if (_data.Count - held < 1) throw new InvalidDataException($"{config.Data.Path}: {_data.Count} pairs leave none to train on with held_out {config.Pairs.HeldOut}");
        _heldOut = Enumerable.Range(_data.Count - held, held).ToHashSet();
        IEnumerable<Engine.Layers.Parameter> trainable;
        if (config.Stage == "rm")
        {
            _rm = RewardModel.Load(backend, source, parts, tensorParallel: _dp.TensorParallel);
            trainable = _rm.Trainable;
        }
        else
        {
            _policy = VisionLanguageModel.Load(backend, source, parts, tensorParallel: _dp.TensorParallel);
            _reference = VisionLanguageModel.Load(backend, config.Model, TrainableParts.None, tensorParallel: _dp.TensorParallel); // the frozen start, also on resume
            trainable = _policy.Parameters.Trainable;
        }
        (_rm?.Vlm ?? _policy!).GradientReady = _dp.GradientReady;   // data parallel: buckets start their sums while backward goes on
        _dp.SyncWeights([.. (_rm?.Vlm ?? _policy!).Parameters.All.Select(p => p.Parameter), .. _rm is null ? [] : new[] { _rm.Weight, _rm.Bias }]);
        _base = RunCheckpoints.BaseOf(resume, config.Model, (_rm?.Vlm ?? _policy!).Parameters.All.Where(p => p.Parameter.Trainable).Select(p => p.Name)
            .Concat(_rm is null ? [] : [RewardModel.HeadWeight, RewardModel.HeadBias]));
        _packer = new ResponsePacker(_policy ?? _rm!.Vlm, _tokenizer);
        var o = config.Optim;
        _opt = new AdamWOptimizer(backend, trainable, new AdamWSettings(o.Lr, o.Beta1, o.Beta2, o.Eps, o.WeightDecay), o.MaxGradNorm, _dp, config.Parallel.ShardOptimizer, _dp.TensorParallel);
        _schedule = config.Schedule();
        _delta = new BcoDelta();
        _guard = new NonFiniteGuard(config.Optim.MaxSkippedSteps);
        if (resume is not null) Restore(resume);
        else if (_dp.Writes) File.WriteAllText(MetricsPath, "");
        if (_dp.Writes) File.WriteAllText(Path.Combine(config.Output, "config.resolved.yaml"), config.ToYaml());
    }

    private readonly DataParallel _dp;

    private IEnumerable<Engine.Layers.Parameter> Trainable => _rm?.Trainable ?? _policy!.Parameters.Trainable;

    public List<PreferenceStepMetrics> History { get; } = [];
    public int Step => _step;
    public string MetricsPath => Path.Combine(_c.Output, "metrics.jsonl");

    /// <summary>AdamW's state on this rank (masters and moments of its shard when <c>parallel.shard_optimizer</c> is on).</summary>
    public long OptimizerStateBytes => _opt.StateBytes;

    /// <summary>Packs each pair as two sequences (prompt + chosen + &lt;|im_end|&gt;, prompt + rejected + ...); targets on the responses.</summary>
    private (VlmBatch Batch, List<(int Start, int End)> Responses) Pack(IReadOnlyList<PreferencePair> pairs) =>
        _packer.Pack(pairs.Select(p => (p.Prompt, p.Images, (IReadOnlyList<string>)[p.Chosen, p.Rejected])));

    private static double Sum(float[] logp, (int Start, int End) span) => ResponsePacker.Sum(logp, span);

    /// <summary>
    /// Runs to the configured step count, then evaluates the held-out pairs and saves the model; on cancellation writes a
    /// checkpoint and returns null.
    /// </summary>
    public PreferenceSummary? Run(Action<PreferenceStepMetrics>? onStep = null, CancellationToken cancel = default)
    {
        while (_step < _c.Steps)
        {
            var pairs = new List<PreferencePair>();
            while (pairs.Count < _c.Pairs.PairsPerStep)
                pairs.AddRange(_data.Next(1).Where(p => !_heldOut.Contains(p.Index)));
            // Every rank draws the step's pairs and trains on its share: pair i on rank i mod R.
            var mine = _dp.Shard(pairs, "pairs.pairs_per_step");
            var m = _rm is not null ? RewardStep(mine, pairs.Count, _step) : MpoStep(mine, pairs.Count, _step);
            _step++;
            History.Add(m);
            if (_dp.Writes) File.AppendAllText(MetricsPath, JsonSerializer.Serialize(m) + "\n");
            onStep?.Invoke(m);
            bool stop = _dp.Any(cancel.IsCancellationRequested);
            if (_step % _c.Checkpoint.Every == 0 || _step == _c.Steps || stop) SaveCheckpoint();
            if (stop) return null;
        }
        var held = _heldOut.Order().Select(_data.Read).ToList();
        double? accuracy = held.Count == 0 ? null : Evaluate(held);
        var summary = new PreferenceSummary(_c.Stage, _c.Steps, _data.Count - held.Count, held.Count, accuracy, History.Count > 0 ? History[^1].Loss : double.NaN);
        var whole = (_rm?.Vlm ?? _policy!).GatherWhole(trainableOnly: false);
        if (_dp.Writes)
        {
            File.WriteAllText(Path.Combine(_c.Output, "summary.json"), JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true }));
            RunCheckpoints.SaveFinal(_c.Output, dir => SaveModel(dir, whole));
        }
        _dp.WaitForWriter();   // rank 0 writes the final model: no time limit
        return summary;
    }

    private readonly Checkpoint.BaseReference _base;

    /// <summary>A lean checkpoint: the trainable parameters (and the reward head), moments and state; frozen tensors stay in the base.</summary>
    public void SaveCheckpoint()
    {
        _dp.CheckSameWeights(Trainable, $"step {_step}");
        var whole = (_rm?.Vlm ?? _policy!).GatherWhole(trainableOnly: true);
        _dp.SaveCheckpoint(_c.Output, _step, _c.Checkpoint.Keep, _opt, tmp =>
        {
            if (_rm is not null) _rm.Vlm.SaveTrainable(tmp, _base, extra: [_rm.Weight, _rm.Bias], whole: whole); else _policy!.SaveTrainable(tmp, _base, whole: whole);
            File.Copy(_tokenizer.Source, Path.Combine(tmp, "tokenizer.json"), overwrite: true);
            RunCheckpoints.WriteState(tmp, new TrainerState(_c.Stage, _step, _guard.InARow, _data.Position,
                new System.Text.Json.Nodes.JsonObject { ["bco_delta"] = _delta.Value, ["bco_delta_count"] = _delta.Count }), _opt);
        });
    }

    /// <summary>The stage's final model, exported whole in the HF layout (<c>checkpoint.export_dtype</c>) with the tokenizer's files.</summary>
    private void SaveModel(string dir, IReadOnlyDictionary<string, float[]>? whole)
    {
        if (_rm is not null) _rm.Save(dir, _c.Checkpoint.ExportSafetensorsDType(), whole); else _policy!.Save(dir, _c.Checkpoint.ExportSafetensorsDType(), whole: whole);
        RunCheckpoints.CopySideFiles(_c.Model, dir);
        File.Copy(_tokenizer.Source, Path.Combine(dir, "tokenizer.json"), overwrite: true);
    }

    private void Restore(string dir)
    {
        var state = RunCheckpoints.ReadState(dir, _opt);
        _step = state.Step;
        _guard.InARow = state.BadInARow;
        _data.Seek(state.DataPosition);
        _delta.Restore(state.Extra["bco_delta_count"]?.GetValue<long>() ?? 0, state.Extra["bco_delta"]!.GetValue<double>());
        if (_dp.Writes) History.AddRange(RunCheckpoints.RewindMetrics<PreferenceStepMetrics>(MetricsPath, _step));
    }

    /// <param name="pairs">This rank's share of the step's pairs.</param>
    /// <param name="total">The step's pair count over every rank: the loss is their mean.</param>
    private PreferenceStepMetrics RewardStep(List<PreferencePair> pairs, int total, int step)
    {
        var (batch, _) = Pack(pairs);
        _opt.ZeroGrad();
        using var scored = _rm!.Score(batch);
        var d = new float[scored.Scores.Length];
        double loss = 0, correct = 0, margin = 0;
        for (int i = 0; i < pairs.Count; i++)
        {
            double rc = scored.Scores[2 * i], rr = scored.Scores[2 * i + 1];
            var (l, g) = MpoMath.BradleyTerry(rc, rr);
            loss += l / total;
            d[2 * i] = (float)(g / total);
            d[2 * i + 1] = (float)(-g / total);
            correct += rc > rr ? 1 : 0;
            margin += rc - rr;
        }
        _dp.FinalBackward = true;
        _rm.Backward(scored, d);
        var lr = _schedule.At(step + 1);
        var report = _guard.Step(_opt, lr, step);
        var sums = _dp.Sum(loss, correct, margin);
        return new PreferenceStepMetrics(step + 1, sums[0], sums[1] / total, sums[2] / total, 0, report.GradNorm, lr);
    }

    /// <param name="pairs">This rank's share of the step's pairs.</param>
    /// <param name="total">The step's pair count over every rank: the loss is their mean, BCO's delta moves by all of them.</param>
    private PreferenceStepMetrics MpoStep(List<PreferencePair> pairs, int total, int step)
    {
        var (batch, spans) = Pack(pairs);
        double[] refSums;
        using (var refPass = _reference!.Forward(batch)) refSums = spans.Select(s => Sum(refPass.LogProbs, s)).ToArray();
        _opt.ZeroGrad();
        using var pass = _policy!.Forward(batch);
        var sums = spans.Select(s => Sum(pass.LogProbs, s)).ToArray();
        var dlogp = new float[batch.InputIds.Length];
        double loss = 0, correct = 0, margin = 0;
        var mpo = _c.Mpo;
        // BCO's delta: the running mean of the implicit rewards beta lr(y) of chosen and rejected, this batch's included;
        // a batch the non-finite guard skips leaves it as it was (a NaN would stay in a running mean for good).
        var deltaBefore = (_delta.Count, _delta.Value);
        var implicitRewards = _dp.Gather(Enumerable.Range(0, 2 * pairs.Count).Select(k => mpo.Beta * (sums[k] - refSums[k])).ToList(), 2 * total, block: 2);
        if (implicitRewards.All(double.IsFinite)) _delta.Update(implicitRewards);
        for (int i = 0; i < pairs.Count; i++)
        {
            var (cs, rs) = (spans[2 * i], spans[2 * i + 1]);
            var l = MpoMath.Loss(sums[2 * i], refSums[2 * i], cs.End - cs.Start, sums[2 * i + 1], refSums[2 * i + 1], mpo.Beta, _delta.Value, mpo.WPref, mpo.WQuality, mpo.WGen);
            loss += l.Loss / total;
            for (int t = cs.Start; t < cs.End; t++) dlogp[t] = (float)(l.GradChosen / total);
            for (int t = rs.Start; t < rs.End; t++) dlogp[t] = (float)(l.GradRejected / total);
            double lc = sums[2 * i] - refSums[2 * i], lr = sums[2 * i + 1] - refSums[2 * i + 1];
            correct += lc > lr ? 1 : 0;
            margin += mpo.Beta * (lc - lr);
        }
        _dp.FinalBackward = true;
        _policy.Backward(pass, dlogp);
        var lrate = _schedule.At(step + 1);
        var report = _guard.Step(_opt, lrate, step);
        if (report.Skipped) _delta.Restore(deltaBefore.Count, deltaBefore.Value);
        var totals = _dp.Sum(loss, correct, margin);
        return new PreferenceStepMetrics(step + 1, totals[0], totals[1] / total, totals[2] / total, _delta.Value, report.GradNorm, lrate);
    }

    /// <summary>Held-out accuracy: the reward model scores chosen above rejected; MPO's implicit reward does.</summary>
    private double Evaluate(List<PreferencePair> pairs)
    {
        double correct = 0;
        // Data parallel: each rank scores pair i mod R, the counts are summed.
        foreach (var chunk in _dp.Mine(pairs).Chunk(Math.Max(1, _c.Pairs.PairsPerStep)))
        {
            var (batch, spans) = Pack(chunk);
            if (_rm is not null)
            {
                using var scored = _rm.Score(batch);
                for (int i = 0; i < chunk.Length; i++) correct += scored.Scores[2 * i] > scored.Scores[2 * i + 1] ? 1 : 0;
            }
            else
            {
                using var refPass = _reference!.Forward(batch);
                using var pass = _policy!.Forward(batch);
                for (int i = 0; i < chunk.Length; i++)
                {
                    double lc = Sum(pass.LogProbs, spans[2 * i]) - Sum(refPass.LogProbs, spans[2 * i]);
                    double lr = Sum(pass.LogProbs, spans[2 * i + 1]) - Sum(refPass.LogProbs, spans[2 * i + 1]);
                    correct += lc > lr ? 1 : 0;
                }
            }
        }
        return _dp.Sum(correct)[0] / pairs.Count;
    }

    public void Dispose()
    {
        _opt.Dispose();
        _rm?.Dispose();
        _policy?.Dispose();
        _reference?.Dispose();
    }
}
