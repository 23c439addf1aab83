using System.Runtime.CompilerServices;

// ILGPU's CPU accelerator emits the kernel launchers into a dynamic assembly that must see internal kernel types.
[assembly: InternalsVisibleTo("ILGPURuntime")]
[assembly: InternalsVisibleTo("R1V2.Native.Tests")]
