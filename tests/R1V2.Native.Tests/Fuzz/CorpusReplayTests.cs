namespace R1V2.Native.Tests.Fuzz;

/// <summary>
/// Every committed corpus input through its parser's harness: it parses or fails with the documented error family,
/// within 20 s and the allocation limit. Crashes that fuzzing finds are added to the corpus and stay here as regression tests.
/// </summary>
public sealed class CorpusReplayTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-fuzz-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private static string Corpus => Path.Combine(TestPaths.RepositoryRoot, "tests", "fuzz", "corpus");

    public static TheoryData<string> Targets() => [.. Harnesses.Targets.Keys];

    [Theory]
    [MemberData(nameof(Targets))]
    public async Task EveryCorpusInput_ParsesOrFailsWithTheDocumentedErrors_InTime(string target)
    {
        var inputs = Directory.GetFiles(Path.Combine(Corpus, target)).Order(StringComparer.Ordinal).ToList();
        Assert.True(inputs.Count >= 4, $"{target}: {inputs.Count} corpus inputs");
        var failures = new List<string>();
        int parsed = 0;
        foreach (var input in inputs)
        {
            var work = Directory.CreateDirectory(Path.Combine(_dir, target + "-" + Path.GetFileName(input))).FullName;
            var run = Task.Run(() => Harnesses.Run(target, File.ReadAllBytes(input), work));
            if (await Task.WhenAny(run, Task.Delay(TimeSpan.FromSeconds(20))) != run) { failures.Add($"{Path.GetFileName(input)}: no answer within 20 s"); continue; }
            if (run.Exception?.InnerException is { } e)
            {
                if (!Harnesses.Documented(e)) failures.Add($"{Path.GetFileName(input)}: {e.GetType().Name}: {e.Message}");
            }
            else parsed++;
        }
        Assert.True(failures.Count == 0, $"{target}:\n  " + string.Join("\n  ", failures));
        Assert.True(parsed >= 1, $"{target}: no corpus input parsed (the seeds should include a valid one)");
    }
}
