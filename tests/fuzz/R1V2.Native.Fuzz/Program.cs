using R1V2.Native.Tests.Fuzz;
using SharpFuzz;

// `R1V2.Native.Fuzz TARGET`: one parser harness under AFL++ (an undocumented exception, or an input over the allocation
// limit, is a crash AFL records);
// `R1V2.Native.Fuzz TARGET FILE`: one input once, for reproducing a finding.
if (args.Length < 1 || !Harnesses.Targets.ContainsKey(args[0]))
{
    Console.Error.WriteLine($"usage: R1V2.Native.Fuzz TARGET [FILE]; targets: {string.Join(", ", Harnesses.Targets.Keys)}");
    return 2;
}
var work = Directory.CreateTempSubdirectory("r1v2-afl-").FullName;
void Once(byte[] bytes)
{
    try { Harnesses.Run(args[0], bytes, work); }
    catch (Exception e) when (Harnesses.Documented(e)) { }
}
if (args.Length > 1)
{
    Once(File.ReadAllBytes(args[1]));
    return 0;
}
Fuzzer.OutOfProcess.Run(stream =>
{
    using var buffer = new MemoryStream();
    stream.CopyTo(buffer);
    Once(buffer.ToArray());
});
return 0;
