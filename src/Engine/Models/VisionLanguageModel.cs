using System.Text.Json;
using System.Text.Json.Nodes;
using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Checkpoints;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>
/// A packed batch: several sequences in one token buffer. Tokens, targets [T] (Backend.IgnoreIndex where no loss),
/// sequence boundaries cu_seqlens [S + 1], and the image tiles [n, 3, S, S] whose features replace the
/// &lt;IMG_CONTEXT&gt; tokens in order (or the rows in <c>ImagePositions</c> when given: a generated &lt;IMG_CONTEXT&gt;
/// in a response is an ordinary token).
/// </summary>
/// <param name="TileSources">For each of the <paramref name="Tiles"/> tiles, the index of its pixels among the tiles in
/// <paramref name="Pixels"/>, which then holds each distinct image once (a GRPO group's samples share their prompt's
/// image); null when <paramref name="Pixels"/> holds every tile in order.</param>
/// <param name="ExpandRows">With shared prefixes (<see cref="PackShared"/>): the token arrays hold each distinct row
/// once (T'), <paramref name="CuSeqlens"/> describes the per-sequence attention layout (T rows), and this [T] names
/// the distinct row each attention row reads (see <see cref="SharedRows"/>). Null: every row is its own.</param>
/// <param name="OutputRows">With shared prefixes: [T'], the attention row whose output each distinct row takes.</param>
/// <param name="Positions">With shared prefixes: [T'], each distinct row's position in its sequences.</param>
public sealed record VlmBatch(int[] InputIds, int[] Targets, int[] CuSeqlens, float[]? Pixels = null, int Tiles = 0, int[]? ImagePositions = null,
    int[]? TileSources = null, int[]? ExpandRows = null, int[]? OutputRows = null, int[]? Positions = null)
{
    /// <summary>One sequence; targets are the next tokens from <paramref name="lossFrom"/> on (teacher forcing).</summary>
    public static VlmBatch Single(int[] ids, float[]? pixels = null, int tiles = 0, int lossFrom = 0)
    {
        var targets = new int[ids.Length];
        for (int t = 0; t < ids.Length; t++) targets[t] = t + 1 < ids.Length && t + 1 >= lossFrom ? ids[t + 1] : Backend.IgnoreIndex;
        return new VlmBatch(ids, targets, [0, ids.Length], pixels, tiles);
    }

    /// <summary>
    /// Packs prompt + response sequences (each with its own image tiles) into one batch for teacher forcing. Position
    /// t predicts token t + 1, so sequence i's response tokens are the targets of the positions from
    /// ResponseStarts[i] (its prompt's last position) on; every other target is ignored. Only image-context tokens
    /// inside a prompt take image features: a response that emits the token keeps it as an ordinary token. Sequences
    /// that share one pixel array (the same object) share its tiles: they are stored once and listed in TileSources.
    /// </summary>
    public static (VlmBatch Batch, int[] ResponseStarts) Pack(IReadOnlyList<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)> sequences, int imageContextId)
    {
        if (sequences.Count == 0) throw new ArgumentException("nothing to pack: no sequences");
        var ids = new List<int>();
        var targets = new List<int>();
        var cu = new List<int> { 0 };
        var imageRows = new List<int>();
        var starts = new int[sequences.Count];
        var tiles = new TileList();
        for (int i = 0; i < sequences.Count; i++)
        {
            var (prompt, response, px, n) = sequences[i];
            int p = prompt.Length;
            if (p == 0) throw new ArgumentException($"sequence {i} has an empty prompt");
            for (int k = 0; k < p; k++) if (prompt[k] == imageContextId) imageRows.Add(ids.Count + k);
            starts[i] = ids.Count + p - 1;
            ids.AddRange(prompt);
            ids.AddRange(response);
            for (int t = 0; t < p + response.Length; t++)
            {
                int k = t - (p - 1);
                targets.Add(k >= 0 && k < response.Length ? response[k] : Backend.IgnoreIndex);
            }
            cu.Add(ids.Count);
            if (n == 0) continue;
            if (px is null) throw new ArgumentException($"sequence {i} has {n} tiles but no pixels");
            tiles.Add(px, n);
        }
        return (new VlmBatch([.. ids], [.. targets], [.. cu], tiles.Pixels, tiles.Count, [.. imageRows], tiles.Sources), starts);
    }

    /// <summary>A batch's image tiles in order, each pixel array (by reference) stored once.</summary>
    private sealed class TileList
    {
        private readonly Dictionary<float[], int> _first = new(ReferenceEqualityComparer.Instance);
        private readonly List<float> _pixels = [];
        private readonly List<int> _sources = [];
        private int _distinct;

        public int Count { get; private set; }
        public float[]? Pixels => Count > 0 ? [.. _pixels] : null;

        /// <summary>Which stored tile each tile is; null when every tile is stored in order.</summary>
        public int[]? Sources => _distinct < Count ? [.. _sources] : null;

        public void Add(float[] pixels, int tiles)
        {
            if (!_first.TryGetValue(pixels, out int first))
            {
                _first[pixels] = first = _distinct;
                _pixels.AddRange(pixels);
                _distinct += tiles;
            }
            for (int k = 0; k < tiles; k++) _sources.Add(first + k);
            Count += tiles;
        }
    }

    /// <summary>
    /// Packs like <see cref="Pack"/>, except that sequences with the same prompt and image (equal contents: a GRPO
    /// group's samples) compute the prompt's rows once: every prompt token but the last is a shared row, and each
    /// sequence keeps its own last prompt token (whose logits predict its first response token) and response. The
    /// same log-probs and gradients as <see cref="Pack"/> up to the order of float sums, for a fraction of the
    /// token-wise work when responses are short beside the prompt. ResponseStarts index the distinct rows. Returns
    /// what <see cref="Pack"/> returns when no two sequences share a prompt.
    /// </summary>
    public static (VlmBatch Batch, int[] ResponseStarts) PackShared(IReadOnlyList<(int[] Prompt, int[] Response, float[]? Pixels, int Tiles)> sequences, int imageContextId)
    {
        if (sequences.Count == 0) throw new ArgumentException("nothing to pack: no sequences");
        var groupOf = new Dictionary<PromptKey, int>();
        var pixelHash = new Dictionary<float[], int>(ReferenceEqualityComparer.Instance); // a group's copies usually share one array
        var group = new int[sequences.Count];
        var sizes = new List<int>();
        for (int i = 0; i < sequences.Count; i++)
        {
            var (prompt, _, px, n) = sequences[i];
            if (prompt.Length == 0) throw new ArgumentException($"sequence {i} has an empty prompt");
            if (n > 0 && px is null) throw new ArgumentException($"sequence {i} has {n} tiles but no pixels");
            bool shareable = prompt.Length >= 2 && prompt[^1] != imageContextId;
            if (!shareable) { group[i] = sizes.Count; sizes.Add(1); continue; }
            int imageHash = 0;
            if (n > 0 && !pixelHash.TryGetValue(px!, out imageHash))
            {
                var h = new HashCode();
                h.AddBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(px.AsSpan()));
                pixelHash[px!] = imageHash = h.ToHashCode();
            }
            var key = new PromptKey(prompt, n > 0 ? px : null, n, imageHash);
            if (!groupOf.TryGetValue(key, out int g)) { groupOf[key] = g = sizes.Count; sizes.Add(0); }
            group[i] = g;
            sizes[g]++;
        }
        if (sizes.All(x => x == 1)) return Pack(sequences, imageContextId);

        var ids = new List<int>();
        var targets = new List<int>();
        var positions = new List<int>();
        var imageRows = new List<int>();
        var expand = new List<int>();
        var output = new List<int>();
        var cu = new List<int> { 0 };
        var starts = new int[sequences.Count];
        var tiles = new TileList();
        var prefixStart = new Dictionary<int, int>(); // group -> its first shared row

        void AddRow(int token, int target, int position, bool image)
        {
            if (image) imageRows.Add(ids.Count);
            output.Add(expand.Count);
            expand.Add(ids.Count);
            ids.Add(token);
            targets.Add(target);
            positions.Add(position);
        }

        for (int i = 0; i < sequences.Count; i++)
        {
            var (prompt, response, px, n) = sequences[i];
            int p = prompt.Length, g = group[i];
            int shared = sizes[g] > 1 ? p - 1 : 0;
            if (shared > 0)
            {
                if (prefixStart.TryGetValue(g, out int at))
                    for (int k = 0; k < shared; k++) expand.Add(at + k); // read the group's rows again
                else
                {
                    prefixStart[g] = ids.Count;
                    for (int k = 0; k < shared; k++) AddRow(prompt[k], Backend.IgnoreIndex, k, prompt[k] == imageContextId);
                    if (n > 0) tiles.Add(px!, n);
                }
            }
            for (int k = shared; k < p; k++)
                AddRow(prompt[k], k == p - 1 && response.Length > 0 ? response[0] : Backend.IgnoreIndex, k, prompt[k] == imageContextId);
            starts[i] = ids.Count - 1;
            for (int k = 0; k < response.Length; k++)
                AddRow(response[k], k + 1 < response.Length ? response[k + 1] : Backend.IgnoreIndex, p + k, false);
            if (shared == 0 && n > 0) tiles.Add(px!, n);
            cu.Add(expand.Count);
        }
        return (new VlmBatch([.. ids], [.. targets], [.. cu], tiles.Pixels, tiles.Count, [.. imageRows], tiles.Sources, [.. expand], [.. output], [.. positions]), starts);
    }

    /// <summary>A prompt and its image by content, for grouping the sequences that can share its rows.</summary>
    private readonly struct PromptKey(int[] prompt, float[]? pixels, int tiles, int imageHash) : IEquatable<PromptKey>
    {
        private readonly int[] _prompt = prompt;
        private readonly float[]? _pixels = pixels;
        private readonly int _tiles = tiles;
        private readonly int _hash = Hash(prompt, tiles, imageHash);

        private static int Hash(int[] prompt, int tiles, int imageHash)
        {
            var h = new HashCode();
            h.Add(tiles);
            h.Add(imageHash);
            h.AddBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(prompt.AsSpan()));
            return h.ToHashCode();
        }

        public bool Equals(PromptKey o) =>
            _hash == o._hash && _tiles == o._tiles && _prompt.AsSpan().SequenceEqual(o._prompt)
            && (ReferenceEquals(_pixels, o._pixels) || (_pixels is not null && o._pixels is not null && _pixels.AsSpan().SequenceEqual(o._pixels)));

        public override bool Equals(object? obj) => obj is PromptKey o && Equals(o);
        public override int GetHashCode() => _hash;
    }
}

