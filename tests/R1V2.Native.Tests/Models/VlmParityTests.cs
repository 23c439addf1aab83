using System.Text.Json.Nodes;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Models;
using R1V2.Native.Trainer.Optim;

namespace R1V2.Native.Tests.Models;

/// <summary>
/// The whole VLM on the CPU backend (fp32) against tests/fixtures/make_vlm_fixture.py, an independent PyTorch
/// implementation computing in double: logits, loss, every parameter gradient and 10 AdamW steps, for an
/// InternViT-6B-style vision tower (RMSNorm, QK-norm, no qkv bias, pixel shuffle v2, untied head) and an
/// InternViT-300M-style one (LayerNorm, qkv bias, pixel shuffle v1, tied embeddings).
/// </summary>
[Collection("cpu")]
public sealed class VlmParityTests(CpuFixture fx)
{
    private readonly Backend _b = fx.Backend;

    public static string FixtureDir(string variant) =>
        Path.Combine(AppContext.BaseDirectory, "fixtures", "vlm", variant);

    private static (VlmBatch Batch, JsonObject Inputs, float[] Logits) LoadInputs(string dir)
    {
        var inputs = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "inputs.json")))!.AsObject();
        int[] Ints(string k) => inputs[k]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        using var expected = SafetensorsFile.Open(Path.Combine(dir, "expected.safetensors"));
        var pixels = expected.ReadFloats("pixel_values");
        var batch = new VlmBatch(Ints("input_ids"), Ints("targets"), Ints("cu_seqlens"), pixels, inputs["tiles"]!.GetValue<int>());
        return (batch, inputs, expected.ReadFloats("logits"));
    }

    [Theory]
    [InlineData("internvit6b")]
    [InlineData("internvit300m")]
    public void Vlm_LogitsLossAndEveryGradient_MatchThePyTorchReference(string variant)
    {
        var dir = FixtureDir(variant);
        var (batch, inputs, expectedLogits) = LoadInputs(dir);
        using var model = VisionLanguageModel.Load(_b, dir, TrainableParts.All);
        Assert.Equal(inputs["image_context_id"]!.GetValue<int>(), model.ImageContextId);
        using var pass = model.Forward(batch);

        // fp32 against a double reference through ~10 layers: logits agree to ~1e-6; the bound is the 1e-4.
        var logits = model.FullLogits(pass);
        double maxErr = logits.Zip(expectedLogits).Max(z => Math.Abs(z.First - z.Second));
        Assert.True(maxErr <= 1e-4, $"max |logit error| {maxErr:E2} > 1e-4");
        Assert.Equal(inputs["loss"]!.GetValue<double>(), pass.Loss, 4);

        model.Backward(pass);
        using var grads = SafetensorsFile.Open(Path.Combine(dir, "grads.safetensors"));
        int checkedTensors = 0;
        foreach (var (name, p) in model.Parameters.All)
        {
            var expected = TestData.ToDouble(grads.ReadFloats(name));
            var got = p.Grad!.ToFloatArray();
            // Relative error in the 2-norm over the whole tensor: ||g - g_ref|| / ||g_ref|| <= 1e-3.
            double rel = Check.RelativeL2(expected, got);
            Assert.True(rel <= 1e-3, $"{name}: relative L2 gradient error {rel:E2} > 1e-3 (|g_ref| = {Math.Sqrt(expected.Sum(x => x * x)):E2})");
            checkedTensors++;
        }
        Assert.Equal(grads.Tensors.Count, checkedTensors);
    }

    [Theory]
    [InlineData("internvit6b")]
    [InlineData("internvit300m")]
    public void Vlm_TenAdamWSteps_MatchThePyTorchLosses(string variant)
    {
        var dir = FixtureDir(variant);
        var (batch, inputs, _) = LoadInputs(dir);
        var adam = inputs["adamw"]!.AsObject();
        var expectedLosses = adam["losses"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
        var expectedNorms = adam["grad_norms"]!.AsArray().Select(x => x!.GetValue<double>()).ToArray();
        using var model = VisionLanguageModel.Load(_b, dir, TrainableParts.All);
        var settings = new AdamWSettings(adam["lr"]!.GetValue<float>(), adam["beta1"]!.GetValue<float>(), adam["beta2"]!.GetValue<float>(),
            adam["eps"]!.GetValue<float>(), adam["weight_decay"]!.GetValue<float>());
        using var opt = new AdamWOptimizer(_b, model.Parameters.Trainable, settings, adam["max_grad_norm"]!.GetValue<double>());
        for (int step = 0; step < 10; step++)
        {
            opt.ZeroGrad();
            using var pass = model.Forward(batch);
            // fp32 weights drift from the double reference by ~1e-7 per step; losses stay within 1e-4 relative.
            Assert.True(Math.Abs(pass.Loss - expectedLosses[step]) <= 1e-4 * Math.Abs(expectedLosses[step]),
                $"step {step + 1}: loss {pass.Loss:R}, reference {expectedLosses[step]:R}");
            model.Backward(pass);
            var report = opt.Step(settings.LearningRate);
            // Step 1 sees identical weights: the norms agree to fp32 summation (measured 3e-7). Later steps see weights
            // that differ by the fp32-vs-double drift, which Adam amplifies through near-zero gradient components
            // (measured up to 2.3e-4 by step 9 on the tied-embedding variant): 1e-3 from step 2 on.
            double normTolerance = step == 0 ? 1e-5 : 1e-3;
            Assert.True(Math.Abs(report.GradNorm - expectedNorms[step]) <= normTolerance * expectedNorms[step],
                $"step {step + 1}: gradient norm {report.GradNorm:R}, reference {expectedNorms[step]:R}");
        }
        Assert.True(expectedLosses[^1] < expectedLosses[0], "the reference run should learn");
    }
}
