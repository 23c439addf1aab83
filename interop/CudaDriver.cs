using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>A CUDA driver, NVRTC or cuBLAS call returned a non-success status.</summary>
public sealed class CudaException : Exception
{
    public CudaException(string call, int code, string errorName, string? detail = null)
        : base($"{call} failed with {errorName} ({code})" + (string.IsNullOrEmpty(detail) ? "" : $": {detail}"))
    {
        Call = call;
        Code = code;
        ErrorName = errorName;
    }

    public string Call { get; }
    public int Code { get; }
    public string ErrorName { get; }
}

/// <summary>Launch geometry: grid or block dimensions.</summary>
public readonly record struct Dim3(uint X, uint Y = 1, uint Z = 1)
{
    public static implicit operator Dim3(uint x) => new(x);
    public static implicit operator Dim3(int x) => new(checked((uint)x));
}

public enum CuDeviceAttribute
{
    MaxThreadsPerBlock = 1,
    WarpSize = 10,
    ClockRateKHz = 13,
    MultiprocessorCount = 16,
    MemoryClockRateKHz = 36,
    GlobalMemoryBusWidthBits = 37,
    L2CacheSizeBytes = 38,
    MaxThreadsPerMultiprocessor = 39,
    ComputeCapabilityMajor = 75,
    ComputeCapabilityMinor = 76,
    MaxSharedMemoryPerBlockOptin = 97,
}

public enum CuFunctionAttribute
{
    MaxThreadsPerBlock = 0,
    SharedSizeBytes = 1,
    ConstSizeBytes = 2,
    LocalSizeBytes = 3,
    NumRegs = 4,
    PtxVersion = 5,
    BinaryVersion = 6,
    MaxDynamicSharedSizeBytes = 8,
}

/// <summary>Static properties of one CUDA device, read once.</summary>
public sealed record CudaDeviceInfo(
    int Ordinal, string Name, int Major, int Minor, int MultiprocessorCount, long TotalMemoryBytes,
    int ClockRateKHz, int MemoryClockRateKHz, int MemoryBusWidthBits, int L2CacheBytes, int MaxSharedMemoryPerBlockOptin)
{
    public string Arch => $"sm_{Major}{Minor}";

    /// <summary>Peak DRAM bandwidth from memory clock and bus width (double data rate).</summary>
    public double PeakBandwidthBytesPerSecond => 2.0 * MemoryClockRateKHz * 1e3 * (MemoryBusWidthBits / 8.0);
}

/// <summary>The CUDA driver API: thin typed bindings over libcuda (entry points with their exact _v2 names).</summary>
public static unsafe partial class CudaDriver
{
    private const string Lib = "r1v2_cuda";

    static CudaDriver() => NativeLibraries.EnsureResolver();

