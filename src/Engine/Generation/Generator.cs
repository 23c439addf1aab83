using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Models;
using R1V2.Native.Engine.Tensors;
using R1V2.Native.Engine.Text;

namespace R1V2.Native.Engine.Generation;

/// <summary>
/// One prompt to complete. <see cref="Samples"/> completions share the prompt's cache blocks; sample i draws from the
/// RNG stream (Seed + i, step), so (seed, prompt) reproduces a sample on the same backend.
/// </summary>
public sealed record GenerationRequest(
    int[] PromptIds, float[]? Pixels = null, int Tiles = 0, SamplingParams? Sampling = null, ulong Seed = 0, int MaxNewTokens = 256,
    IReadOnlyList<int>? StopTokens = null, IReadOnlyList<string>? StopStrings = null, int Samples = 1);

/// <summary>Why a sample ended: a stop token or string, the length limit, or its request was cancelled.</summary>
public enum FinishReason { StopToken, StopString, Length, Cancelled }

/// <summary>A finished completion: its tokens (a final stop token included), the log-prob of each, text, and why it ended.</summary>
public sealed record GeneratedSample(int Request, int Sample, int[] Tokens, float[] LogProbs, string? Text, FinishReason Finish);

/// <summary>A token as it is produced, for streaming.</summary>
public readonly record struct TokenEvent(int Request, int Sample, int Token, float LogProb);

public sealed record GeneratorOptions(int CacheBlocks = 512, int BlockSize = 16, int MaxBatch = 32, int SplitBlocks = 8);

/// <summary>Counters of one <see cref="Generator.Generate"/> call.</summary>
public sealed record GenerationStats(int PrefillTokens, int DecodeSteps, int DecodedTokens, int Preemptions, int PeakBlocks, long CopiedBlocks, double PrefillSeconds, double DecodeSeconds);

/// <summary>
/// Batched generation of a fixed set of requests with continuous batching over a paged KV cache
/// (<see cref="GenerationLoop"/>): every request is submitted, then the loop steps until all have finished.
/// </summary>
public sealed class Generator(VisionLanguageModel model, TextTokenizer? tokenizer = null, GeneratorOptions? options = null)
{
    public GenerationStats? LastStats { get; private set; }

    public IReadOnlyList<GeneratedSample> Generate(IReadOnlyList<GenerationRequest> requests, Action<TokenEvent>? onToken = null)
    {
        using var loop = new GenerationLoop(model, tokenizer, options);
        var done = new List<GeneratedSample>();
        foreach (var r in requests) loop.Validate(r); // all of them before any runs
        for (int i = 0; i < requests.Count; i++)
        {
            int index = i;   // results and events name the request by its place in the list
            loop.Submit(requests[i], onToken is null ? null : e => onToken(e with { Request = index }), s => done.Add(s with { Request = index }));
        }
        while (!loop.Idle) loop.Step();
        LastStats = loop.Stats;
        return done.OrderBy(s => s.Request).ThenBy(s => s.Sample).ToList();
    }
}

/// <summary>
/// The generation loop: one owner of the model and the KV cache that requests join and leave at any step. Each
/// <see cref="Step"/> admits waiting prompts while the batch and the cache allow (one packed prefill through flash
/// attention for all of them, the prompt's blocks shared by its samples), then decodes one token for every running
/// sample (split-KV paged attention) and samples it. Finished or cancelled samples free their blocks at once, which lets
/// waiting prompts in. Policy when blocks run out mid-decode: preempt the most recently admitted sample (free its
/// blocks, requeue it with what it generated) and recompute it later by prefill; a request that cannot fit even alone
/// is an error. Sample i of a request draws from the RNG stream (seed + i, step), so its tokens do not depend on the
/// other requests in the batch. Not thread-safe: one thread submits, cancels and steps.
/// </summary>
public sealed class GenerationLoop : IDisposable
{
    private readonly VisionLanguageModel model;
    private readonly TextTokenizer? tokenizer;
    private readonly GeneratorOptions _o;
    private readonly PagedKvCache _cache;
    private readonly Dictionary<int, Submitted> _requests = new();
    private readonly LinkedList<Waiting> _waiting = new();
    private readonly List<Active> _running = new();
    private int _nextId, _admissions, _prefillTokens, _steps, _decoded, _preemptions;
    private readonly System.Diagnostics.Stopwatch _prefillTime = new(), _decodeTime = new();

