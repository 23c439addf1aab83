using R1V2.Native.Interop;

namespace R1V2.Native.Tests.Interop;

public sealed class NativeLibraryTests
{
    [Fact]
    public void MissingLibrary_ErrorListsEveryNameTried_AndTheOverrideVariable()
    {
        var spec = new NativeLibrarySpec("r1v2_test", "R1V2_TEST_LIB_UNSET", "libdoesnotexist.so.13", "libdoesnotexist.so.12", "libdoesnotexist.so.11.2");
        var e = Assert.Throws<NativeLibraryNotFoundException>(() => spec.Handle);
        Assert.Equal(["libdoesnotexist.so.13", "libdoesnotexist.so.12", "libdoesnotexist.so.11.2"], e.Tried);
        Assert.Contains("Tried, in order: libdoesnotexist.so.13, libdoesnotexist.so.12, libdoesnotexist.so.11.2", e.Message);
        Assert.Contains("R1V2_TEST_LIB_UNSET", e.Message);
        Assert.False(spec.TryLoad(out var error));
        Assert.Equal(e.Message, error);
    }

    [Fact]
    public void EnvironmentOverride_IsTriedFirst()
    {
        const string variable = "R1V2_TEST_LIB_OVERRIDE";
        Environment.SetEnvironmentVariable(variable, "/nonexistent/libcustom.so");
        try
        {
            var spec = new NativeLibrarySpec("r1v2_test2", variable, "libalsomissing.so.1");
            Assert.Equal(["/nonexistent/libcustom.so", "libalsomissing.so.1"], spec.SearchOrder());
            var e = Assert.Throws<NativeLibraryNotFoundException>(() => spec.Handle);
            Assert.Equal("/nonexistent/libcustom.so", e.Tried[0]);
        }
        finally
        {
            Environment.SetEnvironmentVariable(variable, null);
        }
    }

    [Fact]
    public void ProbeOrder_MatchesTheSupportedCudaVersions()
    {
        Assert.Equal(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"], NativeLibraries.Nvrtc.Candidates.Take(3));
        Assert.Equal(["libcublas.so.13", "libcublas.so.12", "libcublas.so.11"], NativeLibraries.Cublas.Candidates.Take(3));
        Assert.Equal(["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"], NativeLibraries.CublasLt.Candidates.Take(3));
        Assert.Equal("libcuda.so.1", NativeLibraries.Cuda.Candidates[0]);
    }

    public static TheoryData<string> Bindings => new() { nameof(CudaDriver), nameof(Nvrtc), nameof(Cublas), nameof(CublasLt), nameof(Mpi), nameof(Nccl) };

    [SkippableTheory]
    [MemberData(nameof(Bindings))]
    public void EveryBoundEntryPoint_IsExportedByTheInstalledLibrary(string binding)
    {
        var (type, lib) = binding switch
        {
            nameof(CudaDriver) => (typeof(CudaDriver), NativeLibraries.Cuda),
            nameof(Nvrtc) => (typeof(Nvrtc), NativeLibraries.Nvrtc),
            nameof(Cublas) => (typeof(Cublas), NativeLibraries.Cublas),
            nameof(Mpi) => (typeof(Mpi), NativeLibraries.Mpi),
            nameof(Nccl) => (typeof(Nccl), NativeLibraries.Nccl),
            _ => (typeof(CublasLt), NativeLibraries.CublasLt),
        };
        Skip.IfNot(lib.TryLoad(out var error), $"{lib.LogicalName} is not installed here ({error})");
        var names = NativeLibraries.EntryPoints(type).ToList();
        Assert.True(names.Count >= 8, $"{binding}: found only {names.Count} bindings");
        var missing = names.Where(n => !lib.HasExport(n)).ToList();
        Assert.True(missing.Count == 0, $"{binding}: not exported by the installed library: {string.Join(", ", missing)}");
    }

    [SkippableFact]
    public void NoDevice_GivesACudaExceptionNamingTheCallAndTheDriverError()
    {
        Skip.IfNot(NativeLibraries.Cuda.TryLoad(out var error), $"libcuda is not installed here ({error})");
        int count;
        try { count = CudaDriver.DeviceCount(); }
        catch (CudaException e)
        {
            Assert.Equal("cuInit", e.Call);
            Assert.Equal(100, e.Code);
            Assert.Equal("CUDA_ERROR_NO_DEVICE", e.ErrorName);
            Assert.StartsWith("cuInit failed with CUDA_ERROR_NO_DEVICE (100)", e.Message);
            return;
        }
        Skip.If(count > 0, "a GPU is present; the no-device path cannot be exercised");
    }

    [Fact]
    public void KernelArgs_PackScalarsInTheLowBytes()
    {
        Assert.Equal(0xFFFFFFFFul, KernelArg.I32(-1));
        Assert.Equal(0x3F800000ul, KernelArg.F32(1f));
        Assert.Equal(ulong.MaxValue, KernelArg.I64(-1));
    }
}