    [LibraryImport(Lib, EntryPoint = "cuInit")] private static partial int cuInit(uint flags);
    [LibraryImport(Lib, EntryPoint = "cuDriverGetVersion")] private static partial int cuDriverGetVersion(int* version);
    [LibraryImport(Lib, EntryPoint = "cuGetErrorName")] private static partial int cuGetErrorName(int error, byte** name);
    [LibraryImport(Lib, EntryPoint = "cuGetErrorString")] private static partial int cuGetErrorString(int error, byte** text);
    [LibraryImport(Lib, EntryPoint = "cuDeviceGetCount")] private static partial int cuDeviceGetCount(int* count);
    [LibraryImport(Lib, EntryPoint = "cuDeviceGet")] private static partial int cuDeviceGet(int* device, int ordinal);
    [LibraryImport(Lib, EntryPoint = "cuDeviceGetName")] private static partial int cuDeviceGetName(byte* name, int len, int device);
    [LibraryImport(Lib, EntryPoint = "cuDeviceGetAttribute")] private static partial int cuDeviceGetAttribute(int* value, int attribute, int device);
    [LibraryImport(Lib, EntryPoint = "cuDeviceTotalMem_v2")] private static partial int cuDeviceTotalMem(nuint* bytes, int device);
    [LibraryImport(Lib, EntryPoint = "cuDevicePrimaryCtxRetain")] private static partial int cuDevicePrimaryCtxRetain(IntPtr* ctx, int device);
    [LibraryImport(Lib, EntryPoint = "cuDevicePrimaryCtxRelease_v2")] private static partial int cuDevicePrimaryCtxRelease(int device);
    [LibraryImport(Lib, EntryPoint = "cuCtxSetCurrent")] private static partial int cuCtxSetCurrent(IntPtr ctx);
    [LibraryImport(Lib, EntryPoint = "cuCtxSynchronize")] private static partial int cuCtxSynchronize();
    [LibraryImport(Lib, EntryPoint = "cuMemGetInfo_v2")] private static partial int cuMemGetInfo(nuint* free, nuint* total);
    [LibraryImport(Lib, EntryPoint = "cuStreamCreate")] private static partial int cuStreamCreate(IntPtr* stream, uint flags);
    [LibraryImport(Lib, EntryPoint = "cuStreamDestroy_v2")] private static partial int cuStreamDestroy(IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuStreamSynchronize")] private static partial int cuStreamSynchronize(IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuEventCreate")] private static partial int cuEventCreate(IntPtr* ev, uint flags);
    [LibraryImport(Lib, EntryPoint = "cuEventDestroy_v2")] private static partial int cuEventDestroy(IntPtr ev);
    [LibraryImport(Lib, EntryPoint = "cuEventRecord")] private static partial int cuEventRecord(IntPtr ev, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuEventSynchronize")] private static partial int cuEventSynchronize(IntPtr ev);
    [LibraryImport(Lib, EntryPoint = "cuEventQuery")] private static partial int cuEventQuery(IntPtr ev);
    [LibraryImport(Lib, EntryPoint = "cuStreamWaitEvent")] private static partial int cuStreamWaitEvent(IntPtr stream, IntPtr ev, uint flags);
    [LibraryImport(Lib, EntryPoint = "cuEventElapsedTime")] private static partial int cuEventElapsedTime(float* ms, IntPtr start, IntPtr end);
    [LibraryImport(Lib, EntryPoint = "cuMemAlloc_v2")] private static partial int cuMemAlloc(ulong* ptr, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cuMemFree_v2")] private static partial int cuMemFree(ulong ptr);
    [LibraryImport(Lib, EntryPoint = "cuMemsetD8_v2")] private static partial int cuMemsetD8(ulong ptr, byte value, nuint count);
    [LibraryImport(Lib, EntryPoint = "cuMemsetD8Async")] private static partial int cuMemsetD8Async(ulong ptr, byte value, nuint count, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemsetD32Async")] private static partial int cuMemsetD32Async(ulong ptr, uint value, nuint count, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyHtoD_v2")] private static partial int cuMemcpyHtoD(ulong dst, void* src, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyDtoH_v2")] private static partial int cuMemcpyDtoH(void* dst, ulong src, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyDtoD_v2")] private static partial int cuMemcpyDtoD(ulong dst, ulong src, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyHtoDAsync_v2")] private static partial int cuMemcpyHtoDAsync(ulong dst, void* src, nuint bytes, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyDtoHAsync_v2")] private static partial int cuMemcpyDtoHAsync(void* dst, ulong src, nuint bytes, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyDtoDAsync_v2")] private static partial int cuMemcpyDtoDAsync(ulong dst, ulong src, nuint bytes, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemAllocHost_v2")] private static partial int cuMemAllocHost(void** ptr, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cuMemFreeHost")] private static partial int cuMemFreeHost(void* ptr);
    [LibraryImport(Lib, EntryPoint = "cuModuleLoadData")] private static partial int cuModuleLoadData(IntPtr* module, void* image);
    [LibraryImport(Lib, EntryPoint = "cuModuleLoadDataEx")] private static partial int cuModuleLoadDataEx(IntPtr* module, void* image, uint numOptions, int* options, void** values);
    [LibraryImport(Lib, EntryPoint = "cuModuleUnload")] private static partial int cuModuleUnload(IntPtr module);
    [LibraryImport(Lib, EntryPoint = "cuModuleGetFunction")] private static partial int cuModuleGetFunction(IntPtr* function, IntPtr module, byte* name);
    [LibraryImport(Lib, EntryPoint = "cuOccupancyMaxActiveBlocksPerMultiprocessor")] private static partial int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, IntPtr function, int blockSize, nuint dynamicSharedBytes);
    [LibraryImport(Lib, EntryPoint = "cuFuncGetAttribute")] private static partial int cuFuncGetAttribute(int* value, int attribute, IntPtr function);
    [LibraryImport(Lib, EntryPoint = "cuFuncSetAttribute")] private static partial int cuFuncSetAttribute(IntPtr function, int attribute, int value);
    [LibraryImport(Lib, EntryPoint = "cuLaunchKernel")]
    private static partial int cuLaunchKernel(IntPtr f, uint gx, uint gy, uint gz, uint bx, uint by, uint bz,
        uint sharedBytes, IntPtr stream, void** kernelParams, void** extra);

    /// <summary>Throws <see cref="CudaException"/> naming the call and the driver's error name.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Check(int status, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status != 0) Throw(status, call);
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void Throw(int status, string call)
    {
        var paren = call.IndexOf('(');
        throw new CudaException(paren > 0 ? call[..paren] : call, status, ErrorName(status), ErrorString(status));
    }

    public static string ErrorName(int status)
    {
        byte* p = null;
        return cuGetErrorName(status, &p) == 0 && p != null ? Marshal.PtrToStringUTF8((IntPtr)p)! : $"CUDA_ERROR_{status}";
    }

    public static string ErrorString(int status)
    {
        byte* p = null;
        return cuGetErrorString(status, &p) == 0 && p != null ? Marshal.PtrToStringUTF8((IntPtr)p)! : "";
    }

    private static int _initialised;

    /// <summary>cuInit(0), once per process. With no device the driver answers CUDA_ERROR_NO_DEVICE.</summary>
    public static void Init()
    {
        if (Volatile.Read(ref _initialised) == 1) return;
        Check(cuInit(0));
        Volatile.Write(ref _initialised, 1);
    }

    public static int DriverVersion()
    {
        int v;
        Check(cuDriverGetVersion(&v));
        return v;
    }

    public static int DeviceCount()
    {
        Init();
        int n;
        Check(cuDeviceGetCount(&n));
        return n;
    }

    /// <summary>How many blocks of <paramref name="blockSize"/> threads of a kernel one SM holds at once (its occupancy).</summary>
    public static int MaxActiveBlocksPerMultiprocessor(IntPtr function, int blockSize, long dynamicSharedBytes = 0)
    {
        int n;
        Check(cuOccupancyMaxActiveBlocksPerMultiprocessor(&n, function, blockSize, (nuint)dynamicSharedBytes));
        return n;
    }

    public static int Attribute(int device, CuDeviceAttribute attribute)
    {
        int v;
        Check(cuDeviceGetAttribute(&v, (int)attribute, device));
        return v;
    }

    public static CudaDeviceInfo Device(int ordinal)
    {
        Init();
        int dev;
        Check(cuDeviceGet(&dev, ordinal));
        var name = stackalloc byte[256];
        Check(cuDeviceGetName(name, 256, dev));
        nuint total;
        Check(cuDeviceTotalMem(&total, dev));
        return new CudaDeviceInfo(ordinal, Marshal.PtrToStringUTF8((IntPtr)name)!,
            Attribute(dev, CuDeviceAttribute.ComputeCapabilityMajor), Attribute(dev, CuDeviceAttribute.ComputeCapabilityMinor),
            Attribute(dev, CuDeviceAttribute.MultiprocessorCount), (long)total,
            Attribute(dev, CuDeviceAttribute.ClockRateKHz), Attribute(dev, CuDeviceAttribute.MemoryClockRateKHz),
            Attribute(dev, CuDeviceAttribute.GlobalMemoryBusWidthBits), Attribute(dev, CuDeviceAttribute.L2CacheSizeBytes),
            Attribute(dev, CuDeviceAttribute.MaxSharedMemoryPerBlockOptin));
    }

    public static (long Free, long Total) MemoryInfo()
    {
        nuint free, total;
        Check(cuMemGetInfo(&free, &total));
        return ((long)free, (long)total);
    }

    public static void Synchronize() => Check(cuCtxSynchronize());

    // ---- device memory ----------------------------------------------------------------------------
    public static ulong Alloc(long bytes)
    {
        ulong p;
        Check(cuMemAlloc(&p, (nuint)Math.Max(bytes, 1)));
        return p;
    }

    public static void Free(ulong ptr) => Check(cuMemFree(ptr));
    public static void Memset(ulong ptr, byte value, long bytes) => Check(cuMemsetD8(ptr, value, (nuint)bytes));
    public static void MemsetAsync(ulong ptr, byte value, long bytes, IntPtr stream) => Check(cuMemsetD8Async(ptr, value, (nuint)bytes, stream));
    public static void MemsetD32Async(ulong ptr, uint value, long count, IntPtr stream) => Check(cuMemsetD32Async(ptr, value, (nuint)count, stream));
    public static void CopyHtoD(ulong dst, void* src, long bytes) => Check(cuMemcpyHtoD(dst, src, (nuint)bytes));
    public static void CopyDtoH(void* dst, ulong src, long bytes) => Check(cuMemcpyDtoH(dst, src, (nuint)bytes));
    public static void CopyDtoD(ulong dst, ulong src, long bytes) => Check(cuMemcpyDtoD(dst, src, (nuint)bytes));
    public static void CopyHtoDAsync(ulong dst, void* src, long bytes, IntPtr stream) => Check(cuMemcpyHtoDAsync(dst, src, (nuint)bytes, stream));
    public static void CopyDtoHAsync(void* dst, ulong src, long bytes, IntPtr stream) => Check(cuMemcpyDtoHAsync(dst, src, (nuint)bytes, stream));
    public static void CopyDtoDAsync(ulong dst, ulong src, long bytes, IntPtr stream) => Check(cuMemcpyDtoDAsync(dst, src, (nuint)bytes, stream));

    public static void CopyHtoD<T>(ulong dst, ReadOnlySpan<T> src) where T : unmanaged
    {
        fixed (T* p = src) CopyHtoD(dst, p, (long)src.Length * sizeof(T));
    }

    public static void CopyDtoH<T>(Span<T> dst, ulong src) where T : unmanaged
    {
        fixed (T* p = dst) CopyDtoH(p, src, (long)dst.Length * sizeof(T));
    }

    public static void* AllocHost(long bytes)
    {
        void* p;
        Check(cuMemAllocHost(&p, (nuint)bytes));
        return p;
    }

    public static void FreeHost(void* p) => Check(cuMemFreeHost(p));

    // ---- contexts, streams, events --------------------------------------------------------------------
    internal static IntPtr RetainPrimaryContext(int ordinal)
    {
        Init();
        int dev;
        Check(cuDeviceGet(&dev, ordinal));
        IntPtr ctx;
        Check(cuDevicePrimaryCtxRetain(&ctx, dev));
        return ctx;
    }

    internal static void ReleasePrimaryContext(int ordinal) => Check(cuDevicePrimaryCtxRelease(ordinal));
    internal static void SetCurrent(IntPtr ctx) => Check(cuCtxSetCurrent(ctx));

    internal static IntPtr CreateStream(uint flags)
    {
        IntPtr s;
        Check(cuStreamCreate(&s, flags));
        return s;
    }

    internal static void DestroyStream(IntPtr s) => Check(cuStreamDestroy(s));
    public static void SynchronizeStream(IntPtr s) => Check(cuStreamSynchronize(s));

    internal static IntPtr CreateEvent(uint flags)
    {
        IntPtr e;
        Check(cuEventCreate(&e, flags));
        return e;
    }

    internal static void DestroyEvent(IntPtr e) => Check(cuEventDestroy(e));
    internal static void RecordEvent(IntPtr e, IntPtr stream) => Check(cuEventRecord(e, stream));
    internal static void SynchronizeEvent(IntPtr e) => Check(cuEventSynchronize(e));

    /// <summary>Whether the work before the event's record has finished (CUDA_ERROR_NOT_READY: not yet).</summary>
    internal static bool EventDone(IntPtr e)
    {
        int code = cuEventQuery(e);
        if (code == 600) return false; // CUDA_ERROR_NOT_READY
        Check(code);
        return true;
    }

    /// <summary>Work queued on <paramref name="stream"/> after this call waits for the event (no host wait).</summary>
    internal static void StreamWaitEvent(IntPtr stream, IntPtr e) => Check(cuStreamWaitEvent(stream, e, 0));

    // CUDA 12.8+ headers name cuEventElapsedTime_v2; older drivers export only the plain name.
    private static readonly delegate* unmanaged<float*, IntPtr, IntPtr, int> ElapsedV2 =
        NativeLibraries.Cuda.TryLoad(out _) && NativeLibrary.TryGetExport(NativeLibraries.Cuda.Handle, "cuEventElapsedTime_v2", out var f)
            ? (delegate* unmanaged<float*, IntPtr, IntPtr, int>)f : null;

    internal static float ElapsedMilliseconds(IntPtr start, IntPtr end)
    {
        float ms;
        if (ElapsedV2 != null) Check(ElapsedV2(&ms, start, end), "cuEventElapsedTime_v2");
        else Check(cuEventElapsedTime(&ms, start, end));
        return ms;
    }

    // ---- modules and launches ---------------------------------------------------------------------------
    internal static IntPtr LoadModule(ReadOnlySpan<byte> image)
    {
        // PTX must be NUL-terminated; a CUBIN is an ELF image and is passed as is.
        IntPtr m;
        if (image.Length > 0 && image[^1] != 0 && !(image.Length >= 4 && image[0] == 0x7F && image[1] == (byte)'E'))
        {
            var copy = new byte[image.Length + 1];
            image.CopyTo(copy);
            fixed (byte* p = copy) Check(cuModuleLoadData(&m, p));
        }
        else
        {
            fixed (byte* p = image) Check(cuModuleLoadData(&m, p));
        }
        return m;
    }

    internal static void UnloadModule(IntPtr module) => Check(cuModuleUnload(module));

    internal static IntPtr GetFunction(IntPtr module, string name)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(name + "\0");
        IntPtr f;
        fixed (byte* p = bytes)
        {
            var status = cuModuleGetFunction(&f, module, p);
            if (status != 0) throw new CudaException("cuModuleGetFunction", status, ErrorName(status), $"kernel '{name}'");
        }
        return f;
    }

    public static int FunctionAttribute(IntPtr function, CuFunctionAttribute attribute)
    {
        int v;
        Check(cuFuncGetAttribute(&v, (int)attribute, function));
        return v;
    }

    public static void SetFunctionAttribute(IntPtr function, CuFunctionAttribute attribute, int value) =>
        Check(cuFuncSetAttribute(function, (int)attribute, value));

    /// <summary>
    /// Launches <paramref name="function"/>. Each kernel parameter occupies one 8-byte slot of <paramref name="args"/>
    /// with its value in the low bytes (see <see cref="KernelArg"/>); the caller builds the slots with stackalloc, so a
    /// launch boxes and allocates nothing, and it does not synchronise.
    /// </summary>
    public static void Launch(IntPtr function, Dim3 grid, Dim3 block, uint sharedBytes, IntPtr stream, ReadOnlySpan<ulong> args)
    {
        fixed (ulong* slots = args)
        {
            void** pointers = stackalloc void*[Math.Max(1, args.Length)];
            for (int i = 0; i < args.Length; i++) pointers[i] = slots + i;
            Check(cuLaunchKernel(function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z, sharedBytes, stream, pointers, null));
        }
    }
}

