using System.CommandLine;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Backends.Cuda;

namespace R1V2.Native.Cli.Commands;

/// <summary>The --backend option shared by the commands that compute.</summary>
public static class Backends
{
    public static Option<string> Option() => new("--backend") { Description = "auto (CUDA when usable, else CPU) | cpu | cuda", DefaultValueFactory = _ => "auto" };

    /// <param name="device">The CUDA device (a launch's local rank: one GPU per process on a node).</param>
    public static Backend Create(string name, int device = 0)
    {
        switch (name)
        {
            case "cpu": return new CpuBackend();
            case "cuda":
                if (!CudaBackend.IsAvailable(out var why)) throw new InvalidOperationException($"--backend cuda: {why}");
                return new CudaBackend(Device(device));
            case "auto": return CudaBackend.IsAvailable(out _) ? new CudaBackend(Device(device)) : new CpuBackend();
            default: throw new ArgumentException($"--backend must be auto, cpu or cuda, got '{name}'");
        }
    }

    private static int Device(int device)
    {
        int count = Interop.CudaDriver.DeviceCount();
        return device < count ? device
            : throw new InvalidOperationException($"this process has local rank {device} but its node has {count} CUDA device(s): start at most {count} ranks per node (one GPU each)");
    }
}
