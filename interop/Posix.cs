using System.Runtime.InteropServices;

namespace R1V2.Native.Interop;

/// <summary>
/// The POSIX calls .NET does not expose: fsync of a directory (after a rename, so that the new name survives a power
/// loss). A no-op on Windows, where NTFS journals renames.
/// </summary>
public static partial class Posix
{
    private const string Lib = "libc";
    private const int ReadOnly = 0, Directory = 0x10000; // O_RDONLY, O_DIRECTORY (Linux)

    [LibraryImport(Lib, EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int open(string path, int flags);

    [LibraryImport(Lib, EntryPoint = "fsync", SetLastError = true)]
    private static partial int fsync(int fd);

    [LibraryImport(Lib, EntryPoint = "close")]
    private static partial int close(int fd);

    /// <summary>Flushes a directory's entries to disk; throws <see cref="IOException"/> naming the directory and the errno.</summary>
    public static void FsyncDirectory(string path)
    {
        if (!OperatingSystem.IsLinux()) return;
        int fd = open(path, ReadOnly | Directory);
        if (fd < 0) throw new IOException($"open({path}) for fsync failed: errno {Marshal.GetLastPInvokeError()}");
        try
        {
            if (fsync(fd) != 0) throw new IOException($"fsync({path}) failed: errno {Marshal.GetLastPInvokeError()}");
        }
        finally { close(fd); }
    }
}
