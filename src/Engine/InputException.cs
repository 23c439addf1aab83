namespace R1V2.Native.Engine;

/// <summary>
/// A problem with what the user gave (a file, a checkpoint, a setting, a data row, an argument): the message names the
/// thing and what was expected. The CLI reports it as <c>error: message</c> with exit code 1, never as a crash. Its
/// family: <see cref="Checkpoints.CheckpointException"/>; the .NET input exceptions (<see cref="InvalidDataException"/>,
/// <see cref="FileNotFoundException"/>, <see cref="ArgumentException"/>, <see cref="FormatException"/>) are reported the
/// same way.
/// </summary>
public class InputException(string message, Exception? inner = null) : Exception(message, inner);
