using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Images;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Cli.Serve;

/// <summary>A request the server refuses: the HTTP status and an OpenAI-style error naming the field (param).</summary>
public sealed class ApiException(int status, string message, string? param = null, string type = "invalid_request_error", string? code = null)
    : Exception(message)
{
    public int Status { get; } = status;
    public string? Param { get; } = param;
    public string Type { get; } = type;
    public string? Code { get; } = code;

    public JsonObject Body() => new()
    {
        ["error"] = new JsonObject { ["message"] = Message, ["type"] = Type, ["param"] = Param, ["code"] = Code },
    };

    public static ApiException Invalid(string param, string message) => new(400, message, param);
}

/// <summary>Limits of `engine serve` on what a request may ask for.</summary>
/// <param name="MaxNewTokensDefault">max_tokens when a request gives none (null: the room the context leaves, as vLLM does).</param>
public sealed record ServeLimits(int MaxPromptTokens, int MaxImages, long MaxImageBytes, long MaxImagePixels, int MaxSamples, int? MaxNewTokensDefault,
    string? AllowImageDir);

/// <summary>The sampling fields common to /v1/chat/completions and /v1/completions, validated.</summary>
/// <summary>The sampling fields; IgnoreEos (vLLM's extension) keeps generating through end-of-turn tokens up to MaxTokens.</summary>
public sealed record SamplingRequest(SamplingParams Sampling, int MaxTokens, int N, ulong Seed, string[] Stop, bool Stream, bool IncludeUsage, bool IgnoreEos = false);

/// <summary>A parsed chat request: the prompt ids, pixels, tiles, and the sampling fields.</summary>
public sealed record ChatRequest(string Model, int[] PromptIds, float[]? Pixels, int Tiles, SamplingRequest Sampling);

/// <summary>A parsed completion request.</summary>
public sealed record CompletionRequest(string Model, int[] PromptIds, SamplingRequest Sampling);

