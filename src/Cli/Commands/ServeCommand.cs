using System.CommandLine;
using R1V2.Native.Cli.Serve;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine serve`: an OpenAI-compatible HTTP server for a checkpoint, with continuous batching across requests.</summary>
public static class ServeCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Checkpoint directory", Required = true };
        var host = new Option<string>("--host") { Description = "Address to listen on", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "Port (0: any free port)", DefaultValueFactory = _ => 8000 };
        var apiKey = new Option<string?>("--api-key") { Description = "Require Authorization: Bearer KEY on /v1 (default: R1V2_API_KEY, else none)" };
        var maxBatch = new Option<int>("--max-batch") { Description = "Samples decoding at once (continuous batching); also the largest n", DefaultValueFactory = _ => 32 };
        var blocks = new Option<int>("--cache-blocks") { Description = "KV cache blocks of 16 tokens", DefaultValueFactory = _ => 2048 };
        var maxPrompt = new Option<int?>("--max-prompt-tokens") { Description = "Longest prompt accepted (default: max_position_embeddings - 1)" };
        var maxImageBytes = new Option<long>("--max-image-bytes") { Description = "Largest image accepted, in bytes", DefaultValueFactory = _ => 16L << 20 };
        var maxPixels = new Option<long>("--max-image-pixels") { Description = "Largest image accepted, in width x height", DefaultValueFactory = _ => 32L << 20 };
        var maxWaiting = new Option<int>("--max-waiting") { Description = "Samples that may wait for admission; beyond them a request gets 503", DefaultValueFactory = _ => 1024 };
        var maxImages = new Option<int>("--max-images") { Description = "Images a request may carry", DefaultValueFactory = _ => 4 };
        var allowImageDir = new Option<string?>("--allow-image-dir") { Description = "Allow images given as local paths (file://) under this directory; off by default" };
        var name = new Option<string?>("--served-model-name") { Description = "The model id clients use (default: the checkpoint directory's name)" };
        var defaultMax = new Option<int?>("--default-max-tokens") { Description = "max_tokens of a request that gives none (default: what the context leaves after the prompt)" };
        var quiet = new Option<bool>("--quiet") { Description = "No access log (by default one line per request on stdout: time, client, method, path, status, seconds)" };
        var backend = Backends.Option();
        var cmd = new Command("serve", "Serve a checkpoint over an OpenAI-compatible HTTP API (chat and text completions, streaming, metrics)")
        {
            model, host, port, apiKey, maxBatch, blocks, maxPrompt, maxImageBytes, maxPixels, maxImages, allowImageDir, name, defaultMax, maxWaiting, quiet, backend,
        };
        cmd.SetAction(r =>
        {
            var o = new ServeOptions(r.GetValue(host)!, r.GetValue(port), r.GetValue(apiKey) ?? NullIfEmpty(Environment.GetEnvironmentVariable("R1V2_API_KEY")),
                r.GetValue(maxBatch), r.GetValue(blocks), 16, r.GetValue(maxPrompt), r.GetValue(maxImageBytes), r.GetValue(maxImages), r.GetValue(allowImageDir),
                r.GetValue(name), r.GetValue(defaultMax), MaxImagePixels: r.GetValue(maxPixels), AccessLog: r.GetValue(quiet) ? null : Console.Out, MaxWaiting: r.GetValue(maxWaiting));
            Check(o);
            if (Engine.Backends.Launch.Current.WorldSize > 1)
                throw new ArgumentException($"engine serve runs in one process; this launch has {Engine.Backends.Launch.Current.WorldSize} ranks (start it without mpirun/srun)");
            var dir = r.GetValue(model)!;
            using var b = Backends.Create(r.GetValue(backend)!);
            using var vlm = VisionLanguageModel.Load(b, dir);
            var tokenizer = TextTokenizer.Load(dir);
            using var signals = new StopSignals("stopping the server: requests in flight are cancelled");
            OpenAiServer server;
            try { server = OpenAiServer.StartAsync(vlm, tokenizer, dir, o).GetAwaiter().GetResult(); }
            catch (Exception e) when (e is System.Net.Sockets.SocketException or IOException)
            {
                throw new ArgumentException($"--host {o.Host} --port {o.Port}: cannot listen there ({e.Message})", e);
            }
            try
            {
                AnsiConsole.MarkupLineInterpolated($"serving {dir} on {b.Name} at {server.Url}/v1 (Ctrl-C stops){(o.ApiKey is null ? "" : "; API key required")}");
                try { server.WaitForShutdownAsync(signals.Token).GetAwaiter().GetResult(); }
                catch (OperationCanceledException) { }
            }
            finally { server.DisposeAsync().AsTask().GetAwaiter().GetResult(); }
            AnsiConsole.MarkupLine("server stopped");
            return 0;
        });
        return cmd;
    }

    private static string? NullIfEmpty(string? s) => string.IsNullOrEmpty(s) ? null : s;

    /// <summary>Refuses settings that cannot serve anything, naming the option.</summary>
    public static void Check(ServeOptions o)
    {
        if (o.Port is < 0 or > 65535) throw new ArgumentException($"--port must be in [0, 65535], got {o.Port}");
        if (!System.Net.IPAddress.TryParse(o.Host == "localhost" ? "127.0.0.1" : o.Host, out _)) throw new ArgumentException($"--host must be an IP address (or localhost), got '{o.Host}'");
        if (o.MaxBatch < 1) throw new ArgumentException($"--max-batch must be at least 1, got {o.MaxBatch}");
        if (o.CacheBlocks < 2) throw new ArgumentException($"--cache-blocks must be at least 2, got {o.CacheBlocks}");
        if (o.MaxPromptTokens is < 1) throw new ArgumentException($"--max-prompt-tokens must be at least 1, got {o.MaxPromptTokens}");
        if (o.MaxImageBytes < 1) throw new ArgumentException($"--max-image-bytes must be at least 1, got {o.MaxImageBytes}");
        if (o.MaxNewTokensDefault is < 1) throw new ArgumentException($"--default-max-tokens must be at least 1, got {o.MaxNewTokensDefault}");
        if (o.MaxImagePixels < 1) throw new ArgumentException($"--max-image-pixels must be at least 1, got {o.MaxImagePixels}");
        if (o.MaxWaiting < 1) throw new ArgumentException($"--max-waiting must be at least 1, got {o.MaxWaiting}");
        if (o.MaxImages < 0) throw new ArgumentException($"--max-images must be >= 0, got {o.MaxImages}");
        if (o.AllowImageDir is not null && !Directory.Exists(o.AllowImageDir)) throw new ArgumentException($"--allow-image-dir: {o.AllowImageDir} is not a directory");
        if (o.ApiKey is { Length: 0 }) throw new ArgumentException("--api-key must not be empty");
    }
}