/// <summary>Packs scalar kernel arguments into 8-byte launch slots (value in the low bytes, little-endian).</summary>
public static class KernelArg
{
    public static ulong I32(int v) => (uint)v;
    public static ulong I64(long v) => (ulong)v;
    public static ulong F32(float v) => BitConverter.SingleToUInt32Bits(v);
    public static ulong Ptr(ulong devicePointer) => devicePointer;
}

/// <summary>The primary context of one device, made current on the calling thread.</summary>
public sealed class CudaContext : IDisposable
{
    private bool _disposed;

    public CudaContext(int ordinal = 0)
    {
        Ordinal = ordinal;
        Device = CudaDriver.Device(ordinal);
        Handle = CudaDriver.RetainPrimaryContext(ordinal);
        CudaDriver.SetCurrent(Handle);
    }

    public int Ordinal { get; }
    public CudaDeviceInfo Device { get; }
    public IntPtr Handle { get; }

    public void MakeCurrent() => CudaDriver.SetCurrent(Handle);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        CudaDriver.ReleasePrimaryContext(Ordinal);
    }
}

public sealed class CudaStream : IDisposable
{
    public CudaStream(bool nonBlocking = true) => Handle = CudaDriver.CreateStream(nonBlocking ? 1u : 0u);
    public IntPtr Handle { get; private set; }
    public void Synchronize() => CudaDriver.SynchronizeStream(Handle);