/// <summary>
/// y = LLM(Adapter(ViT(image)), text). Forward keeps what backward needs (or recomputes it per layer with
/// activation checkpointing); backward runs only as far as a trainable part needs: with the adapter alone trainable,
/// gradients flow back through the frozen LLM to the adapter and stop there.
/// </summary>
public sealed class VisionLanguageModel : IDisposable
{
    private readonly Backend _b;
    private readonly VisionEncoder _vit;
    private readonly VisionAdapter _adapter;
    private readonly Qwen2Decoder _llm;
    private readonly Norm _finalNorm;
    private readonly Parameter _embed, _head;

    public VisionLanguageModel(Backend backend, VlmConfig config, ParameterStore parameters, int imageContextId)
    {
        _b = backend;
        Config = config;
        Parameters = parameters;
        ImageContextId = imageContextId;
        int layers = config.SelectLayer >= 0 ? config.SelectLayer : config.Vision.NumLayers + 1 + config.SelectLayer;
        _vit = new VisionEncoder(backend, config.Vision, parameters, layers, config.ForceImageSize);
        _adapter = new VisionAdapter(backend, config, parameters);
        _llm = new Qwen2Decoder(backend, config.Llm, parameters);
        _finalNorm = new Norm(backend, parameters["language_model.model.norm.weight"], null, false, config.Llm.RmsNormEps);
        _embed = parameters["language_model.model.embed_tokens.weight"];
        _head = config.Llm.TieWordEmbeddings ? _embed : parameters["language_model.lm_head.weight"];
    }

