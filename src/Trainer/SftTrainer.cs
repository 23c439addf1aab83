using R1V2.Native.Engine.Checkpoints;
using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer.Config;
using R1V2.Native.Trainer.Parallel;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Trainer;

/// <summary>One logged supervised step: mean NLL per response token; at checkpoints also the held-out loss.</summary>
public sealed record SftStepMetrics(int Step, double Loss, double GradNorm, float LearningRate, int Tokens, double? HeldOutLoss = null);

/// <summary>The end of a supervised stage: the held-out loss before and after (rows never trained on).</summary>
public sealed record SftSummary(int Steps, int TrainExamples, int HeldOutExamples, double? HeldOutLossBefore, double? HeldOutLossAfter, double FinalLoss);

/// <summary>
/// Supervised fine-tuning (the warm start before RL): teacher-forced mean NLL of the responses given prompt and
/// images, AdamW with the configured schedule and guard. The last rows of the file (sft.held_out) are never trained
/// on; their loss is measured before training, every checkpoint, and at the end. Checkpoints every N steps make the
/// run resumable (bit for bit on the CPU backend); the model is saved to output/final.
/// </summary>
public sealed class SftTrainer : IDisposable
{
    private readonly TrainConfig _c;
    private readonly TextTokenizer _tokenizer;
    private readonly SftDataset _data;
    private readonly HashSet<int> _heldOut;
    private readonly VisionLanguageModel _model;
    private readonly ResponsePacker _packer;
    private readonly AdamWOptimizer _opt;
    private readonly LearningRateSchedule _schedule;
    private int _step;
    private readonly NonFiniteGuard _guard;
    private double? _heldOutBefore;
    private readonly DataParallel _dp;

    /// <param name="dataParallel">The ranks this run trains on together (each takes its share of every batch); one process by default.</param>
    public SftTrainer(TrainConfig config, Backend backend, DataParallel? dataParallel = null)
    {
        _c = config;
        _dp = dataParallel ?? DataParallel.Single;
        Directory.CreateDirectory(config.Output);
        var resume = RunCheckpoints.Latest(config.Output, cleanup: _dp.Writes);
        if (resume is not null) RunCheckpoints.CheckStage(resume, "sft");
        _tokenizer = TextTokenizer.Load(config.Model);
        _data = new SftDataset(config.Data.Path, config.Seed, config.Data.Shuffle, config.Data.SkipBadRows);
        int held = (int)Math.Floor(_data.Count * config.Sft.HeldOut);
        if (_data.Count - held < 1) throw new InvalidDataException($"{config.Data.Path}: {_data.Count} examples leave none to train on with sft.held_out {config.Sft.HeldOut}");
        _heldOut = Enumerable.Range(_data.Count - held, held).ToHashSet();
        _model = VisionLanguageModel.Load(backend, resume ?? config.Model, config.TrainableParts(), tensorParallel: _dp.TensorParallel);
        _dp.SyncWeights([.. _model.Parameters.All.Select(p => p.Parameter)]);
        _model.GradientReady = _dp.GradientReady;   // data parallel: buckets start their sums while backward goes on
        _base = RunCheckpoints.BaseOf(resume, config.Model, _model.Parameters.All.Where(p => p.Parameter.Trainable).Select(p => p.Name));
        _packer = new ResponsePacker(_model, _tokenizer);
        var o = config.Optim;
        _opt = new AdamWOptimizer(backend, _model.Parameters.Trainable, new AdamWSettings(o.Lr, o.Beta1, o.Beta2, o.Eps, o.WeightDecay), o.MaxGradNorm, _dp, config.Parallel.ShardOptimizer, _dp.TensorParallel);
        _schedule = config.Schedule();
        _guard = new NonFiniteGuard(config.Optim.MaxSkippedSteps);
        if (resume is not null) Restore(resume);
        else
        {
            if (_dp.Writes) File.WriteAllText(MetricsPath, "");
            _heldOutBefore = HeldOutLoss();
        }
        if (_dp.Writes) File.WriteAllText(Path.Combine(config.Output, "config.resolved.yaml"), config.ToYaml());
    }

    public List<SftStepMetrics> History { get; } = [];
    public int Step => _step;
    public string MetricsPath => Path.Combine(_c.Output, "metrics.jsonl");

    /// <summary>AdamW's state on this rank (masters and moments of its shard when <c>parallel.shard_optimizer</c> is on).</summary>
    public long OptimizerStateBytes => _opt.StateBytes;
    public VisionLanguageModel Model => _model;

