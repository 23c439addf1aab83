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
        var all = new Option<bool>("--all-variants") { Description = "Compile every variant of every family's tuning space (engine tune --list), not only the defaults" };
        var cmd = new Command("kernels", "Compile every CUDA kernel with NVRTC and print registers, spills and static shared memory per kernel") { arch, cache, all };
        cmd.SetAction(r => Run(r.GetValue(arch)!, r.GetValue(cache), r.GetValue(all)));
        return cmd;
    }

    public static int Run(string archList, string? cacheDir, bool allVariants = false)
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
        var table = new Table().AddColumns("arch", "family", "block", "kernel", "registers", "spill stores (B)", "spill loads (B)", "static smem (B)", "stack (B)");
        int kernels = 0, spilling = 0, warnings = 0, variants = 0;
        foreach (var a in archs)
        {
            foreach (var family in KernelSources.Families.Keys)
            {
                foreach (var block in allVariants ? KernelTuning.Space(family) : [KernelTuning.DefaultVariant(family)])
                {
                    var variant = block == KernelTuning.DefaultVariant(family) ? compiler
                        : new KernelCompiler(cacheDir, new KernelTuning(new Dictionary<string, KernelVariant> { [family] = block }));
                    CompiledFamily compiled;
                    try
                    {
                        compiled = variant.Compile(family, a);
                    }
                    catch (NvrtcCompileException e)
                    {
                        AnsiConsole.WriteLine($"{family} with block {block} for {a}: {e.Message}");
                        return 1;
                    }
                    variants++;
                    warnings += KernelCompiler.Warnings(compiled.Log).Count;
                    foreach (var k in compiled.Kernels)
                    {
                        kernels++;
                        if (k.SpillStoreBytes + k.SpillLoadBytes > 0) spilling++;
                        table.AddRow(a, family, block.ToString(), k.Kernel, k.Registers.ToString(), k.SpillStoreBytes.ToString(), k.SpillLoadBytes.ToString(),
                            k.StaticSharedBytes.ToString(), k.StackBytes.ToString());
                    }
                }
            }
        }
        AnsiConsole.Write(table);
        AnsiConsole.MarkupLineInterpolated($"compiled {kernels} kernels in {KernelSources.Families.Count} families{(allVariants ? $" ({variants} variants)" : "")} for {string.Join(", ", archs)}; {spilling} spill registers to local memory; {warnings} warnings");
        return spilling > 0 && allVariants ? 1 : 0;
    }
}
