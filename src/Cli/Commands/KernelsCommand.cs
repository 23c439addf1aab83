using System.CommandLine;
using R1V2.Native.Engine.Kernels;
using R1V2.Native.Interop;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine kernels --arch sm_80,sm_90`: compiles every kernel family with NVRTC (no GPU needed) and reports resources.</summary>
public static class KernelsCommand
{
    public static Command Create()
    {
        var arch = new Option<string>("--arch") { Description = "Comma-separated target archs", DefaultValueFactory = _ => "sm_80,sm_90" };
        var cache = new Option<string?>("--cache") { Description = "Kernel cache directory (default: R1V2_KERNEL_CACHE or ~/.cache/r1v2-native/kernels)" };
        var cmd = new Command("kernels", "Compile every CUDA kernel with NVRTC and print registers, spills and static shared memory per kernel") { arch, cache };
        cmd.SetAction(r => Run(r.GetValue(arch)!, r.GetValue(cache)));
        return cmd;
    }

    public static int Run(string archList, string? cacheDir)
    {
        var archs = archList.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(a => $"sm_{KernelCompiler.ParseArch(a)}").ToList();
        if (!NativeLibraries.Nvrtc.TryLoad(out var error))
        {
            AnsiConsole.MarkupLineInterpolated($"[red]NVRTC is not available:[/] {error}");
            return 2;
        }
        var compiler = new KernelCompiler(cacheDir);
        AnsiConsole.MarkupLineInterpolated($"NVRTC {Nvrtc.Version()}, cache {compiler.CacheDirectory}");
        var table = new Table().AddColumns("arch", "family", "kernel", "registers", "spill stores (B)", "spill loads (B)", "static smem (B)", "stack (B)");
        int kernels = 0, spilling = 0;
        foreach (var a in archs)
        {
            foreach (var family in KernelSources.Families.Keys)
            {
                CompiledFamily compiled;
                try
                {
                    compiled = compiler.Compile(family, a);
                }
                catch (NvrtcCompileException e)
                {
                    AnsiConsole.WriteLine(e.Message);
                    return 1;
                }
                foreach (var k in compiled.Kernels)
                {
                    kernels++;
                    if (k.SpillStoreBytes + k.SpillLoadBytes > 0) spilling++;
                    table.AddRow(a, family, k.Kernel, k.Registers.ToString(), k.SpillStoreBytes.ToString(), k.SpillLoadBytes.ToString(),
                        k.StaticSharedBytes.ToString(), k.StackBytes.ToString());
                }
            }
        }
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLineInterpolated($"compiled {kernels} kernels in {KernelSources.Families.Count} families for {string.Join(", ", archs)}; {spilling} spill registers to local memory; 0 warnings");
        return 0;
    }
}
