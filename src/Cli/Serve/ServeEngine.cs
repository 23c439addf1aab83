using System.Collections.Concurrent;
using System.Threading.Channels;
using R1V2.Native.Engine.Generation;

namespace R1V2.Native.Cli.Serve;

/// <summary>What a running request hears from the generation loop: each token, and each sample's end.</summary>
public abstract record ServeEvent;
public sealed record TokenServed(int Sample, int Token) : ServeEvent;
public sealed record SampleDone(GeneratedSample Sample) : ServeEvent;

/// <summary>
/// The one generation loop of a server: a dedicated thread owns the model and the KV cache, takes new requests and
/// cancellations from any thread at the start of each step (so a request arriving while others decode joins the next
/// packed prefill), and hands every token and finished sample to the request's channel. A step that throws ends the
/// requests it held with the error and the loop starts over with a fresh cache, so one bad request cannot stop the
/// server. Counters feed /metrics; the gauges are published after every step.
/// </summary>
public sealed class ServeEngine : IDisposable
{
    private readonly Func<GenerationLoop> _make;
    private GenerationLoop _loop;
    private readonly ConcurrentQueue<Action> _commands = new();
    private readonly SemaphoreSlim _wake = new(0);
    private readonly Thread _thread;
    private readonly CancellationTokenSource _stop = new();
    private readonly object _gate = new();                              // submissions against a loop failure
    private readonly Dictionary<ChannelWriter<ServeEvent>, int> _open = new(); // open requests -> loop id (-1 before it is known)
    private volatile Exception? _failure;

    public ServeEngine(Func<GenerationLoop> make)
    {
        _make = make;
        _loop = make();
        Publish();
        _thread = new Thread(Run) { IsBackground = true, Name = "generation loop" };
        _thread.Start();
    }

    // Counters (read by /metrics from other threads).
    private long _promptTokens, _generatedTokens, _stepFailures;
    private readonly Queue<(DateTime At, long Tokens)> _recent = new();
    public long PromptTokens => Interlocked.Read(ref _promptTokens);
    public long GeneratedTokens => Interlocked.Read(ref _generatedTokens);
    public long StepFailures => Interlocked.Read(ref _stepFailures);
    public int Running { get; private set; }
    public int Waiting { get; private set; }
    public int UsedBlocks { get; private set; }
    public int FreeBlocks { get; private set; }
    public int Preemptions { get; private set; }
    private int _preemptionsBefore;

    /// <summary>Generated tokens per second over the last 10 seconds.</summary>
    public double TokensPerSecond
    {
        get
        {
            var since = DateTime.UtcNow.AddSeconds(-10);
            lock (_recent) return _recent.Where(e => e.At >= since).Sum(e => e.Tokens) / 10.0;
        }
    }

    /// <summary>Validates a request against the loop (throws ArgumentException naming the problem); nothing is queued.</summary>
    public void Validate(GenerationRequest request) => _loop.Validate(request);

    /// <summary>
    /// Queues a request; its events arrive on the returned channel, which completes when every sample is done (or with
    /// the error of a step that failed). When <paramref name="cancel"/> fires (the client went away, or the handler
    /// ended) the request is cancelled at the next step and its blocks freed.
    /// </summary>
    public ChannelReader<ServeEvent> Submit(GenerationRequest request, CancellationToken cancel)
    {
        var channel = Channel.CreateUnbounded<ServeEvent>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
        var writer = channel.Writer;
        lock (_gate)
        {
            if (_failure is not null) throw new InvalidOperationException($"the generation loop stopped: {_failure.Message}", _failure);
            _open[writer] = -1;
        }
        int remaining = request.Samples;
        Interlocked.Add(ref _promptTokens, request.PromptIds.Length);
        _commands.Enqueue(() =>
        {
            if (!IsOpen(writer)) return;
            int id;
            try
            {
                id = _loop.Submit(request, e =>
                {
                    Interlocked.Increment(ref _generatedTokens);
                    writer.TryWrite(new TokenServed(e.Sample, e.Token));
                }, s =>
                {
                    writer.TryWrite(new SampleDone(s));
                    if (--remaining == 0) Close(writer, null);
                });
            }
            catch (Exception e)
            {
                Close(writer, e);
                return;
            }
            lock (_gate) if (_open.ContainsKey(writer)) _open[writer] = id;
            if (cancel.CanBeCanceled)
                cancel.Register(() => { _commands.Enqueue(() => { if (Id(writer) is int open) _loop.Cancel(open); }); _wake.Release(); });
        });
        _wake.Release();
        return channel.Reader;
    }

