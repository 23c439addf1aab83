global using R1V2.Native.Engine.Backends;
global using R1V2.Native.Engine.Tensors;
global using R1V2.Native.Tests.Support;
global using Xunit;