    /// <summary>How the decoder, the embedding and the LM head are cut over ranks (<see cref="TensorParallel.None"/>: whole).</summary>
    public TensorParallel TensorParallel => Parameters.TensorParallel;

    /// <summary>
    /// Token embeddings of <paramref name="ids"/> into <paramref name="output"/> [T, D]. Vocabulary parallel: each rank
    /// looks up the ids its rows hold, zero elsewhere, and the ranks' rows are summed.
    /// </summary>
    private void LookUp(int[] ids, Tensor output)
    {
        var tp = TensorParallel;
        if (tp.Size == 1)
        {
            using var all = _b.FromArray(ids, [ids.Length], "input_ids");
            _b.EmbeddingForward(_embed.Value, all, output);
            return;
        }
        var (positions, localIds) = LocalIds(ids);
        _b.Zero(output);
        if (positions.Length > 0)
        {
            using var tid = _b.FromArray(localIds, [localIds.Length], "local_input_ids");
            using var rows = _b.Activations(positions.Length, output.Cols);
            _b.EmbeddingForward(_embed.Value, tid, rows);
            using var index = _b.Rows(positions, ids.Length, distinct: true, "local_id_rows");
            _b.ScatterRows(rows, index, output);
        }
        tp.AllReduce(output);
    }

    /// <summary>The positions whose id lies in this rank's vocabulary rows, and those ids relative to its first row.</summary>
    private (int[] Positions, int[] LocalIds) LocalIds(int[] ids)
    {
        int rows = _embed.Value.Dim(0), start = TensorParallel.Rank * rows;
        var positions = Enumerable.Range(0, ids.Length).Where(i => ids[i] >= start && ids[i] < start + rows).ToArray();
        return (positions, [.. positions.Select(i => ids[i] - start)]);
    }

    /// <summary>The embedding's gradient from d embeddings [T, D] (this rank's vocabulary rows only, when cut).</summary>
    private void LookUpBackward(Tensor dEmbeddings, Pass pass)
    {
        if (TensorParallel.Size == 1)
        {
            _b.EmbeddingBackward(dEmbeddings, pass.Ids, _embed.Grad!);
            return;
        }
        var (positions, localIds) = LocalIds(pass.Ids.ToIntArray());
        if (positions.Length == 0) return;
        using var tid = _b.FromArray(localIds, [localIds.Length], "local_input_ids");
        using var rows = _b.Activations(positions.Length, dEmbeddings.Cols);
        using var index = _b.Rows(positions, (int)pass.Ids.Length, distinct: true, "local_id_rows");
        _b.GatherRows(dEmbeddings, index, rows);
        _b.EmbeddingBackward(rows, tid, _embed.Grad!);
    }

