using System.Reflection;
using System.Reflection.Emit;
using R1V2.Native.Trainer.Config;
using YamlDotNet.Serialization.NamingConventions;

namespace R1V2.Native.Tests.Trainer;

/// <summary>
/// Every key <see cref="TrainConfig"/> accepts is read by some code path: its property getter is called from the trainer
/// or the CLI outside the config's own validation and serialisation. A key nothing reads would be accepted and silently
/// ignored. Found by scanning the IL of every method (lambdas, local functions and iterators included) for calls.
/// </summary>
public sealed class ConfigKeysReadTests
{
    /// <summary>Methods whose reads do not count: checking a value is not using it, and writing the resolved YAML reads all.</summary>
    private static readonly HashSet<string> NotUses = ["Validate", "ToYaml", "Load"];

    [Fact]
    public void EveryAcceptedKey_IsReadBySomeCodePath()
    {
        var keys = Keys(typeof(TrainConfig), "").ToList();
        Assert.True(keys.Count > 60, $"only {keys.Count} keys found");
        var called = new HashSet<MethodBase>();
        foreach (var assembly in new[] { typeof(TrainConfig).Assembly, typeof(R1V2.Native.Cli.Commands.InitCommand).Assembly })
            foreach (var type in assembly.GetTypes())
                foreach (var method in type.GetMethods(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly)
                             .Cast<MethodBase>().Concat(type.GetConstructors(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static)))
                {
                    if (type.DeclaringType is null && type == typeof(TrainConfig) && NotUses.Contains(method.Name)) continue;
                    if (IsInside(type, typeof(TrainConfig)) && NotUses.Contains(OuterMethodName(method))) continue;
                    foreach (var callee in Calls(method)) called.Add(callee);
                }
        var unread = keys.Where(k => !called.Contains(k.Getter)).Select(k => k.Key).ToList();
        Assert.True(unread.Count == 0, $"config keys that nothing reads: {string.Join(", ", unread)}");
    }

    [Fact]
    public void EveryAcceptedKey_IsInTheConfigReference()
    {
        var reference = File.ReadAllText(Path.Combine(TestPaths.RepositoryRoot, "docs", "CONFIG.md"));
        var missing = Keys(typeof(TrainConfig), "").Select(k => k.Key).Where(k => !reference.Contains($"`{k}`", StringComparison.Ordinal)).ToList();
        Assert.True(missing.Count == 0, $"keys missing from docs/CONFIG.md: {string.Join(", ", missing)}");
    }

    [Fact]
    public void TheScan_FindsAReadThatExists_AndMissesOneThatDoesNot()
    {
        // The scan itself: GrpoTrainer's own methods read grpo.group_size and never sft.batch (the SFT trainer's key).
        var calls = typeof(R1V2.Native.Trainer.GrpoTrainer).GetMethods(BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.DeclaredOnly)
            .SelectMany(Calls).ToHashSet();
        Assert.Contains(typeof(TrainConfig.GrpoConfig).GetProperty(nameof(TrainConfig.GrpoConfig.GroupSize))!.GetMethod!, calls);
        Assert.DoesNotContain(typeof(TrainConfig.SftConfig).GetProperty(nameof(TrainConfig.SftConfig.Batch))!.GetMethod!, calls);
    }

    private static bool IsInside(Type? type, Type outer)
    {
        for (; type is not null; type = type.DeclaringType) if (type == outer) return true;
        return false;
    }

    /// <summary>The user-written method a compiler-generated one belongs to ("&lt;Validate&gt;g__Require|0" -> Validate).</summary>
    private static string OuterMethodName(MethodBase m)
    {
        foreach (var name in new[] { m.Name, m.DeclaringType?.Name ?? "" })
            if (name.StartsWith('<') && name.IndexOf('>') > 1) return name[1..name.IndexOf('>')];
        return m.Name;
    }

    /// <summary>The snake_case key path and getter of every leaf setting (sections recurse).</summary>
    private static IEnumerable<(string Key, MethodInfo Getter)> Keys(Type type, string prefix)
    {
        foreach (var p in type.GetProperties(BindingFlags.Public | BindingFlags.Instance))
        {
            if (p.SetMethod is null || !p.SetMethod.IsPublic) continue;
            string key = prefix + UnderscoredNamingConvention.Instance.Apply(p.Name);
            if (p.PropertyType.IsClass && p.PropertyType.DeclaringType == typeof(TrainConfig))
                foreach (var inner in Keys(p.PropertyType, key + ".")) yield return inner;
            else yield return (key, p.GetMethod!);
        }
    }

    private static readonly Dictionary<short, OpCode> OpCodesByValue = typeof(OpCodes).GetFields(BindingFlags.Public | BindingFlags.Static)
        .Select(f => (OpCode)f.GetValue(null)!).ToDictionary(o => o.Value);

    /// <summary>The methods a method's IL calls (call, callvirt, newobj, ldftn, ldvirtftn).</summary>
    private static IEnumerable<MethodBase> Calls(MethodBase method)
    {
        var il = method.GetMethodBody()?.GetILAsByteArray();
        if (il is null) yield break;
        var typeArgs = method.DeclaringType is { IsGenericType: true } t ? t.GetGenericArguments() : null;
        var methodArgs = method.IsGenericMethod ? method.GetGenericArguments() : null;
        for (int i = 0; i < il.Length;)
        {
            short value = il[i] == 0xFE ? (short)(0xFE00 | il[i + 1]) : il[i];
            i += il[i] == 0xFE ? 2 : 1;
            var op = OpCodesByValue[value];
            switch (op.OperandType)
            {
                case OperandType.InlineMethod:
                    int token = BitConverter.ToInt32(il, i);
                    MethodBase? callee = null;
                    try { callee = method.Module.ResolveMethod(token, typeArgs, methodArgs); }
                    catch (ArgumentException) { }
                    if (callee is not null) yield return callee;
                    i += 4;
                    break;
                case OperandType.InlineSwitch:
                    i += 4 + 4 * BitConverter.ToInt32(il, i);
                    break;
                case OperandType.InlineNone: break;
                case OperandType.ShortInlineBrTarget or OperandType.ShortInlineI or OperandType.ShortInlineVar: i += 1; break;
                case OperandType.InlineVar: i += 2; break;
                case OperandType.InlineI8 or OperandType.InlineR: i += 8; break;
                default: i += 4; break;
            }
        }
    }
}