/// <summary>
/// Parsing and validation of the OpenAI request bodies: every refusal names its field, nothing reaches the model
/// before the whole request is known to be valid. Fields a client may send that the engine does not implement are
/// accepted only at their no-op values; any other field is refused by name.
/// </summary>
public static class OpenAiRequests
{
    private static readonly HashSet<string> ChatFields = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed",
        "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs", "ignore_eos"];

    private static readonly HashSet<string> CompletionFields = ["model", "prompt", "temperature", "top_p", "max_tokens", "stop", "n", "seed", "stream",
        "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs", "echo", "ignore_eos"];

    public static JsonObject ParseBody(string body)
    {
        JsonNode? node;
        try { node = JsonNode.Parse(body); }
        catch (JsonException e) { throw new ApiException(400, $"the request body is not valid JSON: {e.Message}"); }
        return node as JsonObject ?? throw new ApiException(400, "the request body must be a JSON object");
    }

    public static ChatRequest Chat(JsonObject o, IReadOnlyCollection<string> models, TextTokenizer tokenizer, ChatTemplate template, ImagePreprocessor images,
        ServeLimits limits, int maxPositions, Func<string, byte[]>? readFile = null)
    {
        CheckFields(o, ChatFields);
        var model = Model(o, models);
        if (o["messages"] is not JsonArray messages || messages.Count == 0) throw ApiException.Invalid("messages", "messages must be a non-empty array");
        var rendered = new List<ChatMessage>();
        var pixels = new List<float>();
        int tiles = 0, imageCount = 0;
        for (int i = 0; i < messages.Count; i++)
        {
            string at = $"messages[{i}]";
            if (messages[i] is not JsonObject m) throw ApiException.Invalid(at, $"{at} must be an object");
            var role = String(m, "role", at) ?? throw ApiException.Invalid($"{at}.role", $"{at}.role is required");
            if (role == "developer") role = "system"; // the newer name of the system turn
            if (role is not ("system" or "user" or "assistant"))
                throw ApiException.Invalid($"{at}.role", $"{at}.role '{role}' is not one of system, developer, user, assistant");
            var content = new System.Text.StringBuilder();
            var counts = new List<int>();
            switch (m["content"])
            {
                case JsonValue v when v.TryGetValue<string>(out var text):
                    content.Append(Text(text, $"{at}.content"));
                    break;
                case JsonArray parts:
                    for (int k = 0; k < parts.Count; k++)
                    {
                        string pat = $"{at}.content[{k}]";
                        if (parts[k] is not JsonObject part) throw ApiException.Invalid(pat, $"{pat} must be an object");
                        var type = String(part, "type", pat);
                        if (type == "text") content.Append(Text(String(part, "text", pat) ?? throw ApiException.Invalid($"{pat}.text", $"{pat}.text is required"), $"{pat}.text"));
                        else if (type == "image_url")
                        {
                            if (role != "user") throw ApiException.Invalid(pat, $"{pat}: images are taken in user messages only");
                            if (++imageCount > limits.MaxImages) throw ApiException.Invalid(pat, $"too many images: at most {limits.MaxImages} a request");
                            var url = part["image_url"] is JsonObject iu ? String(iu, "url", $"{pat}.image_url") : String(part, "image_url", pat);
                            if (url is null) throw ApiException.Invalid($"{pat}.image_url.url", $"{pat}.image_url.url is required");
                            var (p, n) = Image(url, $"{pat}.image_url.url", images, limits, readFile);
                            pixels.AddRange(p);
                            tiles += n;
                            counts.Add(n);
                            content.Append(ChatTemplate.ImagePlaceholder).Append('\n');
                        }
                        else throw ApiException.Invalid($"{pat}.type", $"{pat}.type '{type}' is not text or image_url");
                    }
                    break;
                case null:
                    if (role != "assistant") throw ApiException.Invalid($"{at}.content", $"{at}.content is required");
                    break;
                default:
                    throw ApiException.Invalid($"{at}.content", $"{at}.content must be a string or an array of content parts");
            }
            rendered.Add(new ChatMessage(role, content.ToString(), counts));
        }
        CheckLength(rendered.Sum(r => (long)r.Content.Length), limits, "messages");
        string prompt;
        try { prompt = template.Render(rendered); }
        catch (ArgumentException e) { throw ApiException.Invalid("messages", e.Message); }
        var ids = tokenizer.Encode(prompt);
        CheckPrompt(ids.Length, limits, "messages");
        var sampling = Sampling(o, limits, maxPositions - ids.Length, "max_completion_tokens", "max_tokens");
        return new ChatRequest(model, ids, tiles > 0 ? [.. pixels] : null, tiles, sampling);
    }

    public static CompletionRequest Completion(JsonObject o, IReadOnlyCollection<string> models, TextTokenizer tokenizer, ServeLimits limits, int maxPositions)
    {
        CheckFields(o, CompletionFields);
        var model = Model(o, models);
        if (o["echo"] is JsonValue echo && echo.TryGetValue<bool>(out bool e) && e) throw ApiException.Invalid("echo", "echo is not supported");
        string text = o["prompt"] switch
        {
            JsonValue v when v.TryGetValue<string>(out var s) && s.Length > (long)limits.MaxPromptTokens * 64 =>
                throw ApiException.Invalid("prompt", $"the prompt is {s.Length} characters, far over --max-prompt-tokens {limits.MaxPromptTokens}"),
            JsonValue v when v.TryGetValue<string>(out var s) => s,
            JsonArray { Count: 1 } a when a[0] is JsonValue v1 && v1.TryGetValue<string>(out var s1) => s1,
            JsonArray => throw ApiException.Invalid("prompt", "prompt must be one string (a batch of prompts is several requests)"),
            null => throw ApiException.Invalid("prompt", "prompt is required"),
            _ => throw ApiException.Invalid("prompt", "prompt must be a string"),
        };
        if (text.Contains(R1V2.Native.Engine.Models.TokenizerFiles.ImageContext, StringComparison.Ordinal))
            throw ApiException.Invalid("prompt", $"prompt must not contain {R1V2.Native.Engine.Models.TokenizerFiles.ImageContext} (the image placeholder token; /v1/completions takes text only)");
        var ids = tokenizer.Encode(text);
        if (ids.Length == 0) throw ApiException.Invalid("prompt", "prompt must not be empty");
        CheckPrompt(ids.Length, limits, "prompt");
        var sampling = Sampling(o, limits, maxPositions - ids.Length, "max_tokens");
        return new CompletionRequest(model, ids, sampling);
    }

    private static void CheckPrompt(int tokens, ServeLimits limits, string param)
    {
        if (tokens > limits.MaxPromptTokens)
            throw ApiException.Invalid(param, $"the prompt is {tokens} tokens; this server takes at most {limits.MaxPromptTokens} (--max-prompt-tokens)");
    }

    /// <summary>Message text, refused where it holds the markers the template places images with (they would misplace or fake images).</summary>
    private static string Text(string text, string param)
    {
        foreach (var marker in new[] { ChatTemplate.ImagePlaceholder, "<img>", "</img>", R1V2.Native.Engine.Models.TokenizerFiles.ImageContext })
            if (text.Contains(marker, StringComparison.Ordinal))
                throw ApiException.Invalid(param, $"{param} must not contain {marker} (images go in image_url content parts)");
        return text;
    }

    private static void CheckLength(long characters, ServeLimits limits, string param)
    {
        // A token is rarely over a few characters: text this long cannot be a prompt the server takes; refuse it before tokenizing.
        if (characters > (long)limits.MaxPromptTokens * 64)
            throw ApiException.Invalid(param, $"the request's text is {characters} characters, far over --max-prompt-tokens {limits.MaxPromptTokens}");
    }

    private static void CheckFields(JsonObject o, HashSet<string> known)
    {
        foreach (var (name, value) in o)
        {
            if (value is null) continue; // a client's explicit null is the field left out
            if (!known.Contains(name)) throw ApiException.Invalid(name, $"unsupported parameter '{name}'");
            bool noop = name switch
            {
                "frequency_penalty" or "presence_penalty" => value is null || (value is JsonValue v && v.TryGetValue<double>(out var d) && d == 0),
                "logprobs" => value is null || (value is JsonValue b && b.TryGetValue<bool>(out var f) && !f),
                _ => true,
            };
            if (!noop) throw ApiException.Invalid(name, $"{name} is not supported (only its default is accepted)");
        }
    }

    private static string Model(JsonObject o, IReadOnlyCollection<string> models)
    {
        var model = String(o, "model", "") ?? throw ApiException.Invalid("model", "model is required");
        if (!models.Contains(model))
            throw new ApiException(404, $"the model '{model}' does not exist here; this server serves {string.Join(", ", models)}", "model", "invalid_request_error", "model_not_found");
        return model;
    }

    private static string? String(JsonObject o, string field, string at)
    {
        var node = o[field];
        if (node is null) return null;
        if (node is JsonValue v && v.TryGetValue<string>(out var s)) return s;
        string name = at.Length == 0 ? field : $"{at}.{field}";
        throw ApiException.Invalid(name, $"{name} must be a string");
    }

    private static double? Number(JsonObject o, string field)
    {
        var node = o[field];
        if (node is null) return null;
        if (node is JsonValue v && v.TryGetValue<double>(out var d) && double.IsFinite(d)) return d;
        throw ApiException.Invalid(field, $"{field} must be a number");
    }

    private static long? Integer(JsonObject o, string field)
    {
        var n = Number(o, field);
        if (n is null) return null;
        if (n != Math.Floor(n.Value) || Math.Abs(n.Value) > 9e15) throw ApiException.Invalid(field, $"{field} must be an integer");
        return (long)n.Value;
    }

    private static SamplingRequest Sampling(JsonObject o, ServeLimits limits, int room, params string[] maxFields)
    {
        double temperature = Number(o, "temperature") ?? 1.0;
        if (temperature is < 0 or > 2) throw ApiException.Invalid("temperature", $"temperature must be in [0, 2], got {temperature}");
        if (temperature < 1e-5) temperature = 0; // 1 / T would overflow fp32: a temperature this small is greedy
        double topP = Number(o, "top_p") ?? 1.0;
        if (!(topP > 0 && topP <= 1)) throw ApiException.Invalid("top_p", $"top_p must be in (0, 1], got {topP}");
        long n = Integer(o, "n") ?? 1;
        if (n < 1 || n > limits.MaxSamples) throw ApiException.Invalid("n", $"n must be in [1, {limits.MaxSamples}], got {n}");
        if (room < 1) throw ApiException.Invalid(maxFields[^1], "the prompt leaves no room for a completion within max_position_embeddings");
        long? max = null;
        string? maxField = null;
        foreach (var f in maxFields)
            if (Integer(o, f) is long m) { max = m; maxField = f; break; }
        if (max is not null && (max < 1 || max > room))
            throw ApiException.Invalid(maxField!, $"{maxField} must be in [1, {room}] (max_position_embeddings less the prompt), got {max}");
        long seed = o["seed"] switch
        {
            null => Random.Shared.NextInt64(),
            JsonValue sv when sv.TryGetValue<long>(out var exact) => exact, // any 64-bit integer, negative included
            _ => Integer(o, "seed") ?? 0,
        };
        var stop = o["stop"] switch
        {
            null => [],
            JsonValue v when v.TryGetValue<string>(out var s) => new[] { s },
            JsonArray a when a.Count <= 4 && a.All(x => x is JsonValue xv && xv.TryGetValue<string>(out _)) => a.Select(x => x!.GetValue<string>()).ToArray(),
            _ => throw ApiException.Invalid("stop", "stop must be a string or an array of at most 4 strings"),
        };
        if (stop.Any(s => s.Length == 0 || s.Length > 1024)) throw ApiException.Invalid("stop", "stop strings must be 1 to 1024 characters");
        bool stream = o["stream"] switch
        {
            null => false,
            JsonValue v when v.TryGetValue<bool>(out var b) => b,
            _ => throw ApiException.Invalid("stream", "stream must be true or false"),
        };
        bool usage = false;
        if (o["stream_options"] is JsonObject so && so["include_usage"] is JsonValue iu)
        {
            if (!iu.TryGetValue<bool>(out usage)) throw ApiException.Invalid("stream_options.include_usage", "stream_options.include_usage must be true or false");
        }
        else if (o["stream_options"] is not null and not JsonObject) throw ApiException.Invalid("stream_options", "stream_options must be an object");
        bool ignoreEos = o["ignore_eos"] switch
        {
            null => false,
            JsonValue v when v.TryGetValue<bool>(out var b) => b,
            _ => throw ApiException.Invalid("ignore_eos", "ignore_eos must be true or false"),
        };
        var sampling = new SamplingParams((float)temperature, TopP: (float)topP);
        return new SamplingRequest(sampling, (int)(max ?? Math.Min(limits.MaxNewTokensDefault ?? room, room)), (int)n, unchecked((ulong)seed), stop, stream, usage, ignoreEos);
    }

    private static byte[] ReadBounded(string path)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16, FileOptions.SequentialScan);
        var bytes = new byte[f.Length];
        f.ReadExactly(bytes);
        return bytes;
    }

    /// <summary>An image from a data URL (base64), or a local file under --allow-image-dir; never a network fetch.</summary>
    private static (float[] Pixels, int Tiles) Image(string url, string param, ImagePreprocessor images, ServeLimits limits, Func<string, byte[]>? readFile)
    {
        byte[] bytes;
        if (url.StartsWith("data:", StringComparison.OrdinalIgnoreCase))
        {
            int comma = url.IndexOf(',');
            if (comma < 0 || !url[..comma].EndsWith(";base64", StringComparison.OrdinalIgnoreCase) || !url[5..comma].StartsWith("image/", StringComparison.OrdinalIgnoreCase))
                throw ApiException.Invalid(param, $"{param}: a data URL must be data:image/...;base64,...");
            long approx = (url.Length - comma - 1) * 3L / 4;
            if (approx > limits.MaxImageBytes) throw ApiException.Invalid(param, $"{param}: the image is about {approx} bytes, above the {limits.MaxImageBytes}-byte limit (--max-image-bytes)");
            try { bytes = Convert.FromBase64String(url[(comma + 1)..]); }
            catch (FormatException) { throw ApiException.Invalid(param, $"{param}: the data URL is not valid base64"); }
        }
        else if (url.StartsWith("file://", StringComparison.OrdinalIgnoreCase) || url.StartsWith('/'))
        {
            if (limits.AllowImageDir is null) throw ApiException.Invalid(param, $"{param}: local images are off (start the server with --allow-image-dir DIR)");
            var local = url;
            if (local.StartsWith("file://localhost/", StringComparison.OrdinalIgnoreCase)) local = local["file://localhost".Length..];
            else if (local.StartsWith("file://", StringComparison.OrdinalIgnoreCase)) local = local["file://".Length..];
            if (!local.StartsWith('/')) throw ApiException.Invalid(param, $"{param}: a file URL must hold an absolute path");
            var root = Path.GetFullPath(limits.AllowImageDir).TrimEnd(Path.DirectorySeparatorChar) + Path.DirectorySeparatorChar;
            var path = Path.GetFullPath(Uri.UnescapeDataString(local));
            // The file itself, after every link, must lie under the directory and be a regular file with bytes in it
            // (a FIFO or a device reports no length: refused before it is opened).
            var info = new FileInfo(path);
            var target = info.Exists ? info.ResolveLinkTarget(returnFinalTarget: true) as FileInfo ?? info : info;
            if (!path.StartsWith(root, StringComparison.Ordinal) || !Path.GetFullPath(target.FullName).StartsWith(root, StringComparison.Ordinal))
                throw ApiException.Invalid(param, $"{param}: the file is outside --allow-image-dir");
            if (!target.Exists) throw ApiException.Invalid(param, $"{param}: no such file under --allow-image-dir");
            if (target.Length == 0) throw ApiException.Invalid(param, $"{param}: not a regular file with an image in it");
            if (target.Length > limits.MaxImageBytes) throw ApiException.Invalid(param, $"{param}: the file is {target.Length} bytes, above the {limits.MaxImageBytes}-byte limit (--max-image-bytes)");
            bytes = (readFile ?? ReadBounded)(target.FullName);
        }
        else throw ApiException.Invalid(param, $"{param}: only data:image/...;base64 URLs (and files under --allow-image-dir) are taken; the server fetches nothing over the network");
        if (bytes.Length > limits.MaxImageBytes) throw ApiException.Invalid(param, $"{param}: the image is {bytes.Length} bytes, above the {limits.MaxImageBytes}-byte limit (--max-image-bytes)");
        try { return images.Load(bytes, param, limits.MaxImagePixels); }
        catch (InvalidDataException e) { throw ApiException.Invalid(param, e.Message); }
    }
}
