using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using System.Threading.Channels;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Cli.Serve;

/// <summary>Settings of `engine serve`.</summary>
public sealed record ServeOptions(string Host = "127.0.0.1", int Port = 8000, string? ApiKey = null, int MaxBatch = 32, int CacheBlocks = 2048,
    int BlockSize = 16, int? MaxPromptTokens = null, long MaxImageBytes = 16L << 20, int MaxImages = 4, string? AllowImageDir = null,
    string? ServedModelName = null, int? MaxNewTokensDefault = null, long MaxImagePixels = 32L << 20, TextWriter? AccessLog = null, int MaxWaiting = 1024);

/// <summary>
/// The OpenAI-compatible HTTP server: Kestrel with minimal APIs in front of one <see cref="ServeEngine"/>.
/// POST /v1/chat/completions and /v1/completions (JSON or server-sent events), GET /v1/models, /health, /metrics.
/// </summary>
public sealed class OpenAiServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly ServeEngine _engine;
    private readonly VisionLanguageModel _model;
    private readonly TextTokenizer _tokenizer;
    private readonly ChatTemplate _template;
    private readonly ImagePreprocessor _images;
    private readonly ServeLimits _limits;
    private readonly string[] _models;
    private readonly int[] _stopTokens;
    private readonly int _maxPositions;
    private readonly ServeOptions _o;
    private readonly Dictionary<(string Endpoint, int Status), long> _requests = new();

    public string Url { get; private set; } = "";
    public ServeEngine Engine => _engine;

    private OpenAiServer(VisionLanguageModel model, TextTokenizer tokenizer, string modelDir, ServeOptions o)
    {
        _o = o;
        _model = model;
        _tokenizer = tokenizer;
        _template = new ChatTemplate(model.Config.TokensPerTile);
        _images = new ImagePreprocessor(model.Config.ForceImageSize, 1, 12);
        _maxPositions = model.Config.Llm.MaxPositionEmbeddings;
        string name = o.ServedModelName ?? Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd(Path.DirectorySeparatorChar));
        _models = name == modelDir ? [name] : [name, modelDir];
        _stopTokens = new[] { "<|im_end|>", "<|endoftext|>" }.Select(tokenizer.TokenId).Where(id => id is not null).Select(id => id!.Value).ToArray();
        _limits = new ServeLimits(o.MaxPromptTokens ?? _maxPositions - 1, o.MaxImages, o.MaxImageBytes, o.MaxImagePixels, o.MaxBatch,
            o.MaxNewTokensDefault, o.AllowImageDir);
        _engine = new ServeEngine(() => new GenerationLoop(model, tokenizer, new GeneratorOptions(o.CacheBlocks, o.BlockSize, o.MaxBatch)));

        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        // The command handles SIGINT/SIGTERM itself (a second signal ends the process at once); in-flight requests are
        // cancelled before the server stops, so stopping never waits for generations.
        builder.Services.AddSingleton<IHostLifetime, CommandLifetime>();
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = TimeSpan.FromSeconds(5));
        builder.WebHost.ConfigureKestrel(k =>
        {
            // A request carries at most MaxImages images as base64 (4/3 of their bytes) plus its text.
            k.Limits.MaxRequestBodySize = o.MaxImages * o.MaxImageBytes * 4 / 3 + (4L << 20);
            k.Listen(System.Net.IPAddress.Parse(o.Host == "localhost" ? "127.0.0.1" : o.Host), o.Port);
        });
        _app = builder.Build();
        _app.Use(async (ctx, next) =>
        {
            if (o.ApiKey is not null && ctx.Request.Path.StartsWithSegments("/v1") && !KeyMatches(ctx.Request.Headers.Authorization.ToString(), o.ApiKey))
            {
                await Error(ctx, new ApiException(401, "a valid API key is required (Authorization: Bearer KEY)", null, "invalid_request_error", "invalid_api_key"));
                Count("auth", 401, ctx, TimeSpan.Zero);
                return;
            }
            await next();
        });
        _app.MapPost("/v1/chat/completions", ctx => Handle(ctx, "chat", ChatAsync));
        _app.MapPost("/v1/completions", ctx => Handle(ctx, "completions", CompletionAsync));
        _app.MapGet("/v1/models", ctx => Json(ctx, 200, new JsonObject
        {
            ["object"] = "list",
            ["data"] = new JsonArray([.. _models.Select(m => (JsonNode)new JsonObject
            {
                ["id"] = m, ["object"] = "model", ["created"] = Created, ["owned_by"] = "r1v2-native", ["max_model_len"] = _maxPositions,
            })]),
        }));
        _app.MapGet("/health", ctx => _engine.Failure is null ? Json(ctx, 200, new JsonObject { ["status"] = "ok" })
            : Json(ctx, 503, new JsonObject { ["status"] = "failed", ["error"] = _engine.Failure.Message }));
        _app.MapGet("/metrics", ctx =>
        {
            ctx.Response.ContentType = "text/plain; version=0.0.4";
            return ctx.Response.WriteAsync(Metrics());
        });
    }

    private static readonly long Created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();

    /// <summary>Loads nothing: serves <paramref name="model"/> (already loaded) until disposed. Port 0 picks a free port (see <see cref="Url"/>).</summary>
    public static async Task<OpenAiServer> StartAsync(VisionLanguageModel model, TextTokenizer tokenizer, string modelDir, ServeOptions options)
    {
        var server = new OpenAiServer(model, tokenizer, modelDir, options);
        try { await server._app.StartAsync(); }
        catch
        {
            server._engine.Dispose();   // e.g. the port is taken: the loop thread and its cache go too
            throw;
        }
        var addresses = server._app.Services.GetRequiredService<Microsoft.AspNetCore.Hosting.Server.IServer>().Features.Get<IServerAddressesFeature>()!;
        server.Url = addresses.Addresses.First();
        return server;
    }

    public Task WaitForShutdownAsync(CancellationToken token) => _app.WaitForShutdownAsync(token);

    public async ValueTask DisposeAsync()
    {
        _engine.CancelAll();            // in-flight requests end now (their streams close), so stopping waits for nothing
        await _app.StopAsync();
        await _app.DisposeAsync();
        _engine.Dispose();
    }

    /// <summary>Bearer KEY, the scheme in any case, compared in constant time.</summary>
    private static bool KeyMatches(string header, string key)
    {
        if (!header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase)) return false;
        var given = Encoding.UTF8.GetBytes(header[7..].Trim());
        return System.Security.Cryptography.CryptographicOperations.FixedTimeEquals(given, Encoding.UTF8.GetBytes(key));
    }

    private void Count(string endpoint, int status, HttpContext ctx, TimeSpan elapsed)
    {
        lock (_requests) _requests[(endpoint, status)] = _requests.GetValueOrDefault((endpoint, status)) + 1;
        _o.AccessLog?.WriteLine($"{DateTime.UtcNow:yyyy-MM-ddTHH:mm:ss}Z {ctx.Connection.RemoteIpAddress} {ctx.Request.Method} {ctx.Request.Path} {status} {elapsed.TotalSeconds:F3} s");
    }

    // ---- handlers ----------------------------------------------------------------------------------------------

    private async Task Handle(HttpContext ctx, string endpoint, Func<HttpContext, JsonObject, Task> handler)
    {
        int status = 200;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            if (_engine.Failure is not null) throw new ApiException(500, $"the generation loop stopped: {_engine.Failure.Message}", null, "server_error");
            string body;
            try
            {
                using var reader = new StreamReader(ctx.Request.Body, Encoding.UTF8);
                body = await reader.ReadToEndAsync(ctx.RequestAborted);
            }
            catch (BadHttpRequestException e) { throw new ApiException(e.StatusCode, $"the request body was refused: {e.Message}"); }
            await handler(ctx, OpenAiRequests.ParseBody(body));
        }
        catch (ApiException e)
        {
            status = e.Status;
            if (!ctx.Response.HasStarted) await Error(ctx, e);
        }
        catch (OperationCanceledException) when (ctx.RequestAborted.IsCancellationRequested) { status = 499; }
        catch (Exception e)
        {
            // Anything else is the server's fault: a 500 with an error object (or an error event in a stream), logged.
            status = 500;
            Console.Error.WriteLine($"error: {ctx.Request.Path}: {e.Message}");
            var error = new ApiException(500, $"internal error: {e.Message}", null, "server_error");
            if (!ctx.Response.HasStarted) await Error(ctx, error);
            else
            {
                try { await ctx.Response.WriteAsync("data: " + error.Body().ToJsonString() + "\n\n"); }
                catch (Exception) when (ctx.RequestAborted.IsCancellationRequested) { }
            }
        }
        finally
        {
            Count(endpoint, status, ctx, clock.Elapsed);
        }
    }

    private Task ChatAsync(HttpContext ctx, JsonObject body)
    {
        var r = OpenAiRequests.Chat(body, _models, _tokenizer, _template, _images, _limits, _maxPositions);
        return Run(ctx, r.Model, r.PromptIds, r.Pixels, r.Tiles, r.Sampling, chat: true);
    }

    private Task CompletionAsync(HttpContext ctx, JsonObject body)
    {
        var r = OpenAiRequests.Completion(body, _models, _tokenizer, _limits, _maxPositions);
        return Run(ctx, r.Model, r.PromptIds, null, 0, r.Sampling, chat: false);
    }

    private async Task Run(HttpContext ctx, string model, int[] prompt, float[]? pixels, int tiles, SamplingRequest s, bool chat)
    {
        var request = new GenerationRequest(prompt, pixels, tiles, s.Sampling, s.Seed, s.MaxTokens, s.IgnoreEos ? null : _stopTokens, s.Stop.Length > 0 ? s.Stop : null, s.N);
        try { _engine.Validate(request); }
        catch (ArgumentException e)
        {
            throw new ApiException(400, e.Message, e.Message.Contains("max new tokens", StringComparison.Ordinal) ? (chat ? "max_completion_tokens" : "max_tokens") : chat ? "messages" : "prompt");
        }
        // Overload: beyond --max-waiting samples queued, a request is turned away at once rather than held.
        if (_engine.Waiting + s.N > _o.MaxWaiting)
            throw new ApiException(503, $"the server is busy: {_engine.Waiting} samples are waiting (--max-waiting {_o.MaxWaiting}); retry later", null, "server_error", "overloaded");
        string id = (chat ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N");
        // Ended when the client goes away or this handler ends for any reason: the engine then cancels what is left.
        using var done = CancellationTokenSource.CreateLinkedTokenSource(ctx.RequestAborted);
        try { await Respond(ctx, id, model, prompt, s, chat, _engine.Submit(request, done.Token)); }
        finally { done.Cancel(); }
    }

    private async Task Respond(HttpContext ctx, string id, string model, int[] prompt, SamplingRequest s, bool chat, ChannelReader<ServeEvent> events)
    {
        var choices = Enumerable.Range(0, s.N).Select(_ => new ChoiceText(_tokenizer, _stopTokens, s.Stop, chat)).ToArray();
        var finish = new string?[s.N];
        int completionTokens = 0;
        if (!s.Stream)
        {
            await foreach (var e in events.ReadAllAsync(ctx.RequestAborted))
                if (e is SampleDone d)
                {
                    choices[d.Sample.Sample].Finish(d.Sample.Tokens);
                    finish[d.Sample.Sample] = FinishReason(d.Sample.Finish);
                    completionTokens += d.Sample.Tokens.Length;
                }
            var array = new JsonArray();
            for (int i = 0; i < s.N; i++)
            {
                var (reasoning, content) = choices[i].Visible(final: true);
                JsonObject choice = chat
                    ? new() { ["index"] = i, ["message"] = new JsonObject { ["role"] = "assistant", ["content"] = content, ["reasoning_content"] = reasoning }, ["finish_reason"] = finish[i] }
                    : new() { ["index"] = i, ["text"] = content, ["finish_reason"] = finish[i] };
                array.Add(choice);
            }
            await Json(ctx, 200, new JsonObject
            {
                ["id"] = id, ["object"] = chat ? "chat.completion" : "text_completion", ["created"] = DateTimeOffset.UtcNow.ToUnixTimeSeconds(), ["model"] = model,
                ["choices"] = array, ["usage"] = Usage(prompt.Length, completionTokens),
            });
            return;
        }

        ctx.Response.StatusCode = 200;
        ctx.Response.ContentType = "text/event-stream";
        ctx.Response.Headers.CacheControl = "no-cache";
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        JsonObject Chunk(JsonArray c) => new()
        {
            ["id"] = id, ["object"] = chat ? "chat.completion.chunk" : "text_completion", ["created"] = created, ["model"] = model, ["choices"] = c,
        };
        async Task Send(JsonNode node)
        {
            await ctx.Response.WriteAsync("data: " + node.ToJsonString() + "\n\n", ctx.RequestAborted);
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
        }
        if (chat)
            await Send(Chunk(new JsonArray([.. Enumerable.Range(0, s.N).Select(i => (JsonNode)new JsonObject
            {
                ["index"] = i, ["delta"] = new JsonObject { ["role"] = "assistant", ["content"] = "" }, ["finish_reason"] = null,
            })])));
        await foreach (var e in events.ReadAllAsync(ctx.RequestAborted))
        {
            int i;
            string? reason = null;
            if (e is TokenServed t) { i = t.Sample; choices[i].Add(t.Token); }
            else
            {
                var d = ((SampleDone)e).Sample;
                i = d.Sample;
                choices[i].Finish(d.Tokens);
                reason = FinishReason(d.Finish);
                completionTokens += d.Tokens.Length;
            }
            var (dr, dc) = choices[i].Delta(final: reason is not null);
            if (dr.Length == 0 && dc.Length == 0 && reason is null) continue;
            JsonObject choice;
            if (chat)
            {
                var delta = new JsonObject();
                if (dr.Length > 0) delta["reasoning_content"] = dr;
                if (dc.Length > 0) delta["content"] = dc;
                choice = new JsonObject { ["index"] = i, ["delta"] = delta, ["finish_reason"] = reason };
            }
            else choice = new JsonObject { ["index"] = i, ["text"] = dc, ["finish_reason"] = reason };
            await Send(Chunk(new JsonArray(choice)));
        }
        if (s.IncludeUsage)
        {
            var last = Chunk(new JsonArray());
            last["usage"] = Usage(prompt.Length, completionTokens);
            await Send(last);
        }
        await ctx.Response.WriteAsync("data: [DONE]\n\n", ctx.RequestAborted);
    }

    private static string FinishReason(R1V2.Native.Engine.Generation.FinishReason f) => f switch
    {
        R1V2.Native.Engine.Generation.FinishReason.Length => "length",
        R1V2.Native.Engine.Generation.FinishReason.Cancelled => "abort",
        _ => "stop",
    };

    private static JsonObject Usage(int prompt, int completion) => new()
    {
        ["prompt_tokens"] = prompt, ["completion_tokens"] = completion, ["total_tokens"] = prompt + completion,
    };

    private static Task Json(HttpContext ctx, int status, JsonNode body)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/json";
        return ctx.Response.WriteAsync(body.ToJsonString());
    }

    private static Task Error(HttpContext ctx, ApiException e) => Json(ctx, e.Status, e.Body());

    private string Metrics()
    {
        var sb = new StringBuilder();
        void Metric(string name, string type, string help, IEnumerable<(string Labels, double Value)> values)
        {
            sb.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
            sb.Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
            foreach (var (labels, value) in values) sb.Append(name).Append(labels).Append(' ').Append(value.ToString("R", CultureInfo.InvariantCulture)).Append('\n');
        }
        List<(string, double)> byStatus;
        lock (_requests) byStatus = [.. _requests.OrderBy(k => k.Key.Endpoint).ThenBy(k => k.Key.Status).Select(k => ($"{{endpoint=\"{k.Key.Endpoint}\",status=\"{k.Key.Status}\"}}", (double)k.Value))];
        Metric("r1v2_requests_total", "counter", "Requests answered, by endpoint and HTTP status (499: the client went away).", byStatus);
        Metric("r1v2_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [("", _engine.PromptTokens)]);
        Metric("r1v2_generation_tokens_total", "counter", "Tokens generated.", [("", _engine.GeneratedTokens)]);
        Metric("r1v2_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 seconds.", [("", _engine.TokensPerSecond)]);
        Metric("r1v2_requests_running", "gauge", "Samples decoding now.", [("", _engine.Running)]);
        Metric("r1v2_requests_waiting", "gauge", "Samples waiting for admission.", [("", _engine.Waiting)]);
        Metric("r1v2_kv_blocks_used", "gauge", "KV cache blocks in use.", [("", _engine.UsedBlocks)]);
        Metric("r1v2_kv_blocks_free", "gauge", "KV cache blocks free.", [("", _engine.FreeBlocks)]);
        Metric("r1v2_preemptions_total", "counter", "Samples preempted (their blocks freed, recomputed later).", [("", _engine.Preemptions)]);
        return sb.ToString();
    }
}

