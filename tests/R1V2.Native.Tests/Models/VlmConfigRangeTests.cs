using System.Text.Json.Nodes;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>config.json: every size and epsilon out of its range once, each an error naming the field (a zero patch size once divided by zero).</summary>
public sealed class VlmConfigRangeTests
{
    [Theory]
    [InlineData("vision_config.hidden_size", 0)]
    [InlineData("vision_config.num_hidden_layers", -1)]
    [InlineData("vision_config.num_attention_heads", 0)]
    [InlineData("vision_config.intermediate_size", 0)]
    [InlineData("vision_config.image_size", -28)]
    [InlineData("vision_config.patch_size", 0)]
    [InlineData("vision_config.layer_norm_eps", -1)]
    [InlineData("vision_config.layer_norm_eps", 0)]
    [InlineData("llm_config.hidden_size", 0)]
    [InlineData("llm_config.intermediate_size", 0)]
    [InlineData("llm_config.num_hidden_layers", 0)]
    [InlineData("llm_config.num_attention_heads", -4)]
    [InlineData("llm_config.num_key_value_heads", 0)]
    [InlineData("llm_config.vocab_size", -5)]
    [InlineData("llm_config.max_position_embeddings", 0)]
    [InlineData("llm_config.rms_norm_eps", 0)]
    [InlineData("llm_config.rope_theta", -1)]
    [InlineData("llm_config.rope_theta", 1)]
    [InlineData("force_image_size", 0)]
    [InlineData("downsample_ratio", 0)]
    public void AnOutOfRangeField_IsAnErrorNamingIt(string field, double value)
    {
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "configs", "tiny.json")))!.AsObject();
        var parts = field.Split('.');
        JsonObject section = parts.Length == 2 ? root[parts[0]]!.AsObject() : root;
        section[parts[^1]] = value % 1 == 0 && !parts[^1].Contains("eps") && parts[^1] != "rope_theta" && parts[^1] != "downsample_ratio" ? JsonValue.Create((int)value) : JsonValue.Create(value);
        var e = Assert.Throws<InvalidDataException>(() => VlmConfig.Parse(root, "config.json"));
        Assert.Contains($"field '{field}' is invalid", e.Message);
    }
}
