using System.CommandLine;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Text;
using R1V2.Native.Trainer;
using R1V2.Native.Trainer.Data;
using R1V2.Native.Trainer.Tasks;
using Spectre.Console;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine eval --model DIR --data PATH [--samples k]`: pass@1, format rate, hallucination rate, accuracy per type.</summary>
public static class EvalCommand
{
    /// <summary>The digit task's reasoning lists what it sees as "I see the digits 3, 7": those are its digit claims.</summary>
    public const string DigitClaimPattern = DigitScenes.ClaimPattern;

    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Checkpoint directory", Required = true };
        var data = new Option<string>("--data") { Description = "Prompt dataset (JSONL or Parquet): question, answer, images, optional image_digits and type", Required = true };
        var samples = new Option<int>("--samples") { Description = "Samples per prompt (pass@1 is averaged over them)", DefaultValueFactory = _ => 1 };
        var maxNew = new Option<int>("--max-new-tokens") { DefaultValueFactory = _ => 256 };
        var temperature = new Option<float>("--temperature") { Description = "0 is greedy", DefaultValueFactory = _ => 0.6f };
        var topP = new Option<float>("--top-p") { DefaultValueFactory = _ => 0.95f };
        var seed = new Option<ulong>("--seed") { DefaultValueFactory = _ => 1UL };
        var limit = new Option<int>("--limit") { Description = "Evaluate only the first N prompts (0: all)", DefaultValueFactory = _ => 0 };
        var claims = new Option<string?>("--claim-pattern")
            { Description = $"Regex whose first group holds the digits a response claims to see (default: the answer's digits; the digit task uses \"{DigitClaimPattern}\")" };
        var output = new Option<string?>("--out") { Description = "Directory for eval.json, eval.md and samples.jsonl (default: MODEL/eval)" };
        var batch = new Option<int>("--batch") { Description = "Sequences decoded at once (the responses do not depend on it)", DefaultValueFactory = _ => 256 };
        var blocks = new Option<int>("--cache-blocks") { Description = "KV cache blocks of 16 tokens", DefaultValueFactory = _ => 4096 };
        var backend = Backends.Option();
        var cmd = new Command("eval", "Evaluate a model on a prompt dataset: pass@1 over k samples, format rate, hallucination rate, accuracy per question type")
            { model, data, samples, maxNew, temperature, topP, seed, limit, claims, output, batch, blocks, backend };
        cmd.SetAction(r => Run(r.GetValue(model)!, r.GetValue(data)!, new EvalSettings(r.GetValue(samples), r.GetValue(maxNew), r.GetValue(temperature),
            r.GetValue(topP), r.GetValue(seed), r.GetValue(claims), r.GetValue(blocks), r.GetValue(batch)), r.GetValue(limit), r.GetValue(output), r.GetValue(backend)!));
        return cmd;
    }

    public static int Run(string modelDir, string dataPath, EvalSettings settings, int limit, string? output, string backendName)
    {
        var dataset = new PromptDataset(dataPath, 0, shuffle: false);
        int n = limit > 0 ? Math.Min(limit, dataset.Count) : dataset.Count;
        var prompts = Enumerable.Range(0, n).Select(dataset.Read).ToList();
        using var backend = Backends.Create(backendName);
        using var vlm = VisionLanguageModel.Load(backend, modelDir);
        var tokenizer = TextTokenizer.Load(modelDir);
        var (result, samples) = AnsiConsole.Status().Start($"sampling {settings.Samples} response(s) for {n} prompts on {backend.Name}", _ =>
            Evaluation.Run(vlm, tokenizer, prompts, settings, modelDir, dataPath));
        AnsiConsole.Write(new Markup(Markup.Escape(Evaluation.Markdown(result))));
        foreach (var f in Evaluation.Write(output ?? Path.Combine(modelDir, "eval"), result, samples)) AnsiConsole.MarkupLineInterpolated($"wrote {f}");
        return 0;
    }
}
