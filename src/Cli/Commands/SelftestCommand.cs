using System.CommandLine;
using System.Diagnostics;
using R1V2.Native.Engine.Backends;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>
/// `engine selftest collectives`: every collective of this launch (one process, or the ranks mpirun / srun started)
/// against the same computation on the host, then all-reduce bandwidth at a few sizes. What a cluster user runs first.
/// </summary>
public static class SelftestCommand
{
    public static Command Create()
    {
        var sizes = new Option<string>("--sizes") { Description = "Comma-separated all-reduce sizes in fp32 elements for the bandwidth table", DefaultValueFactory = _ => "1024,262144,4194304" };
        var backend = Backends.Option();
        var collectives = new Command("collectives", "Check every collective against a host computation and time all-reduce (run it under mpirun or srun; on CUDA tensors go through NCCL)") { sizes, backend };
        collectives.SetAction(r => RunCollectives(r.GetValue(sizes)!, r.GetValue(backend)!));
        var rank = new Option<int>("--rank") { Description = "The rank that fails", DefaultValueFactory = _ => 1 };
        var abort = new Command("abort", "Check that one failing rank ends the whole job with its message (exit 1) instead of leaving the others waiting") { rank };
        abort.SetAction(r => RunAbort(r.GetValue(rank)));
        return new Command("selftest", "Checks of this machine and launch") { collectives, abort };
    }

    /// <summary>One collective's check: its name and the first wrong value, or null.</summary>
    public sealed record Check(string Collective, string? Problem);

    /// <summary>Every check on <paramref name="c"/>; values are small integers, so sums are exact in any order.</summary>
    public static List<Check> Checks(ICollectives c, Backend backend)
    {
        int r = c.Rank, n = c.WorldSize;
        var checks = new List<Check>();
        void Expect(string name, Func<int, double> expected, ReadOnlySpan<double> got)
        {
            string? problem = null;
            for (int i = 0; i < got.Length && problem is null; i++)
                if (got[i] != expected(i)) problem = $"element {i} is {got[i]}, expected {expected(i)}";
            checks.Add(new Check(name, problem));
        }
        var sum = Enumerable.Range(0, 1000).Select(i => (double)(r + 1) * (i % 7 + 1)).ToArray();
        c.AllReduceSum(sum);
        Expect("all_reduce sum (fp64, host)", i => n * (n + 1) / 2.0 * (i % 7 + 1), sum);
        var max = Enumerable.Range(0, 1000).Select(i => (double)((r * 31 + i) % (n + 3))).ToArray();
        c.AllReduceMax(max);
        Expect("all_reduce max (fp64, host)", i => Enumerable.Range(0, n).Max(k => (double)((k * 31 + i) % (n + 3))), max);
        using (var t = backend.FromArray(Enumerable.Range(0, 4096).Select(i => (float)(r - i % 5)).ToArray(), Engine.Tensors.DType.F32, [4096]))
        {
            c.AllReduceSum(t);
            Expect("all_reduce sum (fp32 tensor)", i => Enumerable.Range(0, n).Sum(k => (double)(k - i % 5)), t.ToFloatArray().Select(x => (double)x).ToArray());
        }
        var bytes = Enumerable.Range(0, 777).Select(i => (byte)(r * 13 + i)).ToArray();
        c.Broadcast(bytes, n - 1);
        Expect("broadcast (from the last rank)", i => (byte)((n - 1) * 13 + i), bytes.Select(x => (double)x).ToArray());
        var mine = Enumerable.Range(0, 300).Select(i => (float)(r * 1000 + i)).ToArray();
        var all = new float[300 * n];
        c.AllGather(mine, all);
        Expect("all_gather", i => i / 300 * 1000 + i % 300, all.Select(x => (double)x).ToArray());
        var blocks = Enumerable.Range(0, 200 * n).Select(i => (float)(r + i)).ToArray();
        var part = new float[200];
        c.ReduceScatterSum(blocks, part);
        Expect("reduce_scatter sum", i => Enumerable.Range(0, n).Sum(k => (double)(k + r * 200 + i)), part.Select(x => (double)x).ToArray());
        var group = c.Split(r % 2, r);
        var inGroup = new double[] { r, 1 };
        group.AllReduceSum(inGroup);
        var members = Enumerable.Range(0, n).Where(k => k % 2 == r % 2).ToArray();
        Expect("split (even and odd ranks) + all_reduce", i => i == 0 ? members.Sum() : members.Length, inGroup);
        checks.Add(new Check("split rank and size", group.Rank == Array.IndexOf(members, r) && group.WorldSize == members.Length ? null
            : $"rank {group.Rank} of {group.WorldSize}, expected {Array.IndexOf(members, r)} of {members.Length}"));
        (group as MpiCollectives)?.Free();
        if (c is MpiCollectives or Engine.Backends.Cuda.NcclCollectives)
        {
            int node = MpiCollectives.NodeRank();
            checks.Add(new Check("local rank (node's shared-memory group)", node == c.LocalRank ? null : $"the launcher says local rank {c.LocalRank}, MPI's shared-memory split {node}"));
        }
        c.Barrier();
        checks.Add(new Check("barrier", null));
        return checks;
    }

