using System.CommandLine;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Cli.Serve;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>
/// `engine bench serve`: requests/s, generated tokens/s and time to first token of `engine serve` against the number of
/// concurrent streaming clients, on the loopback address (the server in this process, the clients over HTTP).
/// </summary>
public static class BenchServe
{
    public static Command Create()
    {
        var model = new Option<string?>("--model") { Description = "Checkpoint directory (default: a random checkpoint of --config)" };
        var config = new Option<string>("--config") { Description = "Model config for a random checkpoint", DefaultValueFactory = _ => Path.Combine("configs", "small.json") };
        var levels = new Option<string>("--concurrency") { Description = "Comma-separated client counts", DefaultValueFactory = _ => "1,8,32" };
        var requests = new Option<int>("--requests") { Description = "Requests per level (at least the client count)", DefaultValueFactory = _ => 64 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "Tokens generated per request (ignore_eos: every request generates them all)", DefaultValueFactory = _ => 64 };
        var backend = Backends.Option();
        var output = new Option<string>("--out") { Description = "Directory for the JSON results", DefaultValueFactory = _ => Path.Combine("perf", "results") };
        var cmd = new Command("serve", "Requests/s and tokens/s of engine serve against the number of concurrent streaming clients")
            { model, config, levels, requests, maxTokens, backend, output };
        cmd.SetAction(r => Run(r.GetValue(model), r.GetValue(config)!, r.GetValue(levels)!, r.GetValue(requests), r.GetValue(maxTokens), r.GetValue(backend)!, r.GetValue(output)!));
        return cmd;
    }

    public sealed record Level(int Concurrency, int Requests, double Seconds, double RequestsPerSecond, double TokensPerSecond, double MeanFirstTokenMs, double MeanRequestMs);

    public static int Run(string? modelDir, string config, string levelsText, int requests, int maxTokens, string backendName, string outDir)
    {
        var levels = levelsText.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(s =>
            int.TryParse(s, out int n) && n > 0 ? n : throw new ArgumentException($"--concurrency: '{s}' is not a positive integer")).ToArray();
        if (maxTokens < 1) throw new ArgumentException($"--max-tokens must be at least 1, got {maxTokens}");
        string? temp = null;
        if (modelDir is null)
        {
            temp = Directory.CreateTempSubdirectory("r1v2-bench-serve-").FullName;
            modelDir = Path.Combine(temp, Path.GetFileNameWithoutExtension(config));
            InitCommand.Run(config, modelDir, seed: 0);
        }
        try
        {
            using var b = Backends.Create(backendName);
            using var vlm = VisionLanguageModel.Load(b, modelDir);
            var server = OpenAiServer.StartAsync(vlm, TextTokenizer.Load(modelDir), modelDir,
                new ServeOptions(Port: 0, MaxBatch: Math.Max(32, levels.Max()), CacheBlocks: 4096)).GetAwaiter().GetResult();
            var results = new List<Level>();
            try
            {
                using var http = new HttpClient { BaseAddress = new Uri(server.Url), Timeout = TimeSpan.FromMinutes(30) };
                string name = Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd(Path.DirectorySeparatorChar));
                Measure(http, name, 1, 1, maxTokens); // warm-up
                foreach (int c in levels) results.Add(Measure(http, name, c, Math.Max(requests, c), maxTokens));
            }
            finally { server.DisposeAsync().AsTask().GetAwaiter().GetResult(); }

            var table = new Table().AddColumns("clients", "requests", "s", "requests/s", "tokens/s", "first token (ms)", "request (ms)");
            foreach (var l in results)
                table.AddRow(l.Concurrency.ToString(), l.Requests.ToString(), l.Seconds.ToString("F2"), l.RequestsPerSecond.ToString("F2"), l.TokensPerSecond.ToString("F1"),
                    l.MeanFirstTokenMs.ToString("F1"), l.MeanRequestMs.ToString("F1"));
            AnsiConsole.MarkupLineInterpolated($"engine serve, {modelDir} on {b.Name}, {maxTokens} tokens a request (streamed, ignore_eos)");
            AnsiConsole.Write(table);
            Directory.CreateDirectory(outDir);
            var path = Path.Combine(outDir, $"serve-{Path.GetFileNameWithoutExtension(config)}-{b.Name}-{DateTime.UtcNow:yyyyMMdd-HHmmss}.json");
            File.WriteAllText(path, JsonSerializer.Serialize(new { model = modelDir, backend = b.Name, max_tokens = maxTokens, machine = Environment.ProcessorCount + " cores", levels = results },
                new JsonSerializerOptions { WriteIndented = true }));
            AnsiConsole.MarkupLineInterpolated($"wrote {path}");
            return 0;
        }
        finally
        {
            if (temp is not null) Directory.Delete(temp, true);
        }
    }

    private static Level Measure(HttpClient http, string model, int concurrency, int requests, int maxTokens)
    {
        int next = 0;
        long tokens = 0;
        var firsts = new List<double>();
        var totals = new List<double>();
        var clock = Stopwatch.StartNew();
        var workers = Enumerable.Range(0, concurrency).Select(_ => Task.Run(async () =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next) - 1) < requests)
            {
                var body = new JsonObject
                {
                    ["model"] = model, ["max_tokens"] = maxTokens, ["seed"] = i, ["temperature"] = 0.8, ["stream"] = true, ["ignore_eos"] = true,
                    ["stream_options"] = new JsonObject { ["include_usage"] = true },
                    ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = $"Request {i}: describe the image." }),
                };
                var start = clock.Elapsed.TotalMilliseconds;
                double? first = null;
                using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
                using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
                response.EnsureSuccessStatusCode();
                using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
                while (await reader.ReadLineAsync() is { } line)
                {
                    if (!line.StartsWith("data: {", StringComparison.Ordinal)) continue;
                    var chunk = JsonNode.Parse(line[6..])!;
                    if (first is null && chunk["choices"]!.AsArray().Any(c => c!["delta"]?["reasoning_content"] is not null || c!["delta"]?["content"] is JsonValue { } v && v.GetValue<string>().Length > 0))
                        first = clock.Elapsed.TotalMilliseconds - start;
                    if (chunk["usage"] is JsonObject u) Interlocked.Add(ref tokens, (long)u["completion_tokens"]!);
                }
                lock (totals)
                {
                    totals.Add(clock.Elapsed.TotalMilliseconds - start);
                    firsts.Add(first ?? double.NaN);
                }
            }
        })).ToArray();
        Task.WaitAll(workers);
        double seconds = clock.Elapsed.TotalSeconds;
        return new Level(concurrency, requests, seconds, requests / seconds, tokens / seconds, firsts.Where(double.IsFinite).DefaultIfEmpty(double.NaN).Average(), totals.Average());
    }
}
