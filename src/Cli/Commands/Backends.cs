using System.CommandLine;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Backends.Cpu;
using R1V2.Native.Engine.Backends.Cuda;

namespace R1V2.Native.Cli.Commands;

/// <summary>The --backend option shared by the commands that compute.</summary>
public static class Backends
{
    public static Option<string> Option() => new("--backend") { Description = "auto (CUDA when usable, else CPU) | cpu | cuda", DefaultValueFactory = _ => "auto" };

    public static Backend Create(string name)
    {
        switch (name)
        {
            case "cpu": return new CpuBackend();
            case "cuda":
                if (!CudaBackend.IsAvailable(out var why)) throw new InvalidOperationException($"--backend cuda: {why}");
                return new CudaBackend();
            case "auto": return CudaBackend.IsAvailable(out _) ? new CudaBackend() : new CpuBackend();
            default: throw new ArgumentException($"--backend must be auto, cpu or cuda, got '{name}'");
        }
    }
}