    /// <summary>Rank <paramref name="failing"/> throws while every other rank waits in a barrier: the job must end, not hang.</summary>
    public static int RunAbort(int failing)
    {
        var c = Launch.Collectives();
        if (failing < 0 || failing >= c.WorldSize) throw new ArgumentException($"--rank {failing} is not a rank of this launch of {c.WorldSize}");
        if (c.Rank == failing) throw new InvalidOperationException($"a deliberate failure on rank {failing} (engine selftest abort)");
        c.Barrier(); // never completes: the failing rank aborts the job
        return 0;
    }

    public static int RunCollectives(string sizes, string backendName = "cpu")
    {
        var c = Launch.Collectives();
        using var backend = Backends.Create(backendName, c.LocalRank);
        c = Launch.ForBackend(c, backend);
        var checks = Checks(c, backend);
        var wrong = checks.Where(k => k.Problem is not null).ToList();
        foreach (var k in wrong) Console.Error.WriteLine($"rank {c.Rank}: {k.Collective}: {k.Problem}");
        var failed = new double[] { wrong.Count };
        c.AllReduceSum(failed);
        // The all-reduce a gradient takes: an fp32 tensor of the backend (host staging through MPI on the CPU, NCCL on CUDA).
        var table = new Table().AddColumns($"fp32 tensor elements ({backend.Name})", "MB", "median (ms)", "bus GB/s");
        foreach (var n in sizes.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse))
        {
            using var data = backend.Allocate(Engine.Tensors.DType.F32, [Math.Max(1, n)], "selftest.bandwidth");
            var times = new List<double>();
            for (int i = 0; i < 6; i++)
            {
                c.Barrier();
                var sw = Stopwatch.StartNew();
                c.AllReduceSum(data);
                if (i > 0) times.Add(sw.Elapsed.TotalMilliseconds);
            }
            times.Sort();
            double ms = times[times.Count / 2], mb = n * 4 / 1e6;
            double bus = c.WorldSize == 1 ? 0 : 2.0 * (c.WorldSize - 1) / c.WorldSize * n * 4 / (ms / 1e3) / 1e9;
            table.AddRow(n.ToString(), mb.ToString("F2"), ms.ToString("F3"), bus.ToString("F2"));
        }
        if (c.Rank == 0)
        {
            AnsiConsole.MarkupLineInterpolated($"{c.WorldSize} rank(s) ({c.GetType().Name}), local rank {c.LocalRank} on this node{(c is not SingleProcessCollectives ? $"; MPI handle ABI: {Interop.Mpi.Abi}" : "")}{(c is Engine.Backends.Cuda.NcclCollectives ? $"; NCCL {Interop.Nccl.Version()}" : "")}");
            var results = new Table().AddColumns("collective", "rank 0");
            foreach (var k in checks) results.AddRow(Markup.Escape(k.Collective), k.Problem is null ? "ok" : Markup.Escape(k.Problem));
            AnsiConsole.Write(results);
            AnsiConsole.Write(table);
            if (failed[0] == 0) AnsiConsole.MarkupLineInterpolated($"all {checks.Count} collectives match the host computation on {c.WorldSize} rank(s)");
            else AnsiConsole.MarkupLineInterpolated($"{failed[0]} check(s) failed across the ranks (each rank printed its own)");
        }
        c.Barrier();
        (c as IDisposable)?.Dispose();
        if (c.WorldSize > 1 || c is MpiCollectives) Interop.Mpi.FinalizeIfInitialized();
        return failed[0] == 0 ? 0 : 1;
    }
}
