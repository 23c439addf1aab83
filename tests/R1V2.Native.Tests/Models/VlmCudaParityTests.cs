using R1V2.Native.Engine.Backends.Cuda;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>
/// The whole VLM on CUDA against the CPU backend, on the PyTorch fixtures: fp32 storage must agree as tightly as the
/// CPU agrees with PyTorch; bf16 storage rounds every stored activation to 8 mantissa bits (2^-9 relative, round to
/// nearest). About 30 stored tensors lie on the path to the logits, so errors of sqrt(30) x 2^-9 ~ 1.1% in the
/// 2-norm are expected: logits within 3% and gradients (which pass the path twice) within 6%. Skipped without a GPU.
/// </summary>
[Collection("cpu")]
public sealed class VlmCudaParityTests(CpuFixture fx)
{
    [SkippableTheory]
    [InlineData("internvit6b", DType.F32, 1e-4, 1e-3)]
    [InlineData("internvit300m", DType.F32, 1e-4, 1e-3)]
    [InlineData("internvit6b", DType.BF16, 3e-2, 6e-2)]
    [InlineData("internvit300m", DType.BF16, 3e-2, 6e-2)]
    public void Vlm_OnCuda_MatchesTheCpuBackend(string variant, DType storage, double logitTolerance, double gradTolerance)
    {
        Skip.IfNot(Gpu.Available, Gpu.Reason);
        var dir = VlmParityTests.FixtureDir(variant);
        var batch = StepBatch(dir);
        using var cpuModel = VisionLanguageModel.Load(fx.Backend, dir, TrainableParts.All);
        using var cpuPass = cpuModel.Forward(batch);
        var cpuLogits = TestData.ToDouble(cpuPass.Logits.ToFloatArray());
        cpuModel.Backward(cpuPass);

        using var cuda = new CudaBackend(activationType: storage);
        using var model = VisionLanguageModel.Load(cuda, dir, TrainableParts.All);
        using var pass = model.Forward(batch);
        double logitError = Check.RelativeL2(cpuLogits, pass.Logits.ToFloatArray());
        Assert.True(logitError <= logitTolerance, $"{storage}: relative L2 logit error {logitError:E2} > {logitTolerance}");
        Assert.True(Math.Abs(pass.Loss - cpuPass.Loss) <= logitTolerance * Math.Abs(cpuPass.Loss), $"loss {pass.Loss} vs {cpuPass.Loss}");
        model.Backward(pass);
        foreach (var (name, p) in model.Parameters.All)
        {
            double rel = Check.RelativeL2(TestData.ToDouble(cpuModel.Parameters[name].Grad!.ToFloatArray()), p.Grad!.ToFloatArray());
            Assert.True(rel <= gradTolerance, $"{storage}: {name}: relative L2 gradient error {rel:E2} > {gradTolerance}");
        }
    }

    private static VlmBatch StepBatch(string dir)
    {
        var inputs = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "inputs.json")))!.AsObject();
        int[] Ints(string k) => inputs[k]!.AsArray().Select(x => x!.GetValue<int>()).ToArray();
        using var expected = R1V2.Native.Engine.Checkpoints.SafetensorsFile.Open(Path.Combine(dir, "expected.safetensors"));
        return new VlmBatch(Ints("input_ids"), Ints("targets"), Ints("cu_seqlens"), expected.ReadFloats("pixel_values"), inputs["tiles"]!.GetValue<int>());
    }
}
