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
/// packed prefill), and hands every token and finished sample to the request's channel. Counters feed /metrics.
/// </summary>
public sealed class ServeEngine : IDisposable
{
    private readonly GenerationLoop _loop;
    private readonly ConcurrentQueue<Action> _commands = new();
    private readonly SemaphoreSlim _wake = new(0);
    private readonly Thread _thread;
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<ChannelWriter<ServeEvent>, byte> _open = new();
    private volatile Exception? _failure;

    /// <summary>The gauges are published after every step (a step in progress shows the state before it).</summary>
    public ServeEngine(GenerationLoop loop)
    {
        _loop = loop;
        Publish();
        _thread = new Thread(Run) { IsBackground = true, Name = "generation loop" };
        _thread.Start();
    }

    // Counters (read by /metrics from other threads).
    private long _promptTokens, _generatedTokens;
    private readonly DateTime _started = DateTime.UtcNow;
    private readonly ConcurrentQueue<(DateTime At, int Tokens)> _recent = new();
    public long PromptTokens => Interlocked.Read(ref _promptTokens);
    public long GeneratedTokens => Interlocked.Read(ref _generatedTokens);
    public int Running { get; private set; }
    public int Waiting { get; private set; }
    public int UsedBlocks { get; private set; }
    public int FreeBlocks { get; private set; }
    public int Preemptions { get; private set; }
    public TimeSpan Uptime => DateTime.UtcNow - _started;

    /// <summary>Generated tokens per second over the last 10 seconds.</summary>
    public double TokensPerSecond
    {
        get
        {
            var since = DateTime.UtcNow.AddSeconds(-10);
            while (_recent.TryPeek(out var e) && e.At < since) _recent.TryDequeue(out _);
            return _recent.Sum(e => e.Tokens) / 10.0;
        }
    }

    /// <summary>Validates a request against the loop (throws ArgumentException naming the problem); nothing is queued.</summary>
    public void Validate(GenerationRequest request) => _loop.Validate(request);

    /// <summary>
    /// Queues a request; its events arrive on the returned channel, which completes when every sample is done. When
    /// <paramref name="cancel"/> fires (the client went away) the request is cancelled at the next step and its blocks freed.
    /// </summary>
    public ChannelReader<ServeEvent> Submit(GenerationRequest request, CancellationToken cancel)
    {
        if (_failure is not null) throw new InvalidOperationException($"the generation loop stopped: {_failure.Message}", _failure);
        var channel = Channel.CreateUnbounded<ServeEvent>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
        _open[channel.Writer] = 0;
        int remaining = request.Samples;
        Interlocked.Add(ref _promptTokens, request.PromptIds.Length);
        _commands.Enqueue(() =>
        {
            int id;
            try
            {
                id = _loop.Submit(request, e =>
                {
                    Interlocked.Increment(ref _generatedTokens);
                    channel.Writer.TryWrite(new TokenServed(e.Sample, e.Token));
                }, s =>
                {
                    channel.Writer.TryWrite(new SampleDone(s));
                    if (--remaining == 0) { channel.Writer.TryComplete(); _open.TryRemove(channel.Writer, out _); }
                });
            }
            catch (Exception e)
            {
                channel.Writer.TryComplete(e);
                _open.TryRemove(channel.Writer, out _);
                return;
            }
            if (cancel.CanBeCanceled)
                cancel.Register(() => { _commands.Enqueue(() => _loop.Cancel(id)); _wake.Release(); });
        });
        _wake.Release();
        return channel.Reader;
    }

    private void Run()
    {
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                if (_loop.Idle && _commands.IsEmpty) _wake.Wait(_stop.Token);
                while (_commands.TryDequeue(out var command)) command();
                if (_loop.Idle) { Publish(); continue; }
                _loop.Step();
                Publish();
            }
        }
        catch (OperationCanceledException) when (_stop.IsCancellationRequested) { }
        catch (Exception e)
        {
            _failure = e;
            Console.Error.WriteLine($"error: the generation loop stopped: {e.Message}");
            // Every request still open ends with the error (a 500, or a stream cut short) instead of waiting forever.
            foreach (var writer in _open.Keys) writer.TryComplete(new InvalidOperationException($"the generation loop stopped: {e.Message}", e));
            _open.Clear();
        }
    }

    private long _generated;

    private void Publish()
    {
        long now = GeneratedTokens;
        if (now > _generated) _recent.Enqueue((DateTime.UtcNow, (int)(now - _generated)));
        _generated = now;
        Running = _loop.RunningSamples;
        Waiting = _loop.WaitingSamples;
        UsedBlocks = _loop.UsedBlocks;
        FreeBlocks = _loop.FreeBlocks;
        Preemptions = _loop.Preemptions;
    }

    /// <summary>The loop failed (the server answers 500 from then on).</summary>
    public Exception? Failure => _failure;

    public void Dispose()
    {
        _stop.Cancel();
        _wake.Release();
        _thread.Join(TimeSpan.FromSeconds(30));
        _loop.Dispose();
    }
}