    public GenerationLoop(VisionLanguageModel model, TextTokenizer? tokenizer = null, GeneratorOptions? options = null)
    {
        this.model = model;
        this.tokenizer = tokenizer;
        _o = options ?? new GeneratorOptions();
        var cfg = model.Config.Llm;
        // Tensor parallel: each rank caches its own kv heads; the logits come back whole, so every rank samples the same tokens.
        _cache = new PagedKvCache(model.Backend, cfg.NumLayers, cfg.NumKvHeads / model.TensorParallel.Size, cfg.HeadDim, _o.CacheBlocks, _o.BlockSize);
    }

    /// <summary>Nothing waiting or running.</summary>
    public bool Idle => _waiting.Count == 0 && _running.Count == 0;

    public int RunningSamples => _running.Count;
    public int WaitingSamples => _waiting.Sum(w => w.Samples.Length);
    public int UsedBlocks => _cache.UsedBlocks;
    public int FreeBlocks => _cache.FreeBlocks;
    public int Preemptions => _preemptions;

    public GenerationStats Stats => new(_prefillTokens, _steps, _decoded, _preemptions, _cache.PeakUsedBlocks, _cache.CopiedBlocks,
        _prefillTime.Elapsed.TotalSeconds, _decodeTime.Elapsed.TotalSeconds);

    /// <summary>Ids the tokenizer knows (the LM head may be padded wider); without a tokenizer every id can be drawn.</summary>
    private int? VocabularyLimit => tokenizer is null ? null : Math.Min(tokenizer.VocabularySize, model.Config.Llm.VocabSize);

    private sealed record Submitted(GenerationRequest Request, Action<TokenEvent>? OnToken, Action<GeneratedSample>? OnDone)
    {
        public int Remaining = Request.Samples;
    }

    private sealed class Active
    {
        public required int Request, Sample;
        public required CacheSequence Seq;
        public required List<int> Context;   // prompt + generated so far (the repetition penalty's view)
        public readonly List<int> Tokens = [];
        public readonly List<float> LogProbs = [];
        public int Pending = -1;             // sampled, not yet in the cache
        public int Slot;                     // this step's cache slot for the pending token
        public int Admitted;
    }

    private sealed record Waiting(int Request, int[] Samples, int[] Prefix, List<int>[]? Generated, List<float>[]? LogProbs);

    /// <summary>Throws (naming what is wrong) for a request this loop could never run.</summary>
    public void Validate(GenerationRequest r)
    {
        var cfg = model.Config.Llm;
        (r.Sampling ?? SamplingParams.Greedy).Validate();
        if (r.PromptIds.Length == 0) throw new ArgumentException("a prompt needs at least one token");
        if (r.Samples < 1 || r.Samples > _o.MaxBatch) throw new ArgumentException($"samples per request must be in [1, {_o.MaxBatch}], got {r.Samples}");
        if (r.MaxNewTokens < 1) throw new ArgumentException("max new tokens must be at least 1");
        if (r.PromptIds.Length + r.MaxNewTokens > cfg.MaxPositionEmbeddings)
            throw new ArgumentException($"prompt ({r.PromptIds.Length}) + max new tokens ({r.MaxNewTokens}) exceed max_position_embeddings {cfg.MaxPositionEmbeddings}");
        int needed = (r.PromptIds.Length + _o.BlockSize - 1) / _o.BlockSize + r.Samples;
        if (needed > _cache.NumBlocks) throw new ArgumentException($"the prompt needs {needed} cache blocks of {_o.BlockSize} tokens; the cache has {_cache.NumBlocks}");
        // The prompt's <IMG_CONTEXT> tokens take the image features, one per token: their count must match the tiles.
        int imageTokens = r.PromptIds.Count(id => id == model.ImageContextId), features = r.Tiles * model.Config.TokensPerTile;
        if (imageTokens != features)
            throw new ArgumentException($"the prompt has {imageTokens} <IMG_CONTEXT> tokens but {r.Tiles} image tiles x {model.Config.TokensPerTile} tokens per tile = {features} image features");
        long pixels = (long)r.Tiles * 3 * model.Config.ForceImageSize * model.Config.ForceImageSize;
        if ((r.Pixels?.Length ?? 0) != pixels)
            throw new ArgumentException($"{r.Tiles} image tiles need {pixels} pixel values, the request has {r.Pixels?.Length ?? 0}");
        // One sample at its full length must fit alone (preemption makes room for it by recomputing the others later).
        int full = (r.PromptIds.Length + r.MaxNewTokens + _o.BlockSize - 1) / _o.BlockSize + 1;
        if (full > _cache.NumBlocks)
            throw new ArgumentException($"prompt ({r.PromptIds.Length}) + max new tokens ({r.MaxNewTokens}) need {full} cache blocks of {_o.BlockSize} tokens; the cache has {_cache.NumBlocks}");
    }