    /// <summary>Logits [rows, V] fp32 from a vocabulary-parallel head's local [rows, V / tp]: every rank's columns gathered.</summary>
    private Tensor GatherVocabulary(Tensor local)
    {
        var tp = TensorParallel;
        if (tp.Size == 1) return local;
        using (local)
        {
            int rows = local.Rows, part = local.Cols;
            var mine = local.ToFloatArray();
            var all = new float[mine.Length * tp.Size];
            tp.Group.AllGather(mine, all);
            var logits = new float[all.Length];
            for (int r = 0; r < tp.Size; r++)
                for (int i = 0; i < rows; i++)
                    Array.Copy(all, (long)r * mine.Length + (long)i * part, logits, (long)i * part * tp.Size + r * part, part);
            return _b.FromArray(logits, DType.F32, [rows, part * tp.Size], "logits");
        }
    }

    public VlmConfig Config { get; }
    public ParameterStore Parameters { get; }
    public int ImageContextId { get; }
    public Backend Backend => _b;

    /// <summary>Recompute each ViT / LLM layer's activations in backward instead of keeping them.</summary>
    public bool CheckpointVit { get => _vit.CheckpointLayers; set => _vit.CheckpointLayers = value; }
    public bool CheckpointLlm { get => _llm.CheckpointLayers; set => _llm.CheckpointLayers = value; }

    private bool VitTrainable => Parameters.All.Any(p => p.Name.StartsWith(VlmWeights.Vit, StringComparison.Ordinal) && p.Parameter.Trainable);
    private bool AdapterTrainable => Parameters.All.Any(p => p.Name.StartsWith(VlmWeights.Adapter, StringComparison.Ordinal) && p.Parameter.Trainable);
    private bool LlmTrainable => Parameters.All.Any(p => p.Name.StartsWith(VlmWeights.Llm, StringComparison.Ordinal) && p.Parameter.Trainable);

    /// <summary>Loads config.json, the safetensors weights and the &lt;IMG_CONTEXT&gt; id from tokenizer.json.</summary>
    /// <param name="optional">Extra tensors the checkpoint may hold beside the VLM's (a reward head); not loaded here.</param>
    /// <param name="share">Frozen parameters come from the backend's shared set (a second model over the same files
    /// references them: <see cref="Backend.Frozen"/>); false loads a private copy of everything.</param>
    /// <param name="tensorParallel">Each rank loads its slice of the decoder, embedding and LM head (<see cref="TensorParallel"/>).</param>
    public static VisionLanguageModel Load(Backend backend, string directory, TrainableParts trainable = TrainableParts.None,
        IReadOnlyDictionary<string, int[]>? optional = null, bool share = true, TensorParallel? tensorParallel = null)
    {
        var config = VlmConfig.Load(Path.Combine(directory, "config.json"));
        int imageContext = TokenizerFiles.SpecialTokenId(Path.Combine(directory, "tokenizer.json"), TokenizerFiles.ImageContext);
        using var checkpoint = Checkpoint.Open(directory);
        return new VisionLanguageModel(backend, config, ParameterStore.FromCheckpoint(backend, config, checkpoint, trainable, optional, share, tensorParallel), imageContext);
    }

    /// <summary>
    /// Writes config.json and every weight (fp32 masters when present, else the stored values) in the HF layout, in
    /// <paramref name="dtype"/>, sharded at <paramref name="maxShardBytes"/>, one tensor at a time on the host.
    /// </summary>
    /// <param name="whole">Tensor parallel: the whole values <see cref="GatherWhole"/> collected (on the rank that writes).</param>
    public void Save(string directory, string dtype = "F32", long maxShardBytes = CheckpointExport.ShardBytes, IEnumerable<Parameter>? extra = null,
        IReadOnlyDictionary<string, float[]>? whole = null) =>
        Write(directory, Parameters.All.Select(p => (p.Name, p.Parameter)).Concat((extra ?? []).Select(p => (p.Name, p))), dtype, maxShardBytes, whole);

    /// <summary>
    /// Tensor parallel: every parameter (or the trainable ones) whole, gathered from the group's slices one tensor at a
    /// time: every rank of the group calls it (it is a collective), rank 0 of the group keeps the values, the others get
    /// null. Without tensor parallelism: null (the tensors are whole already).
    /// </summary>
    public Dictionary<string, float[]>? GatherWhole(bool trainableOnly)
    {
        var tp = TensorParallel;
        if (tp.Size == 1) return null;
        var shapes = VlmWeights.Expected(Config).ToDictionary(x => x.Name, x => x.Shape);
        var whole = new Dictionary<string, float[]>();
        foreach (var (name, p) in Parameters.All.Where(p => !trainableOnly || p.Parameter.Trainable))
        {
            var values = TensorParallel.CutOf(name) == TensorParallel.Cut.Whole ? null : tp.Gather(name, shapes[name], p.Weights.ToFloatArray());
            if (tp.Rank == 0) whole[name] = values ?? p.Weights.ToFloatArray();
        }
        return tp.Rank == 0 ? whole : null;
    }