    public void Dispose()
    {
        if (Handle == IntPtr.Zero) return;
        CudaDriver.DestroyStream(Handle);
        Handle = IntPtr.Zero;
    }
}

public sealed class CudaEvent : IDisposable
{
    public CudaEvent() => Handle = CudaDriver.CreateEvent(0);
    public IntPtr Handle { get; private set; }
    public void Record(CudaStream stream) => CudaDriver.RecordEvent(Handle, stream.Handle);
    public void Synchronize() => CudaDriver.SynchronizeEvent(Handle);
    public bool Done => CudaDriver.EventDone(Handle);

    /// <summary>Makes <paramref name="stream"/>'s later work wait for this event.</summary>
    public void MakeWait(CudaStream stream) => CudaDriver.StreamWaitEvent(stream.Handle, Handle);

    /// <summary>Milliseconds between two recorded events (both must have completed).</summary>
    public static float Elapsed(CudaEvent start, CudaEvent end) => CudaDriver.ElapsedMilliseconds(start.Handle, end.Handle);

    public void Dispose()
    {
        if (Handle == IntPtr.Zero) return;
        CudaDriver.DestroyEvent(Handle);
        Handle = IntPtr.Zero;
    }
}

/// <summary>Page-locked host memory for fast and asynchronous copies.</summary>
public sealed unsafe class PinnedBuffer : IDisposable
{
    public PinnedBuffer(long bytes)
    {
        Bytes = bytes;
        Pointer = CudaDriver.AllocHost(bytes);
    }