    /// <summary>Queues a request (validated); its samples join at a later <see cref="Step"/>. Returns its id.</summary>
    public int Submit(GenerationRequest r, Action<TokenEvent>? onToken = null, Action<GeneratedSample>? onDone = null)
    {
        Validate(r);
        int id = _nextId++;
        _requests[id] = new Submitted(r, onToken, onDone);
        _waiting.AddLast(new Waiting(id, Enumerable.Range(0, r.Samples).ToArray(), r.PromptIds, null, null));
        return id;
    }

    /// <summary>Ends a request's samples now (waiting or running): their blocks are freed and each reports <see cref="FinishReason.Cancelled"/>.</summary>
    public void Cancel(int id)
    {
        if (!_requests.TryGetValue(id, out var sub)) return;
        for (var node = _waiting.First; node is not null;)
        {
            var next = node.Next;
            if (node.Value.Request == id)
            {
                for (int j = 0; j < node.Value.Samples.Length; j++)
                    Finish(id, node.Value.Samples[j], node.Value.Generated?[j] ?? [], node.Value.LogProbs?[j] ?? [], FinishReason.Cancelled);
                _waiting.Remove(node);
            }
            node = next;
        }
        foreach (var a in _running.Where(a => a.Request == id).ToList())
        {
            _cache.Release(a.Seq);
            _running.Remove(a);
            Finish(id, a.Sample, a.Tokens, a.LogProbs, FinishReason.Cancelled);
        }
    }

    private void Finish(int id, int sample, List<int> tokens, List<float> logprobs, FinishReason reason)
    {
        var sub = _requests[id];
        sub.OnDone?.Invoke(new GeneratedSample(id, sample, [.. tokens], [.. logprobs], tokenizer?.Decode(tokens), reason));
        if (--sub.Remaining == 0) _requests.Remove(id);
    }

    /// <summary>One iteration: admit what fits (one packed prefill), then one decode step for every running sample.</summary>
    public void Step()
    {
        var cache = _cache;
        var running = _running;
        var waiting = _waiting;
        // Admit while the batch and the cache have room.
        var admitted = new List<(Waiting W, CacheSequence Parent)>();
        // Keep a block for each running sample's next token, so that what is admitted now is not preempted by this very
        // step's decode (and prefilled again next step).
        int freeBlocks = cache.FreeBlocks - running.Count;
        while (waiting.First is { } node && running.Count + admitted.Sum(a => a.W.Samples.Length) + node.Value.Samples.Length <= _o.MaxBatch)
        {
            var w = node.Value;
            int prefixBlocks = (w.Prefix.Length + _o.BlockSize - 1) / _o.BlockSize;
            int needed = prefixBlocks + w.Samples.Length; // each sample may need one more block on its first step (Validate: <= the cache)
            if (needed > freeBlocks) break;
            freeBlocks -= needed;
            waiting.RemoveFirst();
            admitted.Add((w, cache.Create()));
        }
        if (admitted.Count > 0)
        {
            _prefillTime.Start();
            try { _prefillTokens += Prefill(cache, admitted, running); }
            finally { _prefillTime.Stop(); }
        }
        if (running.Count == 0) return;

        // One decode step for every running sample; preempt the newest when the cache is full.
        _decodeTime.Start();
        try
        {
            int idx = 0;
            while (idx < running.Count)
            {
                var a = running[idx];
                try
                {
                    a.Slot = cache.Reserve(a.Seq, 1)[0];
                    idx++;
                }
                catch (OutOfCacheBlocksException)
                {
                    if (running.Count == 1) throw new InvalidOperationException($"the KV cache ({cache.NumBlocks} blocks of {cache.BlockSize}) cannot hold a single sequence of {a.Seq.Length + 1} tokens: raise the number of cache blocks");
                    var victim = running.MaxBy(x => x.Admitted)!;
                    int at = running.IndexOf(victim);
                    cache.Release(victim.Seq);
                    var prefix = victim.Context.Take(victim.Context.Count - 1).ToArray(); // the pending token is fed again after the recompute
                    waiting.AddFirst(new Waiting(victim.Request, [victim.Sample], prefix, [new List<int>(victim.Tokens)], [new List<float>(victim.LogProbs)]));
                    running.RemoveAt(at);
                    _preemptions++;
                    if (at < idx) idx--;
                }
            }
            if (running.Count == 0) return;
            using (var logits = DecodeStep(cache, running, running.Select(a => a.Slot).ToArray()))
                SampleAndAdvance(logits, running, cache);
            _steps++;
            _decoded += running.Count;
            running.RemoveAll(a => a.Seq.BlockTable.Count == 0 && a.Pending < 0);
        }
        finally { _decodeTime.Stop(); }
    }