/// <summary>
/// One choice's text as it grows: decoded from its tokens (stop tokens left out), released only up to a whole
/// character, held back while it could still be the start of a stop string or of &lt;/think&gt;, cut at a stop string,
/// and (for chat) split at &lt;/think&gt; into reasoning_content and content as vLLM's reasoning parsers do (the chat
/// template opens &lt;think&gt;, so the reply starts in its reasoning).
/// </summary>
public sealed class ChoiceText(TextTokenizer tokenizer, int[] stopTokens, string[] stop, bool reasoning)
{
    private readonly List<int> _pending = [];   // tokens after the last whole character
    private string _stable = "";                // the text of every token before them
    private int _sentReasoning, _sentContent;
    private bool _done;
    private const string EndThink = "</think>";

    /// <summary>Decodes incrementally: tokens join the stable text once they end on a whole character (linear in the output).</summary>
    public void Add(int token)
    {
        if (stopTokens.Contains(token)) return;
        _pending.Add(token);
        var tail = tokenizer.Decode(_pending);
        if (tail.EndsWith('\uFFFD')) return;
        _stable += tail;
        _pending.Clear();
    }

    public void Finish(int[] tokens)
    {
        _stable = tokenizer.Decode(tokens.Where(t => !stopTokens.Contains(t)));
        _pending.Clear();
        _done = true;
    }

