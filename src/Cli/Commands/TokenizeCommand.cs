using System.CommandLine;
using System.Text.Json;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Cli.Commands;

/// <summary>`engine tokenize --model DIR [--ids] TEXT`: ids of a text as JSON, or with --ids the text of ids.</summary>
public static class TokenizeCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Checkpoint directory (or a tokenizer.json)", Required = true };
        var ids = new Option<bool>("--ids") { Description = "Decode: TEXT is a list of ids (JSON array or separated by spaces or commas)" };
        var text = new Argument<string>("text") { Description = "Text to encode (or ids to decode with --ids)" };
        var cmd = new Command("tokenize", "Encode text to token ids, or decode ids back to text") { model, ids, text };
        cmd.SetAction(r =>
        {
            Console.WriteLine(Run(r.GetValue(model)!, r.GetValue(text)!, r.GetValue(ids)));
            return 0;
        });
        return cmd;
    }

    public static string Run(string model, string text, bool decode)
    {
        var tokenizer = TextTokenizer.Load(model);
        if (!decode) return JsonSerializer.Serialize(tokenizer.Encode(text));
        var parts = text.Trim().TrimStart('[').TrimEnd(']').Split([',', ' ', '\t', '\n'], StringSplitOptions.RemoveEmptyEntries);
        var ids = parts.Select(p => int.TryParse(p, out var id) ? id : throw new ArgumentException($"'{p}' is not a token id")).ToArray();
        return tokenizer.Decode(ids);
    }
}
