using Xunit.Abstractions;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Models;

namespace R1V2.Native.Tests.Models;

/// <summary>
/// The CPU backend's bf16 storage (<c>new CpuBackend(activationType: DType.BF16)</c>): bf16 tensors are read widened
/// to fp32 and each op rounds what it wrote to bf16, as a CUDA kernel loads bf16, computes in fp32 and rounds on store;
/// the VLM then holds bf16 activations and working weights where the CUDA model does.
/// </summary>
public sealed class Bf16StorageTests(ITestOutputHelper output)
{
    private static float[] Round(float[] x) => x.Select(BFloat16.Round).ToArray();

    [Fact]
    public void AnOp_ReadsBf16Widened_ComputesInFp32_AndRoundsWhatItWrites()
    {
        using var fp32 = new CpuBackend();
        using var bf16 = new CpuBackend(activationType: DType.BF16);
        const int rows = 5, cols = 96;
        var x = Round(TestData.Uniform(1, rows * cols, 3f));
        var w = Round(TestData.Uniform(2, cols));
        float[] Run(Backend b, DType dt)
        {
            using var tx = b.FromArray(x, dt, [rows, cols]);
            using var tw = b.FromArray(w, dt, [cols]);
            using var y = b.Allocate(dt, rows, cols);
            using var rstd = b.Allocate(DType.F32, rows);
            b.RmsNormForward(tx, tw, y, rstd, 1e-6f);
            return y.ToFloatArray();
        }
        var wide = Run(fp32, DType.F32);
        var stored = Run(bf16, DType.BF16);
        Assert.Equal(Round(wide), stored);                                 // the fp32 result, rounded once on store
        Assert.NotEqual(wide, stored);
    }

    [Fact]
    public void AnInPlaceOp_SeesItsOwnInputAndOutputAsOneTensor()
    {
        using var bf16 = new CpuBackend(activationType: DType.BF16);
        using var fp32 = new CpuBackend();
        int[] pos = [0, 3, 7];
        var x = Round(TestData.Uniform(3, 3 * 2 * 16));
        float[] Run(Backend b, DType dt)
        {
            using var t = b.FromArray(x, dt, [3, 2, 16]);
            using var p = b.FromArray(pos, [3]);
            b.RopeForward(t, p, t, 1e4f);   // y aliases x
            b.RopeBackward(t, p, t, 1e4f);
            return t.ToFloatArray();
        }
        var expected = Run(fp32, DType.F32);
        var got = Run(bf16, DType.BF16);
        // Two rotations with a bf16 rounding after each: back to x within two bf16 roundings.
        Check.Close(TestData.ToDouble(x), got, 2e-2, 1e-2, "rotated there and back in bf16");
        Assert.Equal(Round(expected).Length, got.Length);
        Assert.All(got, v => Assert.Equal(BFloat16.Round(v), v));           // every stored value is a bf16
    }

    [Fact]
    public void TheVlm_OnBf16Storage_RunsForwardAndBackward_NearTheFp32Step_WithBf16Activations()
    {
        var dir = VlmParityTests.FixtureDir("internvit300m");
        var batch = VlmCudaParityTests.StepBatch(dir);
        using var fp32 = new CpuBackend();
        using var bf16 = new CpuBackend(activationType: DType.BF16);
        (double Loss, float[] Logits, Dictionary<string, float[]> Grads, DType Hidden) Step(Backend b)
        {
            using var model = VisionLanguageModel.Load(b, dir, TrainableParts.All);
            using var pass = model.Forward(batch);
            var logits = model.FullLogits(pass);
            var hidden = pass.Hidden.DType;
            model.Backward(pass);
            return (pass.Loss, logits, model.Parameters.All.ToDictionary(x => x.Name, x => x.Parameter.Grad!.ToFloatArray()), hidden);
        }
        var wide = Step(fp32);
        var stored = Step(bf16);
        Assert.Equal(DType.F32, wide.Hidden);
        Assert.Equal(DType.BF16, stored.Hidden);                               // activations are stored in bf16
        double logitError = Check.RelativeL2(TestData.ToDouble(wide.Logits), stored.Logits);
        Assert.InRange(logitError, 1e-5, 5e-2);                                // bf16-sized, not zero and not broken
        Assert.True(Math.Abs(stored.Loss - wide.Loss) <= 5e-2 * Math.Abs(wide.Loss), $"loss {stored.Loss} vs {wide.Loss}");
        foreach (var (name, g) in wide.Grads)
            Assert.True(stored.Grads[name].All(float.IsFinite), $"{name}: non-finite gradient on bf16 storage");
        double gradError = Check.RelativeL2(TestData.ToDouble(wide.Grads.Values.SelectMany(v => v).ToArray()), stored.Grads.Values.SelectMany(v => v).ToArray());
        output.WriteLine($"bf16 storage vs fp32: logits {logitError:E2}, loss {stored.Loss} vs {wide.Loss}, gradients {gradError:E2} (relative L2)");
        Assert.InRange(gradError, 1e-5, 0.2);
    }
}
