using System.CommandLine;
using R1V2.Native.Interop;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine info`: which native libraries were found, and the CUDA devices.</summary>
public static class InfoCommand
{
    public static Command Create()
    {
        var cmd = new Command("info", "Show the native libraries found and the CUDA devices");
        cmd.SetAction(_ => Run());
        return cmd;
    }

    public static int Run()
    {
        foreach (var lib in NativeLibraries.All)
        {
            if (lib.TryLoad(out var error)) AnsiConsole.MarkupLineInterpolated($"[green]found[/]   {lib.LogicalName}");
            else AnsiConsole.MarkupLineInterpolated($"[yellow]missing[/] {lib.LogicalName}: {error}");
        }
        if (NativeLibraries.Nvrtc.TryLoad(out _))
            AnsiConsole.MarkupLineInterpolated($"NVRTC {Nvrtc.Version()}, archs {string.Join(", ", Nvrtc.SupportedArchs().Select(a => $"sm_{a}"))}");
        if (!NativeLibraries.Cuda.TryLoad(out _)) return 0;
        try
        {
            AnsiConsole.MarkupLineInterpolated($"CUDA driver API {CudaDriver.DriverVersion()}");
            int n = CudaDriver.DeviceCount();
            for (int i = 0; i < n; i++)
            {
                var d = CudaDriver.Device(i);
                AnsiConsole.MarkupLineInterpolated($"device {i}: {d.Name}, {d.Arch}, {d.MultiprocessorCount} SMs, {d.TotalMemoryBytes / (1L << 30)} GiB, {d.PeakBandwidthBytesPerSecond / 1e9:F0} GB/s");
            }
        }
        catch (CudaException e)
        {
            AnsiConsole.MarkupLineInterpolated($"[yellow]no CUDA device:[/] {e.Message}");
        }
        return 0;
    }
}
