using System.Text.Json;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Ranks;

// One rank of a multi-rank test scenario, started by the tests under mpirun: r1v2-ranks SCENARIO MODEL OUT [ARGS].
// Rank 0 writes the scenario's result as JSON to OUT; an error ends the whole job (MPI_Abort) with its message.
var group = Launch.Collectives();
try
{
    var result = args[0] switch
    {
        "grpo-step" => (object)Scenarios.GrpoStep(args[1], new R1V2.Native.Trainer.Parallel.DataParallel(group) { BucketValues = Scenarios.SmallBuckets }, Scenarios.Options.Parse(args[3..])),
        "tensor-parallel" => (object)Scenarios.TensorParallelStep(args[1], group, int.Parse(args[3]), Scenarios.Options.Parse(args[4..])),
        "step-memory" => (object)Scenarios.StepMemory(args[1], new R1V2.Native.Trainer.Parallel.DataParallel(group), args.Contains("--shard-optimizer")),
        _ => throw new ArgumentException($"unknown scenario '{args[0]}' (grpo-step, step-memory, tensor-parallel)"),
    };
    if (group.Rank == 0) File.WriteAllText(args[2], JsonSerializer.Serialize(result));
    group.Barrier();
    if (group.WorldSize > 1) R1V2.Native.Interop.Mpi.FinalizeIfInitialized();
    return 0;
}
catch (Exception e) when (group.WorldSize > 1)
{
    group.Abort($"{e.GetType().Name}: {e.Message}");
    return 1;
}