    /// <summary>
    /// A lean training checkpoint: config.json, the trainable parameters' fp32 masters (and <paramref name="extra"/>
    /// tensors, such as a reward head) as model.safetensors, and base.json naming the checkpoint every frozen tensor
    /// comes from (<see cref="Checkpoint.Open"/> layers the two). Frozen parts cost nothing per checkpoint.
    /// </summary>
    public void SaveTrainable(string directory, Checkpoint.BaseReference baseReference, IEnumerable<Parameter>? extra = null, IReadOnlyDictionary<string, float[]>? whole = null)
    {
        Write(directory, Parameters.All.Where(p => p.Parameter.Trainable).Select(p => (p.Name, p.Parameter)).Concat((extra ?? []).Select(p => (p.Name, p))),
            "F32", long.MaxValue, whole);
        Checkpoint.WriteBase(directory, baseReference);
    }

    private void Write(string directory, IEnumerable<(string Name, Parameter Parameter)> parameters, string dtype, long maxShardBytes,
        IReadOnlyDictionary<string, float[]>? whole = null)
    {
        var tensors = parameters.ToList();
        if (TensorParallel.Size > 1 && whole is null)
            throw new InvalidOperationException("a tensor-parallel model is written from its whole values: GatherWhole on every rank of the group first");
        var shapes = TensorParallel.Size == 1 ? null : VlmWeights.Expected(Config).ToDictionary(x => x.Name, x => x.Shape);
        Directory.CreateDirectory(directory);
        Checkpoint.SaveStreamed(directory,
            [.. tensors.Select(t => (t.Name, shapes is not null && shapes.TryGetValue(t.Name, out var s) ? s : t.Parameter.Weights.Shape.ToArray()))],
            i => whole is not null && whole.TryGetValue(tensors[i].Name, out var v) ? v : tensors[i].Parameter.Weights.ToFloatArray(), dtype, maxShardBytes);
        WriteConfig(directory);
    }

