using System.Text;
using R1V2.Native.Engine.Checkpoints;

namespace R1V2.Native.Tests.Checkpoints;

public sealed class SafetensorsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("r1v2-st-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly (string, int[], float[])[] Sample =
    [
        ("a.weight", [2, 3], [1f, -2f, 3.5f, 0f, 1e-20f, -7f]),
        ("b.bias", [3], [0.1f, 0.2f, 0.3f]),
        ("empty", [0, 4], []),
    ];

    /// <summary>A file written byte by byte: header length, header text, data.</summary>
    private string Raw(string header, int dataBytes, long? headerLength = null)
    {
        var path = Path.Combine(_dir, Guid.NewGuid().ToString("N") + ".safetensors");
        var h = Encoding.UTF8.GetBytes(header);
        using var fs = File.Create(path);
        fs.Write(BitConverter.GetBytes(headerLength ?? h.Length));
        fs.Write(h);
        fs.Write(new byte[dataBytes]);
        return path;
    }

    [Theory]
    [InlineData("F32")]
    [InlineData("BF16")]
    public void WriteThenRead_RoundTripsExactly_InTheStoredPrecision(string dtype)
    {
        var path = Path.Combine(_dir, "m.safetensors");
        SafetensorsFile.Write(path, Sample, dtype);
        using (var f = SafetensorsFile.Open(path))
        {
            Assert.Equal([2L, 3L], f.Info("a.weight").Shape);
            Assert.Equal(dtype, f.Info("b.bias").DType);
            foreach (var (name, _, data) in Sample)
                Assert.Equal(dtype == "F32" ? data : data.Select(BFloat16.Round).ToArray(), f.ReadFloats(name));
        }
        // Rewriting what was read gives the same bytes: load -> save -> load is exact.
        var again = Path.Combine(_dir, "again.safetensors");
        using (var f = SafetensorsFile.Open(path))
            SafetensorsFile.Write(again, Sample.Select(s => (s.Item1, s.Item2, f.ReadFloats(s.Item1))), dtype);
        Assert.Equal(File.ReadAllBytes(path), File.ReadAllBytes(again));
    }

    [Fact]
    public void Fp16Tensors_AreConvertedOnLoad()
    {
        var header = """{"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}""";
        var path = Raw(header, 0);
        using (var fs = new FileStream(path, FileMode.Append)) { fs.Write(BitConverter.GetBytes((Half)1.5f)); fs.Write(BitConverter.GetBytes((Half)(-0.25f))); }
        using var f = SafetensorsFile.Open(path);
        Assert.Equal([1.5f, -0.25f], f.ReadFloats("h"));
    }

    [Theory]
    [InlineData(-5L, "header length -5 is absurd")]
    [InlineData(1L << 40, "is absurd")]
    [InlineData(4096L, "runs past the end")]
    public void BadHeaderLength_IsAClearError(long length, string message)
    {
        var path = Raw("{}", 0, length);
        var e = Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(path));
        Assert.Contains(message, e.Message);
        Assert.Contains(path, e.Message);
    }

    [Theory]
    [InlineData("""{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""", 8, "tensor 't': data_offsets [0, 16] are outside the 8 data bytes")]
    [InlineData("""{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}""", 16, "tensor 't': 16 bytes do not hold shape [3]")]
    [InlineData("""{"t":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}""", 1, "tensor 't': unknown dtype 'Q4'")]
    [InlineData("""{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", 4, "tensor 't': shape [-1]")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", 12, "tensors 'a' and 'b' overlap")]
    [InlineData("""{"t": [1, 2""", 0, "not a JSON object")]
    public void InvalidHeaders_NameTheFileAndTensor(string header, int dataBytes, string message)
    {
        var path = Raw(header, dataBytes);
        var e = Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(path));
        Assert.Contains(message, e.Message);
        Assert.StartsWith(path, e.Message);
    }

    [Fact]
    public void TruncatedFile_IsAClearError()
    {
        var path = Path.Combine(_dir, "t.safetensors");
        SafetensorsFile.Write(path, Sample);
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..^8]);
        var e = Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(path));
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void ShardedCheckpoint_RoundTrips_AndIndexMismatchesAreErrors()
    {
        var tensors = Enumerable.Range(0, 6).Select(i => ($"layer.{i}.weight", new[] { 10, 10 }, TestData.Uniform(i, 100))).ToList();
        Checkpoint.Save(_dir, tensors, "F32", maxShardBytes: 900); // 400 bytes each: three shards of two
        Assert.True(File.Exists(Path.Combine(_dir, Checkpoint.IndexFile)));
        Assert.Equal(3, Directory.GetFiles(_dir, "model-*-of-00003.safetensors").Length);
        using (var ck = Checkpoint.Open(_dir))
        {
            foreach (var (name, shape, data) in tensors) Assert.Equal(data, ck.Read(name, shape));
            var e = Assert.Throws<CheckpointException>(() => ck.Read("layer.0.weight", [100]));
            Assert.Contains("has shape [10, 10], expected [100]", e.Message);
        }

        var expected = tensors.ToDictionary(t => t.Item1, t => t.Item2);
        expected.Remove("layer.5.weight");
        expected["layer.9.weight"] = [10, 10];
        expected["layer.0.weight"] = [5, 20];
        using (var ck = Checkpoint.Open(_dir))
        {
            var e = Assert.Throws<CheckpointException>(() => ck.Validate(expected));
            Assert.Contains("missing tensor 'layer.9.weight'", e.Message);
            Assert.Contains("unexpected tensor 'layer.5.weight'", e.Message);
            Assert.Contains("tensor 'layer.0.weight' has shape [10, 10], expected [5, 20]", e.Message);
        }

        var index = Path.Combine(_dir, Checkpoint.IndexFile);
        File.WriteAllText(index, File.ReadAllText(index).Replace("\"layer.1.weight\": \"model-00001-of-00003.safetensors\"", "\"layer.1.weight\": \"model-00002-of-00003.safetensors\""));
        var mismatch = Assert.Throws<CheckpointException>(() => Checkpoint.Open(_dir));
        Assert.Contains("tensor 'layer.1.weight' is listed in model.safetensors.index.json but missing from the shard", mismatch.Message);
    }

    [Fact]
    public void MissingCheckpoint_IsAClearError()
    {
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Open(_dir));
        Assert.Contains("neither model.safetensors nor model.safetensors.index.json", e.Message);
    }
}