    public void Dispose() => _cache.Dispose();

    /// <summary>One packed prefill of every admitted prompt; new requests sample their first token here.</summary>
    private int Prefill(PagedKvCache cache, List<(Waiting W, CacheSequence Parent)> admitted, List<Active> running)
    {
        var b = model.Backend;
        var ids = new List<int>();
        var cu = new List<int> { 0 };
        var pixels = new List<float>();
        int tiles = 0;
        var allSlots = new List<int>();
        var imageRows = new List<int>();
        foreach (var (w, parent) in admitted)
        {
            var r = _requests[w.Request].Request;
            // Image features go to the prompt's own <IMG_CONTEXT> rows, not to any generated after it (a resumed sample).
            for (int i = 0; i < r.PromptIds.Length; i++) if (r.PromptIds[i] == model.ImageContextId) imageRows.Add(ids.Count + i);
            ids.AddRange(w.Prefix);
            cu.Add(ids.Count);
            if (r.Tiles > 0) { pixels.AddRange(r.Pixels ?? throw new ArgumentException($"request {w.Request} has tiles but no pixels")); tiles += r.Tiles; }
            allSlots.AddRange(cache.Reserve(parent, w.Prefix.Length));
        }
        using var seqs = b.Sequences([.. cu]);
        using var slotIndex = b.Rows([.. allSlots], cache.NumBlocks * cache.BlockSize, distinct: true, "slots");
        using var embeddings = model.Embed([.. ids], tiles > 0 ? [.. pixels] : null, tiles, [.. imageRows]);
        int t = ids.Count, heads = model.Config.Llm.NumHeads / model.TensorParallel.Size;
        float scale = 1f / MathF.Sqrt(model.Config.Llm.HeadDim);
        var lastRows = cu.Skip(1).Select(end => end - 1).ToArray();
        using var logits = model.InferLogits(embeddings, seqs.Positions(), lastRows, (layer, q, k, v, o) =>
        {
            b.KvAppend(k, v, slotIndex, cache.Keys(layer), cache.Values(layer));
            using var lse = b.Allocate(DType.F32, t, heads);
            b.AttentionForward(q, k, v, seqs, o, lse, scale, causal: true);
        });

        // Fresh requests sample their first token from the prompt's last logits; resumed samples already have it.
        var rows = new List<SampleRow>();
        var rowOwner = new List<(int Admitted, int Sample)>();
        for (int a = 0; a < admitted.Count; a++)
        {
            var (w, _) = admitted[a];
            if (w.Generated is not null) continue;
            var r = _requests[w.Request].Request;
            foreach (var s in w.Samples)
            {
                rows.Add(new SampleRow(r.Sampling ?? SamplingParams.Greedy, r.Seed + (ulong)s, 0, w.Prefix));
                rowOwner.Add((a, s));
            }
        }
        var sampled = rows.Count == 0 ? ([], []) : SampleRowsOf(logits, rowOwner.Select(o => o.Admitted).ToArray(), rows);
        int row = 0;
        for (int a = 0; a < admitted.Count; a++)
        {
            var (w, parent) = admitted[a];
            for (int j = 0; j < w.Samples.Length; j++)
            {
                var active = new Active
                {
                    Request = w.Request, Sample = w.Samples[j], Seq = cache.Fork(parent), Context = [.. w.Prefix], Admitted = _admissions++,
                };
                if (w.Generated is null)
                {
                    Advance(active, sampled.Item1[row], sampled.Item2[row], cache);
                    row++;
                }
                else
                {
                    active.Tokens.AddRange(w.Generated[j]);
                    active.LogProbs.AddRange(w.LogProbs![j]);
                    active.Pending = w.Generated[j][^1];
                    active.Context.Add(active.Pending);
                }
                if (active.Pending >= 0) running.Add(active);
            }
            cache.Release(parent);
        }
        return ids.Count;
    }