    private bool IsOpen(ChannelWriter<ServeEvent> writer) { lock (_gate) return _open.ContainsKey(writer); }

    private int? Id(ChannelWriter<ServeEvent> writer) { lock (_gate) return _open.TryGetValue(writer, out int id) && id >= 0 ? id : null; }

    private void Close(ChannelWriter<ServeEvent> writer, Exception? error)
    {
        lock (_gate) _open.Remove(writer);
        writer.TryComplete(error);
    }

    /// <summary>Ends every open request (shutting down): their samples are cancelled and their channels completed.</summary>
    public void CancelAll()
    {
        _commands.Enqueue(() =>
        {
            List<(ChannelWriter<ServeEvent> Writer, int Id)> open;
            lock (_gate) open = [.. _open.Select(kv => (kv.Key, kv.Value))];
            foreach (var (writer, id) in open)
            {
                if (id >= 0) _loop.Cancel(id);
                Close(writer, null);
            }
        });
        _wake.Release();
    }

    private void Run()
    {
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                if (_loop.Idle && _commands.IsEmpty) _wake.Wait(_stop.Token);
                while (_commands.TryDequeue(out var command)) command();
                if (!_loop.Idle) _loop.Step();
                Publish();
            }
            catch (OperationCanceledException) when (_stop.IsCancellationRequested) { break; }
            catch (Exception e)
            {
                Interlocked.Increment(ref _stepFailures);
                Console.Error.WriteLine($"error: a generation step failed ({e.Message}); its requests end with the error and the loop starts over");
                // Every request the loop held ends with the error; the cache starts empty.
                List<ChannelWriter<ServeEvent>> open;
                lock (_gate) open = [.. _open.Keys];
                foreach (var writer in open) Close(writer, new InvalidOperationException($"the generation step failed: {e.Message}", e));
                try
                {
                    _preemptionsBefore += _loop.Preemptions;
                    _loop.Dispose();
                    _loop = _make();
                    Publish();
                }
                catch (Exception fatal)
                {
                    lock (_gate)
                    {
                        _failure = fatal;
                        foreach (var writer in _open.Keys) writer.TryComplete(fatal);
                        _open.Clear();
                    }
                    Console.Error.WriteLine($"error: the generation loop could not start again: {fatal.Message}");
                    return;
                }
            }
        }
    }

    private long _published;

    private void Publish()
    {
        long now = GeneratedTokens;
        lock (_recent)
        {
            if (now > _published) _recent.Enqueue((DateTime.UtcNow, now - _published));
            var since = DateTime.UtcNow.AddSeconds(-10);
            while (_recent.Count > 0 && _recent.Peek().At < since) _recent.Dequeue();
        }
        _published = now;
        Running = _loop.RunningSamples;
        Waiting = _loop.WaitingSamples;
        UsedBlocks = _loop.UsedBlocks;
        FreeBlocks = _loop.FreeBlocks;
        Preemptions = _preemptionsBefore + _loop.Preemptions;
    }

    /// <summary>The loop could not be started again (the server answers 500 from then on).</summary>
    public Exception? Failure => _failure;

    public void Dispose()
    {
        _stop.Cancel();
        _wake.Release();
        _thread.Join();   // the loop owns the cache and uses the model: neither is freed under a running step
        _loop.Dispose();
    }
}
