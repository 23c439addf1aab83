using System.Diagnostics;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using R1V2.Native.Cli.Commands;
using R1V2.Native.Cli.Serve;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using Xunit.Abstractions;

namespace R1V2.Native.Tests.Cli;

/// <summary>
/// `engine serve` on the tiny checkpoint, on the loopback address: the official openai npm client (tests/data) drives
/// it through every endpoint, the error cases and a load of 32 concurrent streams; HttpClient checks what a client
/// library hides (status codes, body limits, metrics, blocks freed after cancellations).
/// </summary>
[Collection("cpu")]
public sealed class ServeTests(ITestOutputHelper output) : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-serve-").FullName;
    private CpuBackend _backend = null!;
    private VisionLanguageModel _model = null!;
    private OpenAiServer _server = null!;
    private const string Key = "sk-test";

    private ServeOptions Options => new(Port: 0, ApiKey: Key, MaxBatch: 32, CacheBlocks: 1024, MaxPromptTokens: 200, MaxImageBytes: 20_000, MaxImages: 1,
        AllowImageDir: Path.Combine(_dir, "images"), MaxImagePixels: 5000);

    public async Task InitializeAsync()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"), ckpt, seed: 2);
        Directory.CreateDirectory(Path.Combine(_dir, "images"));
        _backend = new CpuBackend();
        _model = VisionLanguageModel.Load(_backend, ckpt);
        _server = await OpenAiServer.StartAsync(_model, TextTokenizer.Load(ckpt), ckpt, Options);
    }

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        _model.Dispose();
        _backend.Dispose();
        Directory.Delete(_dir, true);
    }

    private HttpClient Client(string? key = Key)
    {
        var c = new HttpClient { BaseAddress = new Uri(_server.Url), Timeout = TimeSpan.FromSeconds(120) };
        if (key is not null) c.DefaultRequestHeaders.Authorization = new("Bearer", key);
        return c;
    }

    private static StringContent Body(string json) => new(json, Encoding.UTF8, "application/json");

    private string Png(string name, int size, int seed, bool solid = false)
    {
        var rng = new Random(seed);
        using var image = new Image<Rgb24>(size, size);
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) image[x, y] = solid ? new Rgb24(200, 10, 10) : new Rgb24((byte)rng.Next(256), (byte)rng.Next(256), (byte)rng.Next(256));
        var path = Path.Combine(_dir, name);
        image.SaveAsPng(path);
        return path;
    }

    private async Task<JsonObject> Metrics()
    {
        using var c = Client();
        return await Metrics(c);
    }

    /// <summary>A server's /metrics as name{labels} -> value.</summary>
    private static async Task<JsonObject> Metrics(HttpClient c)
    {
        var values = new JsonObject();
        foreach (var line in (await c.GetStringAsync("/metrics")).Split('\n'))
            if (line.Length > 0 && line[0] != '#')
            {
                int space = line.LastIndexOf(' ');
                values[line[..space]] = double.Parse(line[(space + 1)..], System.Globalization.CultureInfo.InvariantCulture);
            }
        return values;
    }

    [SkippableFact]
    public async Task TheOpenAiClient_GetsCompletionsStreamsImagesAndErrors_AndALoadOf32StreamsLeaksNothing()
    {
        var node = FindNode();
        Skip.If(node is null && Environment.GetEnvironmentVariable("CI") != "true", "node is not installed (.ci/run installs it)");
        Assert.NotNull(node);
        TestPaths.RequireNpmData(TestPaths.NpmPackage("openai"));
        var script = Path.Combine(TestPaths.RepositoryRoot, "tests", "data", "openai-client.mjs");
        var psi = new ProcessStartInfo(node!, [script, _server.Url + "/v1", Key, Png("small.png", 28, 1), Png("big.png", 200, 2)])
        {
            RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Path.GetDirectoryName(script)!,
        };
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(240)), "the client script did not finish in 240 s");
        Assert.True(p.ExitCode == 0, $"the client script failed ({p.ExitCode}): {await stderr}");
        var o = JsonNode.Parse(await stdout)!.AsObject();
        output.WriteLine(o["load"]!.ToJsonString());

        // A plain completion and the same seed streamed: one text, the usage of 12 generated tokens.
        Assert.Equal("chat.completion", (string)o["plain"]!["object"]!);
        Assert.Equal(12, (int)o["plain"]!["usage"]!["completion_tokens"]!);
        Assert.Equal((int)o["plain"]!["usage"]!["prompt_tokens"]! + 12, (int)o["plain"]!["usage"]!["total_tokens"]!);
        Assert.Equal("length", (string)o["plain"]!["finish"]!);
        Assert.Equal((string)o["plain"]!["text"]!, (string)o["stream"]!["text"]!);
        Assert.Equal("assistant", (string)o["stream"]!["role"]!);
        Assert.Equal("length", (string)o["stream"]!["finish"]!);
        Assert.Equal(12, (int)o["stream"]!["usage"]!["completion_tokens"]!);
        Assert.True((int)o["stream"]!["chunks"]! >= 3);
        // The image adds its <IMG_CONTEXT> tokens (and <img></img>) to the prompt.
        Assert.True((int)o["image"]!["promptTokens"]! > (int)o["image"]!["textOnlyPromptTokens"]!);
        // n = 3: three choices, indices 0..2, 15 tokens in all.
        Assert.Equal([0, 1, 2], o["n3"]!["choices"]!.AsArray().Select(c => (int)c!["index"]!));
        Assert.Equal(15, (int)o["n3"]!["usage"]!["completion_tokens"]!);
        Assert.Equal("text_completion", (string)o["completion"]!["object"]!);
        Assert.Equal(5, (int)o["completion"]!["usage"]!["completion_tokens"]!);

        var e = o["errors"]!;
        void Refused(string name, int status, string? param, string message)
        {
            Assert.True((int?)e[name]!["status"] == status, $"{name}: {e[name]!.ToJsonString()}");
            if (param is not null) Assert.Equal(param, (string?)e[name]!["param"]);
            Assert.Contains(message, (string)e[name]!["message"]!);
        }
        Refused("role", 400, "messages[0].role", "not one of system, developer, user, assistant");
        Refused("temperature", 400, "temperature", "temperature must be in [0, 2]");
        Refused("topP", 400, "top_p", "top_p must be in (0, 1]");
        Refused("n", 400, "n", "n must be in [1, 32]");
        Refused("maxTokens", 400, "max_tokens", "max_tokens must be in [1,");
        Refused("promptTooLong", 400, "messages", "at most 200 (--max-prompt-tokens)");
        Refused("tooManyImages", 400, "messages[0].content[1]", "too many images: at most 1");
        Refused("imageTooBig", 400, "messages[0].content[0].image_url.url", "above the 20000-byte limit");
        Refused("networkImage", 400, "messages[0].content[0].image_url.url", "fetches nothing over the network");
        Refused("unknownModel", 404, "model", "does not exist here");
        Refused("badKey", 401, null, "API key");
        Assert.Equal(400, (int)e["malformed"]!["status"]!);
        Assert.Contains("not valid JSON", (string)e["malformed"]!["body"]!["error"]!["message"]!);

        // The load: every request completed or was cancelled, the seeded ones gave their texts alone, no block leaked.
        var load = o["load"]!;
        Assert.Equal(24, (int)load["completed"]!);
        Assert.Equal(8, (int)load["cancelled"]!);
        Assert.Empty(load["mismatches"]!.AsArray());
        await WaitUntilIdle();
        var m = await Metrics();
        Assert.Equal(0, (double)m["r1v2_kv_blocks_used"]!);
        Assert.Equal(1024, (double)m["r1v2_kv_blocks_free"]!);
        Assert.True((double)m["r1v2_requests_total{endpoint=\"chat\",status=\"400\"}"]! >= 9);
        Assert.True((double)m["r1v2_requests_total{endpoint=\"auth\",status=\"401\"}"]! >= 1);   // refused keys are counted too
    }

    private async Task WaitUntilIdle()
    {
        for (int i = 0; i < 200; i++)
        {
            var m = await Metrics();
            if ((double)m["r1v2_requests_running"]! == 0 && (double)m["r1v2_requests_waiting"]! == 0 && (double)m["r1v2_kv_blocks_used"]! == 0) return;
            await Task.Delay(50);
        }
    }

    private static string? FindNode()
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':'))
            if (dir.Length > 0 && File.Exists(Path.Combine(dir, "node"))) return Path.Combine(dir, "node");
        return null;
    }

    [Fact]
    public async Task HttpChecks_StatusCodes_BodyLimit_UnsupportedFields_AndKeys()
    {
        using var c = Client();
        Assert.Equal("ok", (string)JsonNode.Parse(await c.GetStringAsync("/health"))!["status"]!);
        using (var noKey = Client(key: null))
        {
            var r = await noKey.GetAsync("/v1/models");
            Assert.Equal(HttpStatusCode.Unauthorized, r.StatusCode);
            Assert.Equal("invalid_api_key", (string?)JsonNode.Parse(await r.Content.ReadAsStringAsync())!["error"]!["code"]);
            Assert.Equal(HttpStatusCode.OK, (await noKey.GetAsync("/health")).StatusCode); // health and metrics need no key
            using var lowercase = Client(key: null);
            lowercase.DefaultRequestHeaders.TryAddWithoutValidation("Authorization", "bearer " + Key); // the scheme in any case
            Assert.Equal(HttpStatusCode.OK, (await lowercase.GetAsync("/v1/models")).StatusCode);
        }
        var models = JsonNode.Parse(await c.GetStringAsync("/v1/models"))!["data"]!.AsArray();
        Assert.Equal("tiny", (string)models[0]!["id"]!);

        // A body over the limit (1 image x 20000 bytes as base64 + 4 MiB) is refused from its Content-Length, before it is
        // read (a raw request: a client still uploading when the 413 comes sees a reset instead of the status).
        var uri = new Uri(_server.Url);
        using (var tcp = new System.Net.Sockets.TcpClient(uri.Host, uri.Port))
        {
            var net = tcp.GetStream();
            var head = $"POST /v1/chat/completions HTTP/1.1\r\nHost: {uri.Authority}\r\nAuthorization: Bearer {Key}\r\nContent-Type: application/json\r\nContent-Length: {6 << 20}\r\n\r\n{{\"model\": \"tiny\"";
            await net.WriteAsync(Encoding.ASCII.GetBytes(head));
            var status = await new StreamReader(net).ReadLineAsync();
            Assert.StartsWith("HTTP/1.1 413", status);
        }
        // Local images only under --allow-image-dir; the pixel limit is checked from the header, before decoding.
        async Task<(HttpStatusCode Status, string? Param, string Message)> Image(string url)
        {
            var body = new JsonObject
            {
                ["model"] = "tiny", ["max_tokens"] = 2,
                ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = new JsonArray(
                    new JsonObject { ["type"] = "image_url", ["image_url"] = new JsonObject { ["url"] = url } }) }),
            };
            var r = await c.PostAsync("/v1/chat/completions", Body(body.ToJsonString()));
            var json = JsonNode.Parse(await r.Content.ReadAsStringAsync())!;
            return (r.StatusCode, (string?)json["error"]?["param"], (string?)json["error"]?["message"] ?? "");
        }
        var inside = Png(Path.Combine("images", "digit.png"), 28, 3);
        Assert.Equal(HttpStatusCode.OK, (await Image("file://" + inside)).Status);
        var outside = await Image("file://" + Png("outside.png", 28, 4));
        Assert.Equal((HttpStatusCode.BadRequest, "messages[0].content[0].image_url.url"), (outside.Status, outside.Param));
        Assert.Contains("outside --allow-image-dir", outside.Message);
        var wide = await Image("file://" + Png(Path.Combine("images", "wide.png"), 100, 5, solid: true)); // few bytes, 10000 pixels
        Assert.Equal(HttpStatusCode.BadRequest, wide.Status);
        Assert.Contains("100 x 100 pixels is outside the limit of 5000 pixels", wide.Message);

        // Image markers in text would misplace or fake images: refused by field (they never reach the generation loop).
        var fake = await c.PostAsync("/v1/completions", Body("{\"model\": \"tiny\", \"prompt\": \"a <IMG_CONTEXT> b\", \"max_tokens\": 2}"));
        Assert.Equal(HttpStatusCode.BadRequest, fake.StatusCode);
        Assert.Equal("prompt", (string?)JsonNode.Parse(await fake.Content.ReadAsStringAsync())!["error"]!["param"]);
        var fakeChat = await c.PostAsync("/v1/chat/completions", Body("{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"<image> here\"}]}"));
        Assert.Equal("messages[0].content", (string?)JsonNode.Parse(await fakeChat.Content.ReadAsStringAsync())!["error"]!["param"]);
        // What real clients send: explicit nulls, the developer role, a negative 64-bit seed, a vanishing temperature.
        var lenient = await c.PostAsync("/v1/chat/completions", Body("{\"model\": \"tiny\", \"messages\": [{\"role\": \"developer\", \"content\": \"be brief\"}, "
            + "{\"role\": \"user\", \"content\": \"hi\"}], \"tools\": null, \"logit_bias\": null, \"seed\": -9007199254740993, \"temperature\": 1e-9, \"max_tokens\": 2}"));
        Assert.Equal(HttpStatusCode.OK, lenient.StatusCode);

        // Fields that are not supported are refused by name; their no-op values are accepted.
        var unsupported = await c.PostAsync("/v1/chat/completions", Body("{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"tools\": []}"));
        Assert.Equal(HttpStatusCode.BadRequest, unsupported.StatusCode);
        Assert.Equal("tools", (string?)JsonNode.Parse(await unsupported.Content.ReadAsStringAsync())!["error"]!["param"]);
        var noop = await c.PostAsync("/v1/chat/completions", Body("{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 2, \"presence_penalty\": 0}"));
        Assert.Equal(HttpStatusCode.OK, noop.StatusCode);

    }

    [Fact]
    public async Task AStreamTheClientAbandons_IsCancelled_AndItsBlocksAreFreedAtOnce()
    {
        // The small model (4 layers of 256) decodes slowly enough on a CPU that the client leaves long before the end.
        var ckpt = Path.Combine(_dir, "small");
        InitCommand.Run(Path.Combine(AppContext.BaseDirectory, "configs", "small.json"), ckpt, seed: 3);
        using var backend = new CpuBackend();
        using var model = VisionLanguageModel.Load(backend, ckpt);
        var server = await OpenAiServer.StartAsync(model, TextTokenizer.Load(ckpt), ckpt, Options with { CacheBlocks = 2048 });
        using var c = new HttpClient { BaseAddress = new Uri(server.Url) };
        c.DefaultRequestHeaders.Authorization = new("Bearer", Key);
        Task<JsonObject> Read() => Metrics(c);
        using (var cts = new CancellationTokenSource())
        {
            var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
            {
                Content = Body("{\"model\": \"small\", \"messages\": [{\"role\": \"user\", \"content\": \"go on\"}], \"max_tokens\": 2000, \"n\": 8, \"stream\": true, \"seed\": 1, \"ignore_eos\": true}"),
            };
            using var response = await c.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cts.Token);
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cts.Token));
            for (int lines = 0; lines < 6; lines++) await reader.ReadLineAsync(cts.Token);
            var during = await Read();   // the gauges move after each step: wait for the first decode step's
            for (int i = 0; i < 100 && (double)during["r1v2_requests_running"]! == 0; i++) { await Task.Delay(50); during = await Read(); }
            Assert.True((double)during["r1v2_kv_blocks_used"]! > 0, "the stream holds cache blocks while it runs");
            Assert.Equal(8, (double)during["r1v2_requests_running"]!);
            cts.Cancel();
        }
        JsonObject after = await Read();
        for (int i = 0; i < 200 && ((double)after["r1v2_kv_blocks_used"]! > 0 || (double)after["r1v2_requests_running"]! > 0); i++)
        {
            await Task.Delay(50);
            after = await Read();
        }
        Assert.Equal(0, (double)after["r1v2_kv_blocks_used"]!);
        Assert.Equal(0, (double)after["r1v2_requests_running"]!);
        Assert.True((double)after["r1v2_generation_tokens_total"]! < 8 * 2000, "the cancelled samples stopped early");
        Assert.Equal(1, (double)after["r1v2_requests_total{endpoint=\"chat\",status=\"499\"}"]!);
        await server.DisposeAsync();   // one generation loop at a time on this backend

        // Overload: one sample decodes at a time and one may wait; a third request is turned away with a 503.
        await using (var busy = await OpenAiServer.StartAsync(model, TextTokenizer.Load(ckpt), ckpt, Options with { MaxBatch = 1, MaxWaiting = 1 }))
        {
            using var b = new HttpClient { BaseAddress = new Uri(busy.Url) };
            b.DefaultRequestHeaders.Authorization = new("Bearer", Key);
            const string longOne = "{\"model\": \"small\", \"messages\": [{\"role\": \"user\", \"content\": \"go on\"}], \"max_tokens\": 2000, \"stream\": true, \"ignore_eos\": true}";
            using var first = await b.SendAsync(new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = Body(longOne) }, HttpCompletionOption.ResponseHeadersRead);
            using var second = await b.SendAsync(new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = Body(longOne) }, HttpCompletionOption.ResponseHeadersRead);
            for (int i = 0; i < 100 && busy.Engine.Waiting < 1; i++) await Task.Delay(50);
            Assert.Equal(1, busy.Engine.Waiting);
            var third = await b.PostAsync("/v1/chat/completions", Body("{\"model\": \"small\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 2}"));
            Assert.Equal(HttpStatusCode.ServiceUnavailable, third.StatusCode);
            Assert.Equal("overloaded", (string?)JsonNode.Parse(await third.Content.ReadAsStringAsync())!["error"]!["code"]);
        }
    }

    [Fact]
    public async Task AFailingStep_EndsItsRequestsWithTheError_AndTheLoopStartsOver()
    {
        var ckpt = Path.Combine(_dir, "tiny");
        using var backend = new CpuBackend();
        var model = VisionLanguageModel.Load(backend, ckpt);
        using var engine = new ServeEngine(() => new R1V2.Native.Engine.Generation.GenerationLoop(model, null,
            new R1V2.Native.Engine.Generation.GeneratorOptions(CacheBlocks: 64)));
        model.Dispose();   // every step now fails inside the model
        var events = engine.Submit(new R1V2.Native.Engine.Generation.GenerationRequest([1, 2, 3], MaxNewTokens: 2), CancellationToken.None);
        var e = await Assert.ThrowsAsync<InvalidOperationException>(async () => { await foreach (var _ in events.ReadAllAsync()) { } });
        Assert.Contains("the generation step failed", e.Message);
        Assert.Equal(1, engine.StepFailures);
        Assert.Null(engine.Failure);                       // the loop started over: the server keeps taking requests
        Assert.Equal(0, engine.UsedBlocks);
    }

    [Fact]
    public void BenchServe_ReportsEachConcurrencyLevel_AndWritesItsJson()
    {
        var outDir = Path.Combine(_dir, "bench");
        Assert.Equal(0, R1V2.Native.Cli.Program.Main(["bench", "serve", "--config", Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json"),
            "--concurrency", "1,4", "--requests", "4", "--max-tokens", "3", "--backend", "cpu", "--out", outDir]));
        var json = JsonNode.Parse(File.ReadAllText(Assert.Single(Directory.GetFiles(outDir, "serve-tiny-cpu-*.json"))))!;
        var levels = json["levels"]!.AsArray();
        Assert.Equal([1, 4], levels.Select(l => (int)l!["Concurrency"]!));
        // ignore_eos: every request generates all its tokens, so tokens/s is 3 x requests/s.
        Assert.All(levels, l => Assert.Equal(3 * (double)l!["RequestsPerSecond"]!, (double)l["TokensPerSecond"]!, 6));
    }

    [Fact]
    public void BadServeSettings_AreRefusedNamingTheOption()
    {
        Assert.Contains("--port", Assert.Throws<ArgumentException>(() => ServeCommand.Check(Options with { Port = 70000 })).Message);
        Assert.Contains("--host", Assert.Throws<ArgumentException>(() => ServeCommand.Check(Options with { Host = "not an address" })).Message);
        Assert.Contains("--max-batch", Assert.Throws<ArgumentException>(() => ServeCommand.Check(Options with { MaxBatch = 0 })).Message);
        Assert.Contains("--allow-image-dir", Assert.Throws<ArgumentException>(() => ServeCommand.Check(Options with { AllowImageDir = "/no/such/dir" })).Message);
        Assert.Contains("--max-image-pixels", Assert.Throws<ArgumentException>(() => ServeCommand.Check(Options with { MaxImagePixels = 0 })).Message);
        Assert.Equal(1, R1V2.Native.Cli.Program.Main(["serve", "--model", Path.Combine(_dir, "missing"), "--backend", "cpu", "--port", "0"]));
        // An address this machine does not have is the user's input, not an internal error.
        Assert.Equal(1, R1V2.Native.Cli.Program.Main(["serve", "--model", Path.Combine(_dir, "tiny"), "--backend", "cpu", "--host", "192.0.2.1", "--port", "0"]));
    }
}