    /// <summary>Samples rows that index into a logits tensor with one row per admitted prompt (samples share a row).</summary>
    private (int[], float[]) SampleRowsOf(Tensor logits, int[] sourceRows, List<SampleRow> rows)
    {
        var b = model.Backend;
        using var index = b.Rows(sourceRows, logits.Rows, distinct: false, "sample_rows");
        using var expanded = b.Allocate(logits.DType, sourceRows.Length, logits.Cols);
        b.GatherRows(logits, index, expanded);
        return b.Sample(expanded, rows, VocabularyLimit);
    }

    private Tensor DecodeStep(PagedKvCache cache, List<Active> running, int[] slots)
    {
        var b = model.Backend;
        var cfg = model.Config.Llm;
        int n = running.Count;
        var tokens = running.Select(a => a.Pending).ToArray();
        var positions = running.Select(a => a.Seq.Length - 1).ToArray();
        using var batch = b.Paged(running.Select(a => a.Seq.BlockTable).ToList(), running.Select(a => a.Seq.Length).ToArray(), cache.BlockSize, cache.NumBlocks);
        using var slotIndex = b.Rows(slots, cache.NumBlocks * cache.BlockSize, distinct: true, "slots");
        using var embeddings = model.EmbedTokens(tokens);
        float scale = 1f / MathF.Sqrt(cfg.HeadDim);
        return model.InferLogits(embeddings, positions, Enumerable.Range(0, n).ToArray(), (layer, q, k, v, o) =>
        {
            b.KvAppend(k, v, slotIndex, cache.Keys(layer), cache.Values(layer));
            b.PagedAttentionDecode(q, cache.Keys(layer), cache.Values(layer), batch, o, scale, _o.SplitBlocks);
        });
    }

    private void SampleAndAdvance(Tensor logits, List<Active> running, PagedKvCache cache)
    {
        var rows = running.Select(a =>
        {
            var r = _requests[a.Request].Request;
            return new SampleRow(r.Sampling ?? SamplingParams.Greedy, r.Seed + (ulong)a.Sample, a.Tokens.Count, a.Context);
        }).ToList();
        var (tokens, logprobs) = model.Backend.Sample(logits, rows, VocabularyLimit);
        for (int i = 0; i < running.Count; i++) Advance(running[i], tokens[i], logprobs[i], cache);
    }

    /// <summary>Records a sampled token and finishes the sample on a stop token, stop string or the length limit.</summary>
    private void Advance(Active a, int token, float logprob, PagedKvCache cache)
    {
        var sub = _requests[a.Request];
        var r = sub.Request;
        a.Tokens.Add(token);
        a.LogProbs.Add(logprob);
        a.Context.Add(token);
        a.Pending = token;
        sub.OnToken?.Invoke(new TokenEvent(a.Request, a.Sample, token, logprob));
        FinishReason? finish = null;
        if (r.StopTokens?.Contains(token) == true) finish = FinishReason.StopToken;
        else if (r.StopStrings is { Count: > 0 } stops && tokenizer is not null)
        {
            // Checked every token, so a stop string is found as it completes: it ends at this token and spans at most 4
            // bytes (tokens) a character, so decoding the last 4 x (longest stop) + 1 tokens is enough (linear, not
            // quadratic, in the output's length).
            int window = Math.Min(a.Tokens.Count, 4 * stops.Max(x => x.Length) + 1);
            var text = tokenizer.Decode(a.Tokens.Skip(a.Tokens.Count - window));
            if (stops.Any(s => text.Contains(s, StringComparison.Ordinal))) finish = FinishReason.StopString;
        }
        if (finish is null && a.Tokens.Count >= r.MaxNewTokens) finish = FinishReason.Length;
        if (finish is null) return;
        cache.Release(a.Seq);
        a.Pending = -1;
        Finish(a.Request, a.Sample, a.Tokens, a.LogProbs, finish.Value);
    }
}
