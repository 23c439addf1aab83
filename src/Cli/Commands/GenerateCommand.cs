using System.CommandLine;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Generation;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine generate` (one prompt, streamed) and `engine chat` (an interactive session with /image).</summary>
public static class GenerateCommand
{
    private sealed record Flags(Option<float> Temperature, Option<int> TopK, Option<float> TopP, Option<float> MinP, Option<float> Penalty,
        Option<int> MaxNew, Option<ulong> Seed, Option<string[]> Stop, Option<int> Blocks, Option<string> Backend);

    private static Flags SamplingFlags() => new(
        new("--temperature") { Description = "0 = greedy", DefaultValueFactory = _ => 0.6f },
        new("--top-k") { Description = "0 = off", DefaultValueFactory = _ => 0 },
        new("--top-p") { Description = "1 = off", DefaultValueFactory = _ => 0.95f },
        new("--min-p") { Description = "0 = off", DefaultValueFactory = _ => 0f },
        new("--repetition-penalty") { Description = "1 = off", DefaultValueFactory = _ => 1.05f },
        new("--max-new-tokens") { DefaultValueFactory = _ => 512 },
        new("--seed") { DefaultValueFactory = _ => 0UL },
        new("--stop") { Description = "Stop strings", AllowMultipleArgumentsPerToken = false },
        new("--cache-blocks") { Description = "KV cache blocks of 16 tokens", DefaultValueFactory = _ => 2048 },
        Backends.Option());

    private static void Add(Command c, Flags f)
    {
        foreach (var o in new Option[] { f.Temperature, f.TopK, f.TopP, f.MinP, f.Penalty, f.MaxNew, f.Seed, f.Stop, f.Blocks, f.Backend }) c.Options.Add(o);
    }

    private static SamplingParams Sampling(ParseResult r, Flags f) =>
        new(r.GetValue(f.Temperature), r.GetValue(f.TopK), r.GetValue(f.TopP), r.GetValue(f.MinP), r.GetValue(f.Penalty));

    public static Command CreateGenerate()
    {
        var model = new Option<string>("--model") { Description = "Checkpoint directory", Required = true };
        var images = new Option<string[]>("--image") { Description = "Image file(s) for the prompt" };
        var prompt = new Option<string>("--prompt") { Description = "The user's message", Required = true };
        var samples = new Option<int>("--samples") { Description = "Completions of the prompt (sharing its KV cache)", DefaultValueFactory = _ => 1 };
        var flags = SamplingFlags();
        var cmd = new Command("generate", "Generate a reply to one prompt (with images), streaming tokens") { model, images, prompt, samples };
        Add(cmd, flags);
        cmd.SetAction(r =>
        {
            using var backend = Backends.Create(r.GetValue(flags.Backend)!);
            using var vlm = VisionLanguageModel.Load(backend, r.GetValue(model)!);
            var runner = new ChatRunner(vlm, TextTokenizer.Load(r.GetValue(model)!), new GeneratorOptions(r.GetValue(flags.Blocks)));
            var turns = new[] { new ChatTurn("user", r.GetValue(prompt)!, r.GetValue(images) ?? []) };
            int n = r.GetValue(samples);
            var results = runner.Respond(turns, Sampling(r, flags), r.GetValue(flags.Seed), r.GetValue(flags.MaxNew), n, r.GetValue(flags.Stop),
                n == 1 ? (_, text) => Console.Write(text) : null);
            if (n == 1) Console.WriteLine();
            else
                foreach (var s in results) AnsiConsole.MarkupLineInterpolated($"[bold]sample {s.Sample}[/] ({s.Finish}, {s.Tokens.Length} tokens):\n{runner.Text(s)}\n");
            return 0;
        });
        return cmd;
    }

    public static Command CreateChat()
    {
        var model = new Option<string>("--model") { Description = "Checkpoint directory", Required = true };
        var flags = SamplingFlags();
        var cmd = new Command("chat", "Interactive chat: type a message; /image PATH attaches an image to the next one; /reset; /exit") { model };
        Add(cmd, flags);
        cmd.SetAction(r =>
        {
            using var backend = Backends.Create(r.GetValue(flags.Backend)!);
            using var vlm = VisionLanguageModel.Load(backend, r.GetValue(model)!);
            var runner = new ChatRunner(vlm, TextTokenizer.Load(r.GetValue(model)!), new GeneratorOptions(r.GetValue(flags.Blocks)));
            return Loop(runner, Console.In, Console.Out, Sampling(r, flags), r.GetValue(flags.Seed), r.GetValue(flags.MaxNew));
        });
        return cmd;
    }

    /// <summary>The chat loop over any reader and writer (the tests drive it with strings).</summary>
    public static int Loop(ChatRunner runner, TextReader input, TextWriter output, SamplingParams sampling, ulong seed, int maxNew)
    {
        var history = new List<ChatTurn>();
        var pending = new List<string>();
        output.WriteLine("chat: /image PATH attaches an image, /reset clears the conversation, /exit quits");
        ulong turn = 0;
        while (true)
        {
            output.Write("> ");
            var line = input.ReadLine();
            if (line is null || line.Trim() == "/exit") return 0;
            line = line.Trim();
            if (line.Length == 0) continue;
            if (line == "/reset") { history.Clear(); pending.Clear(); output.WriteLine("(conversation cleared)"); continue; }
            if (line.StartsWith("/image ", StringComparison.Ordinal))
            {
                var path = line["/image ".Length..].Trim();
                if (!File.Exists(path)) { output.WriteLine($"no such file: {path}"); continue; }
                pending.Add(path);
                output.WriteLine($"(attached {path} to the next message)");
                continue;
            }
            history.Add(new ChatTurn("user", line, [.. pending]));
            pending.Clear();
            try
            {
                var reply = runner.Respond(history, sampling, seed + turn++, maxNew, onText: (_, text) => output.Write(text)).Single();
                output.WriteLine();
                history.Add(ChatRunner.AssistantTurn(runner.Text(reply)));
            }
            catch (Exception e) when (e is InvalidDataException or FileNotFoundException or ArgumentException)
            {
                history.RemoveAt(history.Count - 1);
                output.WriteLine($"error: {e.Message}");
            }
        }
    }
}
