using System.Text.Json;
using System.Text.Json.Nodes;

namespace R1V2.Native.Engine.Models;

public enum VisionNorm { RmsNorm, LayerNorm }

/// <summary>InternViT shape (HF `vision_config`). C = HiddenSize.</summary>
public sealed record VisionConfig(
    int HiddenSize, int NumLayers, int NumHeads, int IntermediateSize, VisionNorm NormType, float NormEps,
    bool QkNormalization, bool QkvBias, int ImageSize, int PatchSize, string HiddenAct, float InitialLayerScale)
{
    public int HeadDim => HiddenSize / NumHeads;
    public int PatchesPerSide => ImageSize / PatchSize;
    public int NumPatches => PatchesPerSide * PatchesPerSide;
}

/// <summary>Qwen2 decoder shape (HF `llm_config`). D = HiddenSize.</summary>
public sealed record LlmConfig(
    int HiddenSize, int IntermediateSize, int NumLayers, int NumHeads, int NumKvHeads, float RopeTheta, float RmsNormEps,
    int VocabSize, bool TieWordEmbeddings, int MaxPositionEmbeddings)
{
    public int HeadDim => HiddenSize / NumHeads;
}

/// <summary>
/// The whole vision-language model's config, read from an InternVL / Skywork-chat `config.json`. A missing or
/// invalid field is an error that names the file and the field.
/// </summary>
public sealed record VlmConfig(
    string ModelType, VisionConfig Vision, LlmConfig Llm, float DownsampleRatio, string PsVersion, int SelectLayer,
    int ForceImageSize, string Template)
{
    /// <summary>Patches per side of a tile (tiles are force_image_size square).</summary>
    public int TilePatchesPerSide => ForceImageSize / Vision.PatchSize;

    /// <summary>Image tokens per tile after pixel shuffle: (force_image_size / patch * ratio)^2.</summary>
    public int TokensPerTile => (int)Math.Round(TilePatchesPerSide * DownsampleRatio) * (int)Math.Round(TilePatchesPerSide * DownsampleRatio);

    public static VlmConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"config not found: {path}", path);
        JsonNode? root;
        try { root = JsonNode.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not valid JSON ({e.Message})", e); }
        if (root is not JsonObject obj) throw new InvalidDataException($"{path}: expected a JSON object at the top level");
        return Parse(obj, path);
    }

    public static VlmConfig Parse(JsonObject root, string source)
    {
        var r = new Fields(root, source, "");
        var v = r.Object("vision_config");
        var l = r.Object("llm_config");
        var normName = v.String("norm_type", "rms_norm");
        var norm = normName switch
        {
            "rms_norm" => VisionNorm.RmsNorm,
            "layer_norm" => VisionNorm.LayerNorm,
            _ => throw v.Invalid("norm_type", $"'{normName}' (expected rms_norm or layer_norm)"),
        };
        var vision = new VisionConfig(
            v.Int("hidden_size"), v.Int("num_hidden_layers"), v.Int("num_attention_heads"), v.Int("intermediate_size"), norm,
            v.Float("layer_norm_eps", 1e-6f), v.Bool("qk_normalization", false), v.Bool("qkv_bias", true), v.Int("image_size"),
            v.Int("patch_size"), v.String("hidden_act", "gelu"), v.Float("initializer_factor", 0.1f));
        // Ranges first: every size positive, every epsilon positive and finite (a zero would divide by zero below).
        foreach (var (key, value) in new[] { ("hidden_size", vision.HiddenSize), ("num_hidden_layers", vision.NumLayers), ("num_attention_heads", vision.NumHeads),
                     ("intermediate_size", vision.IntermediateSize), ("image_size", vision.ImageSize), ("patch_size", vision.PatchSize) })
            if (value <= 0) throw v.Invalid(key, $"{value} (must be a positive integer)");
        if (!(vision.NormEps > 0 && float.IsFinite(vision.NormEps))) throw v.Invalid("layer_norm_eps", $"{vision.NormEps} (must be a positive finite number)");
        if (vision.HiddenSize % vision.NumHeads != 0) throw v.Invalid("num_attention_heads", $"{vision.NumHeads} does not divide hidden_size {vision.HiddenSize}");
        if (vision.ImageSize % vision.PatchSize != 0) throw v.Invalid("patch_size", $"{vision.PatchSize} does not divide image_size {vision.ImageSize}");
        if (vision.HiddenAct != "gelu") throw v.Invalid("hidden_act", $"'{vision.HiddenAct}' (only gelu, the exact erf form, is supported)");

        var llm = new LlmConfig(
            l.Int("hidden_size"), l.Int("intermediate_size"), l.Int("num_hidden_layers"), l.Int("num_attention_heads"),
            l.Int("num_key_value_heads"), l.Float("rope_theta", 10000f), l.Float("rms_norm_eps", 1e-6f), l.Int("vocab_size"),
            l.Bool("tie_word_embeddings", false), l.Int("max_position_embeddings", 32768));
        foreach (var (key, value) in new[] { ("hidden_size", llm.HiddenSize), ("intermediate_size", llm.IntermediateSize), ("num_hidden_layers", llm.NumLayers),
                     ("num_attention_heads", llm.NumHeads), ("num_key_value_heads", llm.NumKvHeads), ("vocab_size", llm.VocabSize), ("max_position_embeddings", llm.MaxPositionEmbeddings) })
            if (value <= 0) throw l.Invalid(key, $"{value} (must be a positive integer)");
        if (!(llm.RmsNormEps > 0 && float.IsFinite(llm.RmsNormEps))) throw l.Invalid("rms_norm_eps", $"{llm.RmsNormEps} (must be a positive finite number)");
        if (!(llm.RopeTheta > 1 && float.IsFinite(llm.RopeTheta))) throw l.Invalid("rope_theta", $"{llm.RopeTheta} (must be a finite number > 1)");
        if (llm.HiddenSize % llm.NumHeads != 0) throw l.Invalid("num_attention_heads", $"{llm.NumHeads} does not divide hidden_size {llm.HiddenSize}");
        if (llm.NumHeads % llm.NumKvHeads != 0) throw l.Invalid("num_key_value_heads", $"{llm.NumKvHeads} does not divide num_attention_heads {llm.NumHeads}");
        if (llm.HeadDim % 2 != 0) throw l.Invalid("hidden_size", $"head dim {llm.HeadDim} must be even for RoPE");

        var ratio = r.Float("downsample_ratio", 0.5f);
        int force = r.Int("force_image_size", vision.ImageSize);
        if (force <= 0 || force % vision.PatchSize != 0) throw r.Invalid("force_image_size", $"{force} is not a positive multiple of patch_size {vision.PatchSize}");
        var side = force / vision.PatchSize * ratio;
        if (Math.Abs(side - Math.Round(side)) > 1e-6 || ratio <= 0 || ratio > 1) throw r.Invalid("downsample_ratio", $"{ratio} does not divide {force / vision.PatchSize} patches per side evenly");
        if (Math.Abs(1 / ratio - Math.Round(1 / ratio)) > 1e-6) throw r.Invalid("downsample_ratio", $"{ratio} is not 1/k");
        var ps = r.String("ps_version", "v2");
        if (ps is not ("v1" or "v2")) throw r.Invalid("ps_version", $"'{ps}' (expected v1 or v2)");
        int select = r.Int("select_layer", -1);
        if (select != -1 && (select < -vision.NumLayers || select >= vision.NumLayers)) throw r.Invalid("select_layer", $"{select} is outside the {vision.NumLayers} ViT layers");
        return new VlmConfig(r.String("model_type", "internvl_chat"), vision, llm, ratio, ps, select, force, r.String("template", "internvl2_5"));
    }

    /// <summary>Writes the config in the HF layout (the inverse of <see cref="Parse"/>).</summary>
    public JsonObject ToJson() => new()
    {
        ["architectures"] = new JsonArray("InternVLChatModel"),
        ["model_type"] = ModelType,
        ["downsample_ratio"] = DownsampleRatio,
        ["ps_version"] = PsVersion,
        ["select_layer"] = SelectLayer,
        ["force_image_size"] = ForceImageSize,
        ["template"] = Template,
        ["vision_config"] = new JsonObject
        {
            ["architectures"] = new JsonArray("InternVisionModel"),
            ["hidden_size"] = Vision.HiddenSize,
            ["num_hidden_layers"] = Vision.NumLayers,
            ["num_attention_heads"] = Vision.NumHeads,
            ["intermediate_size"] = Vision.IntermediateSize,
            ["norm_type"] = Vision.NormType == VisionNorm.RmsNorm ? "rms_norm" : "layer_norm",
            ["layer_norm_eps"] = Vision.NormEps,
            ["qk_normalization"] = Vision.QkNormalization,
            ["qkv_bias"] = Vision.QkvBias,
            ["image_size"] = Vision.ImageSize,
            ["patch_size"] = Vision.PatchSize,
            ["hidden_act"] = Vision.HiddenAct,
            ["initializer_factor"] = Vision.InitialLayerScale,
        },
        ["llm_config"] = new JsonObject
        {
            ["architectures"] = new JsonArray("Qwen2ForCausalLM"),
            ["model_type"] = "qwen2",
            ["hidden_size"] = Llm.HiddenSize,
            ["intermediate_size"] = Llm.IntermediateSize,
            ["num_hidden_layers"] = Llm.NumLayers,
            ["num_attention_heads"] = Llm.NumHeads,
            ["num_key_value_heads"] = Llm.NumKvHeads,
            ["rope_theta"] = Llm.RopeTheta,
            ["rms_norm_eps"] = Llm.RmsNormEps,
            ["vocab_size"] = Llm.VocabSize,
            ["tie_word_embeddings"] = Llm.TieWordEmbeddings,
            ["max_position_embeddings"] = Llm.MaxPositionEmbeddings,
        },
    };

    /// <summary>Typed field access with errors naming the file and the dotted field path.</summary>
    private sealed class Fields(JsonObject obj, string source, string prefix)
    {
        public Exception Invalid(string name, string what) => new InvalidDataException($"{source}: field '{prefix}{name}' is invalid: {what}");
        private Exception Missing(string name) => new InvalidDataException($"{source}: required field '{prefix}{name}' is missing");

        private JsonNode? Node(string name) => obj.TryGetPropertyValue(name, out var n) ? n : null;

        public Fields Object(string name) =>
            Node(name) switch
            {
                JsonObject o => new Fields(o, source, prefix + name + "."),
                null => throw Missing(name),
                _ => throw Invalid(name, "expected an object"),
            };

        public int Int(string name, int? fallback = null)
        {
            var n = Node(name);
            if (n is null) return fallback ?? throw Missing(name);
            if (n is JsonValue v && v.TryGetValue<long>(out var l) && l is >= int.MinValue and <= int.MaxValue) return (int)l;
            if (n is JsonValue d && d.TryGetValue<double>(out var x) && x == Math.Floor(x) && Math.Abs(x) < int.MaxValue) return (int)x;
            throw Invalid(name, $"{n.ToJsonString()} (expected an integer)");
        }

        public float Float(string name, float? fallback = null)
        {
            var n = Node(name);
            if (n is null) return fallback ?? throw Missing(name);
            if (n is JsonValue v && v.TryGetValue<double>(out var x) && double.IsFinite(x)) return (float)x;
            throw Invalid(name, $"{n.ToJsonString()} (expected a number)");
        }

        public bool Bool(string name, bool? fallback = null)
        {
            var n = Node(name);
            if (n is null) return fallback ?? throw Missing(name);
            if (n is JsonValue v && v.TryGetValue<bool>(out var b)) return b;
            throw Invalid(name, $"{n.ToJsonString()} (expected true or false)");
        }

        public string String(string name, string? fallback = null)
        {
            var n = Node(name);
            if (n is null) return fallback ?? throw Missing(name);
            if (n is JsonValue v && v.TryGetValue<string>(out var s)) return s;
            throw Invalid(name, $"{n.ToJsonString()} (expected a string)");
        }
    }
}