    /// <summary>Runs to the configured step count, then measures the held-out loss and saves the model; null when cancelled (after a checkpoint).</summary>
    public SftSummary? Run(Action<SftStepMetrics>? onStep = null, CancellationToken cancel = default)
    {
        while (_step < _c.Steps)
        {
            var batch = new List<SftExample>();
            while (batch.Count < _c.Sft.Batch) batch.AddRange(_data.Next(1).Where(e => !_heldOut.Contains(e.Index)));
            var mine = _dp.Shard(batch, "sft.batch");
            var (packed, _) = _packer.Pack(mine.Select(e => (e.Prompt, e.Images, (IReadOnlyList<string>)[e.Response])));
            _opt.ZeroGrad();
            double loss;
            long tokens;
            using (var pass = _model.Forward(packed))
            {
                // The mean NLL over the global batch's response tokens: each rank's tokens weigh 1 / (every rank's count).
                var sums = _dp.Sum(-pass.LogProbs.Sum(x => (double)x), packed.Targets.Count(t => t >= 0));
                tokens = (long)sums[1];
                loss = _dp.Ranks == 1 ? pass.Loss : sums[0] / Math.Max(1, tokens);
                float g = tokens == 0 ? 0f : -1f / tokens;
                _dp.FinalBackward = true;
                _model.Backward(pass, packed.Targets.Select(t => t >= 0 ? g : 0f).ToArray());
            }
            var lr = _schedule.At(_step + 1);
            var report = _guard.Step(_opt, lr, _step);
            _step++;
            bool scheduled = _step % _c.Checkpoint.Every == 0 || _step == _c.Steps;
            var m = new SftStepMetrics(_step, loss, report.GradNorm, lr, (int)tokens, scheduled ? HeldOutLoss() : null);
            History.Add(m);
            if (_dp.Writes) File.AppendAllText(MetricsPath, JsonSerializer.Serialize(m) + "\n");
            onStep?.Invoke(m);
            bool stop = _dp.Any(cancel.IsCancellationRequested);
            if (scheduled || stop) SaveCheckpoint();
            if (stop) return null;
        }
        // Every rank decides together (only rank 0 holds the log after a resume; the pass runs collectives under tp).
        var logged = History.LastOrDefault(h => h.HeldOutLoss is not null)?.HeldOutLoss;
        var after = _dp.Any(logged is null) ? HeldOutLoss() : logged;
        var summary = new SftSummary(_c.Steps, _data.Count - _heldOut.Count, _heldOut.Count, _heldOutBefore, after, History.Count > 0 ? History[^1].Loss : double.NaN);
        var whole = _model.GatherWhole(trainableOnly: false);   // tensor parallel: every rank of the group takes part
        if (!_dp.Writes) return summary;
        File.WriteAllText(Path.Combine(_c.Output, "summary.json"), JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true }));
        RunCheckpoints.SaveFinal(_c.Output, dir => SaveModel(dir, whole));
        return summary;
    }

    /// <summary>Mean NLL per response token over the held-out rows (null when none are held out).</summary>
    public double? HeldOutLoss()
    {
        if (_heldOut.Count == 0) return null;
        double total = 0;
        long tokens = 0;
        foreach (var chunk in _heldOut.Order().Select(_data.Read).Chunk(Math.Max(1, _c.Sft.Batch)))
        {
            var (packed, _) = _packer.Pack(chunk.Select(e => (e.Prompt, e.Images, (IReadOnlyList<string>)[e.Response])));
            using var pass = _model.Forward(packed);
            int n = packed.Targets.Count(t => t >= 0);
            total += pass.Loss * n;
            tokens += n;
        }
        return total / tokens;
    }

    private readonly Checkpoint.BaseReference _base;

    /// <summary>A lean checkpoint: the trainable parameters' fp32 masters (frozen ones from the base), moments, state, tokenizer.</summary>
    public void SaveCheckpoint()
    {
        _dp.CheckSameWeights(_model.Parameters.Trainable, $"step {_step}");
        var whole = _model.GatherWhole(trainableOnly: true);
        _dp.SaveCheckpoint(_c.Output, _step, _c.Checkpoint.Keep, _opt, tmp =>
        {
            _model.SaveTrainable(tmp, _base, whole: whole);
            File.Copy(_tokenizer.Source, Path.Combine(tmp, "tokenizer.json"), overwrite: true);
            RunCheckpoints.WriteState(tmp, new TrainerState("sft", _step, _guard.InARow, _data.Position, new JsonObject { ["held_out_before"] = _heldOutBefore }), _opt);
        });
    }

    /// <summary>The stage's final model: the whole model exported in the HF layout (<c>checkpoint.export_dtype</c>, 5 GB shards) with the tokenizer's files.</summary>
    private void SaveModel(string dir, IReadOnlyDictionary<string, float[]>? whole)
    {
        _model.Save(dir, _c.Checkpoint.ExportSafetensorsDType(), whole: whole);
        RunCheckpoints.CopySideFiles(_c.Model, dir);
        File.Copy(_tokenizer.Source, Path.Combine(dir, "tokenizer.json"), overwrite: true);
    }

    private void Restore(string dir)
    {
        var state = RunCheckpoints.ReadState(dir, _opt);
        _step = state.Step;
        _guard.InARow = state.BadInARow;
        _data.Seek(state.DataPosition);
        _heldOutBefore = state.Extra["held_out_before"]?.GetValue<double>();
        if (_dp.Writes) History.AddRange(RunCheckpoints.RewindMetrics<SftStepMetrics>(MetricsPath, _step));
    }

    public void Dispose()
    {
        _opt.Dispose();
        _model.Dispose();
    }
}