    public long Bytes { get; }
    public void* Pointer { get; private set; }
    public Span<T> AsSpan<T>() where T : unmanaged => new(Pointer, checked((int)(Bytes / sizeof(T))));

    public void Dispose()
    {
        if (Pointer == null) return;
        CudaDriver.FreeHost(Pointer);
        Pointer = null;
    }
}

/// <summary>A loaded module (PTX or CUBIN) and lookup of its kernels.</summary>
public sealed class CudaModule : IDisposable
{
    public CudaModule(ReadOnlySpan<byte> image) => Handle = CudaDriver.LoadModule(image);
    public IntPtr Handle { get; private set; }

    public CudaFunction Function(string name) => new(name, CudaDriver.GetFunction(Handle, name));

    public void Dispose()
    {
        if (Handle == IntPtr.Zero) return;
        CudaDriver.UnloadModule(Handle);
        Handle = IntPtr.Zero;
    }
}

/// <summary>A kernel entry point and its compiled resource usage.</summary>
public readonly record struct CudaFunction(string Name, IntPtr Handle)
{
    public int Registers => CudaDriver.FunctionAttribute(Handle, CuFunctionAttribute.NumRegs);
    public int StaticSharedBytes => CudaDriver.FunctionAttribute(Handle, CuFunctionAttribute.SharedSizeBytes);
    public int LocalBytes => CudaDriver.FunctionAttribute(Handle, CuFunctionAttribute.LocalSizeBytes);
    public int MaxThreadsPerBlock => CudaDriver.FunctionAttribute(Handle, CuFunctionAttribute.MaxThreadsPerBlock);
}