    private void WriteConfig(string directory)
    {
        var path = Path.Combine(directory, "config.json");
        File.WriteAllText(path + ".tmp", Config.ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(path + ".tmp", path, overwrite: true);
    }

    /// <summary>The forward's results and what backward needs.</summary>
    public sealed class Pass : IDisposable
    {
        internal readonly Activations Held = new();
        internal ImagePass? Image;
        internal Qwen2Decoder.State Llm = null!;
        internal RowIndex? ImageRows;
        internal Tensor Ids = null!, Positions = null!, Embeddings = null!, Final = null!;
        internal ScoredRows? Scored; // the LM head's pass 1 over the rows with a target (with the loss only)
        internal NormCache FinalNorm = null!;
        internal PackedSequences Sequences = null!;
        internal SharedRows? Shared;
        internal int Counted;

        /// <summary>log p(target_t) per token (0 where ignored).</summary>
        public float[] LogProbs { get; internal set; } = [];

        /// <summary>Final hidden states after the last norm [T, D] (what the LM head reads).</summary>
        public Tensor Hidden => Final;

        /// <summary>Mean negative log-likelihood over the tokens with a target.</summary>
        public double Loss { get; internal set; }

        public void Dispose()
        {
            Held.Dispose();
            Image?.Dispose();
            Llm?.Dispose();
        }
    }

    /// <summary>
    /// Every row's logits [T, V] fp32 on the host, made on demand from the pass's final hidden states: for inspecting a
    /// model against a reference at small vocabularies. No stage calls it; their log-probs come from <see cref="ChunkedLmHead"/>.
    /// </summary>
    public float[] FullLogits(Pass pass)
    {
        using var logits = GatherVocabulary(Linear.ForwardF32(_b, pass.Final, _head.Value));
        return logits.ToFloatArray();
    }

    /// <summary>
    /// Called during backward with each parameter whose gradient for the pass is complete (the LM head and final norm,
    /// then each decoder layer from the top): a data-parallel run starts reducing gradients while backward goes on.
    /// Parameters not named here (embedding, adapter, ViT) are complete when backward returns.
    /// </summary>
    public Action<Parameter>? GradientReady { get; set; }

    /// <summary>Vocabulary rows per chunk of the LM head (<see cref="ChunkedLmHead"/>): the loss's logits are [scored rows, chunk] fp32.</summary>
    public int VocabChunk { get; set; } = ChunkedLmHead.DefaultChunk;

    /// <summary>The LM head's weight (the token embedding when they are tied).</summary>
    public Parameter LmHead => _head;

    /// <summary>
    /// Forward through the final norm. With <paramref name="withLoss"/> (the default) also the LM head's log-probs of the
    /// batch's targets (<see cref="ChunkedLmHead"/>: only the rows with a target, the vocabulary in chunks, never
    /// [T, V]) and their mean NLL; without it the pass ends at the final hidden states
    /// (<see cref="Pass.Hidden"/>), for losses that fuse the head themselves (GRPO, reward heads).
    /// </summary>
    public Pass Forward(VlmBatch batch, bool withLoss = true)
    {
        var c = Config;
        int t = batch.InputIds.Length;
        if (batch.Targets.Length != t) throw new ArgumentException($"targets has {batch.Targets.Length} entries, input_ids {t}");
        bool sharedRows = batch.ExpandRows is not null;
        if (sharedRows != (batch.OutputRows is not null) || sharedRows != (batch.Positions is not null))
            throw new ArgumentException("a batch with shared rows needs expand_rows, output_rows and positions together");
        if (sharedRows && batch.OutputRows!.Length != t) throw new ArgumentException($"output_rows has {batch.OutputRows.Length} entries, input_ids {t}");
        if (sharedRows && batch.Positions!.Length != t) throw new ArgumentException($"positions has {batch.Positions.Length} entries, input_ids {t}");
        var imagePositions = batch.ImagePositions ?? Enumerable.Range(0, t).Where(i => batch.InputIds[i] == ImageContextId).ToArray();
        int features = batch.Tiles * c.TokensPerTile;
        if (imagePositions.Length != features)
            throw new ArgumentException($"the batch has {imagePositions.Length} <IMG_CONTEXT> tokens but {batch.Tiles} image tiles x {c.TokensPerTile} tokens per tile = {features} image features");

        var pass = new Pass();
        var h = pass.Held;
        pass.Sequences = h.Keep(_b.Sequences(batch.CuSeqlens));
        int rows = sharedRows ? batch.ExpandRows!.Length : t;
        if (pass.Sequences.Tokens != rows)
            throw new ArgumentException(sharedRows ? $"cu_seqlens covers {pass.Sequences.Tokens} tokens, expand_rows has {rows}" : $"cu_seqlens covers {pass.Sequences.Tokens} tokens, input_ids has {t}");
        if (sharedRows) pass.Shared = h.Keep(new SharedRows(_b, batch.ExpandRows!, batch.OutputRows!));
        pass.Ids = h.Keep(_b.FromArray(batch.InputIds, [t], "input_ids"));
        pass.Positions = h.Keep(_b.FromArray(sharedRows ? batch.Positions! : pass.Sequences.Positions(), [t], "position_ids"));
        pass.Embeddings = h.Keep(_b.Activations(t, c.Llm.HiddenSize));
        LookUp(batch.InputIds, pass.Embeddings);

        if (batch.Tiles > 0)
        {
            pass.Image = ForwardImage(batch.Pixels ?? throw new ArgumentException("the batch has tiles but no pixel values"), batch.Tiles, batch.TileSources);
            pass.ImageRows = h.Keep(_b.Rows(imagePositions, t, distinct: true, "image_positions"));
            _b.ScatterRows(pass.Image.Tokens, pass.ImageRows, pass.Embeddings);
        }

        pass.Llm = _llm.Forward(pass.Embeddings, pass.Positions, pass.Sequences, pass.Shared);
        pass.Final = h.Keep(_finalNorm.Forward(pass.Llm.Output, out pass.FinalNorm)); h.Keep(pass.FinalNorm);
        pass.Counted = batch.Targets.Count(x => x != Backend.IgnoreIndex);
        if (!withLoss) return pass;
        pass.Scored = h.Keep(ChunkedLmHead.Forward(_b, pass.Final, _head, batch.Targets, 1f, VocabChunk, tensorParallel: TensorParallel));
        pass.LogProbs = pass.Scored.Spread(pass.Scored.RowLogProbs());
        pass.Loss = pass.Counted == 0 ? 0 : -pass.LogProbs.Sum(x => (double)x) / pass.Counted;
        return pass;
    }

    /// <summary>
    /// Token embeddings of <paramref name="ids"/> with the adapter's image features in the &lt;IMG_CONTEXT&gt; rows
    /// (inference: nothing is kept for backward). Returns [T, D], owned by the caller.
    /// </summary>
    /// <param name="imagePositions">The rows that take image features; by default every &lt;IMG_CONTEXT&gt; in
    /// <paramref name="ids"/> (a generated one, after the prompt, is an ordinary token: callers then pass the prompt's).</param>
    public Tensor Embed(int[] ids, float[]? pixels, int tiles, int[]? imagePositions = null)
    {
        int t = ids.Length;
        var positions = imagePositions ?? Enumerable.Range(0, t).Where(i => ids[i] == ImageContextId).ToArray();
        if (positions.Length != tiles * Config.TokensPerTile)
            throw new ArgumentException($"the prompt has {positions.Length} <IMG_CONTEXT> tokens but {tiles} image tiles x {Config.TokensPerTile} tokens per tile = {tiles * Config.TokensPerTile} image features");
        var embeddings = _b.Activations(t, Config.Llm.HiddenSize);
        LookUp(ids, embeddings);
        if (tiles > 0)
        {
            using var image = ForwardImage(pixels ?? throw new ArgumentException("image tiles but no pixel values"), tiles);
            using var rows = _b.Rows(positions, t, distinct: true, "image_positions");
            _b.ScatterRows(image.Tokens, rows, embeddings);
        }
        return embeddings;
    }

    /// <summary>The adapter's image tokens of some tiles, kept for <see cref="BackwardImage"/> (vision pretraining).</summary>
    public sealed class ImagePass : IDisposable
    {
        internal VisionEncoder.State Vit = null!;
        internal VisionAdapter.State Adapter = null!;
        internal Tensor? SharedVitOutput; // the frozen ViT's output of the distinct tiles, gathered per tile

        /// <summary>[tiles x tokens per tile, D]: what the LLM reads at the &lt;IMG_CONTEXT&gt; rows, in the same order.</summary>
        public Tensor Tokens => Adapter.Output;

        public void Dispose()
        {
            Adapter?.Dispose();
            SharedVitOutput?.Dispose();
            Vit?.Dispose();
        }
    }

    /// <summary>
    /// ViT and adapter forward alone: pixels [tiles, 3, S, S] -> image tokens. With <paramref name="tileSources"/>,
    /// pixels holds distinct tiles and tile i is pixels' tile tileSources[i]: a frozen ViT then encodes each distinct tile
    /// once and its output rows are gathered per tile (the same values: a tile's encoding depends on that tile alone);
    /// a trainable ViT encodes every tile, so that its backward sees each use.
    /// </summary>
    public ImagePass ForwardImage(float[] pixels, int tiles, int[]? tileSources = null)
    {
        if (tileSources is null)
        {
            var pass = new ImagePass { Vit = _vit.Forward(pixels, tiles, forBackward: VitTrainable) };
            pass.Adapter = _adapter.Forward(pass.Vit.Output, tiles);
            return pass;
        }
        if (tileSources.Length != tiles) throw new ArgumentException($"{tileSources.Length} tile sources for {tiles} tiles");
        int tileSize = 3 * Config.ForceImageSize * Config.ForceImageSize;
        if (pixels.Length % tileSize != 0) throw new ArgumentException($"pixel values hold {pixels.Length} floats, not a whole number of 3 x {Config.ForceImageSize} x {Config.ForceImageSize} tiles");
        int distinct = pixels.Length / tileSize;
        if (tileSources.Any(t => t < 0 || t >= distinct)) throw new ArgumentException($"a tile source lies outside the {distinct} distinct tiles");
        if (VitTrainable)
        {
            var all = new float[(long)tiles * tileSize];
            for (int i = 0; i < tiles; i++) Array.Copy(pixels, (long)tileSources[i] * tileSize, all, (long)i * tileSize, tileSize);
            return ForwardImage(all, tiles);
        }
        var shared = new ImagePass { Vit = _vit.Forward(pixels, distinct, forBackward: false) };
        int perTile = shared.Vit.Output.Rows / distinct, width = shared.Vit.Output.Dim(1);
        var rows = new int[tiles * perTile];
        for (int i = 0; i < tiles; i++)
            for (int r = 0; r < perTile; r++) rows[i * perTile + r] = tileSources[i] * perTile + r;
        shared.SharedVitOutput = _b.Activations(rows.Length, width);
        using (var index = _b.Rows(rows, shared.Vit.Output.Rows, distinct: false, "tile_rows")) _b.GatherRows(shared.Vit.Output, index, shared.SharedVitOutput);
        shared.Adapter = _adapter.Forward(shared.SharedVitOutput, tiles);
        return shared;
    }

    /// <summary>Gradients of the trainable ViT and adapter parameters from d loss / d image tokens.</summary>
    public void BackwardImage(ImagePass pass, Tensor dTokens)
    {
        if (!AdapterTrainable && !VitTrainable) return;
        var dVit = _adapter.Backward(pass.Adapter, dTokens, inputGradient: VitTrainable);
        if (dVit is null) return;
        using (dVit) _vit.Backward(pass.Vit, dVit);
    }

    /// <summary>Plain token embeddings (decode steps: a generated &lt;IMG_CONTEXT&gt; is an ordinary token there).</summary>
    public Tensor EmbedTokens(int[] ids)
    {
        var embeddings = _b.Activations(ids.Length, Config.Llm.HiddenSize);
        LookUp(ids, embeddings);
        return embeddings;
    }

    /// <summary>
    /// The decoder over <paramref name="embeddings"/> [T, D] at <paramref name="positions"/> with caller-supplied
    /// attention, then the final norm and LM head on the rows listed in <paramref name="outputRows"/>: logits [rows, V].
    /// </summary>
    public Tensor InferLogits(Tensor embeddings, int[] positions, int[] outputRows, Qwen2Decoder.Attend attend)
    {
        using var pos = _b.FromArray(positions, [positions.Length], "position_ids");
        using var hidden = _llm.Infer(embeddings, pos, attend);
        using var rows = _b.Rows(outputRows, hidden.Rows, distinct: false, "output_rows");
        using var last = _b.Activations(outputRows.Length, Config.Llm.HiddenSize);
        _b.GatherRows(hidden, rows, last);
        using var normed = _finalNorm.Forward(last, out var stats);
        stats.Dispose();
        // fp32 logits for sampling and its log-probs, whatever the storage type; a vocabulary-parallel head's gathered.
        return GatherVocabulary(Linear.ForwardF32(_b, normed, _head.Value));
    }

    /// <summary>Backward of the mean NLL of <paramref name="pass"/>; gradients accumulate into trainable parameters.</summary>
    public void Backward(Pass pass)
    {
        int t = (int)pass.Ids.Length;
        Backward(pass, Enumerable.Repeat(pass.Counted == 0 ? 0f : -1f / pass.Counted, t).ToArray());
    }

    /// <summary>Backward of any loss of the per-token log-probs, given d loss / d logprob for each position [T].</summary>
    public void Backward(Pass pass, float[] dLogProb)
    {
        int t = (int)pass.Ids.Length;
        if (dLogProb.Length != t) throw new ArgumentException($"{dLogProb.Length} log-prob gradients for {t} positions");
        bool needImage = pass.Image is not null && (AdapterTrainable || VitTrainable);
        if (!LlmTrainable && !needImage) return;
        if (pass.Scored is null) throw new InvalidOperationException("this pass ran without the loss: use BackwardFromHidden");
        using var dlogprob = _b.FromArray(pass.Scored.Pick(dLogProb), DType.F32, [pass.Scored.Rows.Length]);
        using var dFinal = ChunkedLmHead.Backward(_b, pass.Scored, _head, dlogprob, _b.ActivationType, VocabChunk);   // the pass's ScoredRows carry the group
        BackwardFromHidden(pass, dFinal);
    }

    /// <summary>
    /// Backward from a gradient with respect to the final hidden states [T, D] (any float type; converted to the
    /// activation type), for losses that applied the LM head themselves.
    /// </summary>
    public void BackwardFromHidden(Pass pass, Tensor dHidden)
    {
        var c = Config;
        bool needImage = pass.Image is not null && (AdapterTrainable || VitTrainable);
        if (!LlmTrainable && !needImage) return;
        using var held = new Activations();
        var dFinal = dHidden;
        if (dHidden.DType != _b.ActivationType)
        {
            dFinal = held.Keep(_b.Activations(dHidden.Rows, dHidden.Cols));
            _b.Convert(dHidden, dFinal);
        }
        var dOut = held.Keep(_finalNorm.Backward(dFinal, pass.Llm.Output, pass.FinalNorm));
        if (GradientReady is { } ready)
        {
            if (!c.Llm.TieWordEmbeddings) ready(_head);   // a tied head is the embedding: complete only at the end
            ready(_finalNorm.Weight);
        }
        var dEmb = held.Keep(_llm.Backward(pass.Llm, dOut, pass.Positions, pass.Sequences, pass.Shared, GradientReady));

        if (pass.ImageRows is not null)
        {
            if (needImage)
            {
                var dImage = held.Keep(_b.Activations(pass.ImageRows.Length, c.Llm.HiddenSize));
                _b.GatherRows(dEmb, pass.ImageRows, dImage);
                BackwardImage(pass.Image!, dImage);
            }
            // Image positions took adapter outputs, not token embeddings: their rows carry no embedding gradient.
            using var zeros = _b.Activations(pass.ImageRows.Length, c.Llm.HiddenSize);
            _b.ScatterRows(zeros, pass.ImageRows, dEmb);
        }
        if (_embed.Grad is not null) LookUpBackward(dEmb, pass);
    }

    public void Dispose()
    {
        _vit.Dispose();
        Parameters.Dispose();
    }
}

/// <summary>Reads the special tokens the model needs from a Hugging Face tokenizer.json.</summary>
public static class TokenizerFiles
{
    public const string ImageContext = "<IMG_CONTEXT>";

    public static int SpecialTokenId(string tokenizerJson, string content)
    {
        if (!File.Exists(tokenizerJson)) throw new FileNotFoundException($"tokenizer not found: {tokenizerJson}", tokenizerJson);
        JsonNode? root;
        try { root = JsonNode.Parse(File.ReadAllText(tokenizerJson)); }
        catch (JsonException e) { throw new InvalidDataException($"{tokenizerJson}: not valid JSON ({e.Message})"); }
        if (root?["added_tokens"] is JsonArray added)
            foreach (var tok in added)
                if (tok?["content"]?.GetValue<string>() == content && tok["id"] is JsonValue id) return id.GetValue<int>();
        if (root?["model"]?["vocab"] is JsonObject vocab && vocab[content] is JsonValue v) return v.GetValue<int>();
        throw new InvalidDataException($"{tokenizerJson}: no token '{content}' in added_tokens or the vocabulary");
    }
}