    /// <summary>The text released so far, as (reasoning, content).</summary>
    public (string Reasoning, string Content) Visible(bool final)
    {
        var text = _pending.Count == 0 ? _stable : _stable + tokenizer.Decode(_pending);
        if (!final && text.EndsWith('\uFFFD')) text = text.TrimEnd('\uFFFD');
        int cut = stop.Select(s => text.IndexOf(s, StringComparison.Ordinal)).Where(i => i >= 0).DefaultIfEmpty(-1).Min();
        if (cut >= 0) text = text[..cut];
        else if (!final)
        {
            // Hold back a tail that may still grow into a stop string or the end of the reasoning.
            int hold = 0;
            foreach (var s in stop.Append(reasoning ? EndThink : ""))
                for (int k = Math.Min(s.Length - 1, text.Length); k > hold; k--)
                    if (text.AsSpan(text.Length - k).SequenceEqual(s.AsSpan(0, k))) { hold = k; break; }
            text = text[..(text.Length - hold)];
        }
        if (!reasoning) return ("", text);
        if (!final && text.Length < 7 && "<think>".StartsWith(text, StringComparison.Ordinal)) return ("", ""); // may become a repeated <think>
        if (text.StartsWith("<think>", StringComparison.Ordinal)) text = text["<think>".Length..]; // the template opened it already
        int end = text.IndexOf(EndThink, StringComparison.Ordinal);
        return end < 0 ? (text, "") : (text[..end], text[(end + EndThink.Length)..]);
    }

    /// <summary>What is new since the last call.</summary>
    public (string Reasoning, string Content) Delta(bool final)
    {
        var (r, c) = Visible(final || _done);
        string dr = r.Length > _sentReasoning ? r[_sentReasoning..] : "", dc = c.Length > _sentContent ? c[_sentContent..] : "";
        _sentReasoning = Math.Max(_sentReasoning, r.Length);
        _sentContent = Math.Max(_sentContent, c.Length);
        return (dr, dc);
    }
}

/// <summary>A host lifetime that leaves signals to the command (StopSignals) and prints nothing.</summary>
internal sealed class CommandLifetime : IHostLifetime
{
    public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
