using System.Runtime.CompilerServices;

namespace R1V2.Native.Engine.Backends.Cpu;

/// <summary>
/// The element-wise and row ops, norms, the fused LM-head loss's chunk passes, the gradient norm and sampling of the
/// CPU backend as plain loops over host pointers, each the same arithmetic in the same order as its ILGPU twin
/// (HostOpsTests checks the two bit for bit; attention has its own host path, <see cref="CpuAttention"/>). A
/// CPU-accelerator launch costs about 75 us whatever its
/// size, and most of the digit model's ops touch a few thousand values, so the backend runs these loops on the calling
/// thread, split over the cores above <see cref="ParallelFrom"/> values; the twins stay the CUDA kernels' CPU
/// reference (<c>new CpuBackend(launchTwins: true)</c>). The loops are compiled optimised from their first call
/// (AggressiveOptimization): a short run would otherwise spend its time in unoptimised code.
/// </summary>
internal static class HostOps
{
    /// <summary>Work (values touched) from which a loop is split over the cores.</summary>
    public const long ParallelFrom = 1 << 16;

    /// <summary>Loops started from the calling thread: lets a test see which path an op took.</summary>
    [ThreadStatic] internal static long LoopsOnThisThread;

    /// <summary>Runs body(start, end) over [0, n): on this thread when <paramref name="work"/> is small, else in one
    /// contiguous chunk per core. Every index is computed alone, so the split does not change a bit.</summary>
    public static void Range(long n, long work, Action<long, long> body)
    {
        LoopsOnThisThread++;
        int chunks = work < ParallelFrom ? 1 : (int)Math.Min(Environment.ProcessorCount, n);
        if (chunks <= 1) { body(0, n); return; }
        long size = (n + chunks - 1) / chunks;
        Parallel.For(0, chunks, k => body(k * size, Math.Min(n, (k + 1) * size)));
    }

    public static unsafe void Axpby(float* y, float* a, float* b, float alpha, float beta, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long i = s; i < e; i++)
            {
                float v = alpha * a[i];
                if (b != null) v += beta * b[i];
                y[i] = v;
            }
        });

    public static unsafe void SwiGluForward(float* y, float* g, float* u, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long i = s; i < e; i++)
            {
                float gv = g[i];
                y[i] = gv * CpuMath.Sigmoid(gv) * u[i];
            }
        });

    public static unsafe void SwiGluBackward(float* dg, float* du, float* dy, float* g, float* u, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long i = s; i < e; i++)
            {
                float gv = g[i], uv = u[i], d = dy[i];
                float sg = CpuMath.Sigmoid(gv);
                dg[i] = d * uv * sg * (1f + gv * (1f - sg));
                du[i] = d * gv * sg;
            }
        });

    public static unsafe void GeluForward(float* y, float* x, int approximate, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) y[i] = GeluKernels.Value(x[i], approximate); });

    public static unsafe void GeluBackward(float* dx, float* dy, float* x, int approximate, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) dx[i] = dy[i] * GeluKernels.Derivative(x[i], approximate); });

    public static unsafe void BiasAdd(float* y, float* bias, int cols, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) y[i] += bias[i % cols]; });

    /// <summary>Column sums: each column adds its rows in order, as the twin's one thread per column does.</summary>
    public static unsafe void BiasBackward(float* dbias, float* dy, int rows, int cols, bool accumulate) =>
        Range(cols, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long c = s; c < e; c++)
            {
                float sum = 0f;
                for (int r0 = 0; r0 < rows; r0 += Backend.ColumnChunkRows)
                {
                    float p = 0f;
                    int r1 = Math.Min(rows, r0 + Backend.ColumnChunkRows);
                    for (int r = r0; r < r1; r++) p += dy[(long)r * cols + c];
                    sum += p;
                }
                dbias[c] = accumulate ? dbias[c] + sum : sum;
            }
        });

    public static unsafe void RmsNormForward(float* y, float* rstd, float* x, float* w, int rows, int cols, float eps) =>
        Range(rows, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * cols;
                float ss = 0f;
                for (int c = 0; c < cols; c++) { float v = x[b + c]; ss += v * v; }
                float r = 1f / MathF.Sqrt(ss / cols + eps);
                rstd[row] = r;
                for (int c = 0; c < cols; c++) y[b + c] = w[c] * (x[b + c] * r);
            }
        });

    /// <summary>dx may alias dy: each value of dy is read before its dx is written, as in the twin.</summary>
    public static unsafe void RmsNormBackward(float* dx, float* dy, float* x, float* w, float* rstd, int rows, int cols) =>
        Range(rows, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * cols;
                float r = rstd[row];
                float dot = 0f;
                for (int c = 0; c < cols; c++) dot += w[c] * dy[b + c] * x[b + c] * r;
                dot /= cols;
                for (int c = 0; c < cols; c++) dx[b + c] = r * (w[c] * dy[b + c] - x[b + c] * r * dot);
            }
        });

    public static unsafe void RmsNormBackwardWeight(float* dw, float* dy, float* x, float* rstd, int rows, int cols, bool accumulate) =>
        Range(cols, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long c = s; c < e; c++)
            {
                float sum = 0f;
                for (int r0 = 0; r0 < rows; r0 += Backend.ColumnChunkRows)
                {
                    float p = 0f;
                    int r1 = Math.Min(rows, r0 + Backend.ColumnChunkRows);
                    for (int r = r0; r < r1; r++) { long i = (long)r * cols + c; p += dy[i] * x[i] * rstd[r]; }
                    sum += p;
                }
                dw[c] = accumulate ? dw[c] + sum : sum;
            }
        });

    /// <summary>
    /// Rotates pairs (i, i + dim/2) of every head; direction -1 is the inverse rotation (backward). The sines and
    /// cosines are computed once per (position, pair) present, with the twin's expressions, so every value is the
    /// twin's bit for bit while a token's heads share them.
    /// </summary>
    public static unsafe void Rope(float* y, float* x, int* pos, float* table, int tableRows, int heads, int dim, float theta, float direction, long values)
    {
        int half = dim / 2;
        long tokens = values / ((long)heads * dim);
        if (tokens == 0) return;
        int lo = int.MaxValue, hi = int.MinValue;
        for (long t = 0; t < tokens; t++) { lo = Math.Min(lo, pos[t]); hi = Math.Max(hi, pos[t]); }
        int span = hi - lo + 1;
        var sin = new float[(long)span * half];
        var cos = new float[(long)span * half];
        var present = new bool[span];
        for (long t = 0; t < tokens; t++) present[pos[t] - lo] = true;
        for (int p = 0; p < span; p++)
        {
            if (!present[p]) continue;
            for (int i = 0; i < half; i++)
            {
                int at = p + lo;
                if (at >= 0 && at < tableRows)
                {
                    cos[p * half + i] = table[((long)at * half + i) * 2];
                    sin[p * half + i] = table[((long)at * half + i) * 2 + 1] * direction;
                    continue;
                }
                float a = RopeKernels.Angle(at, i, dim, theta);
                sin[p * half + i] = MathF.Sin(a) * direction;
                cos[p * half + i] = MathF.Cos(a);
            }
        }
        fixed (float* sp = sin, cp = cos)
        {
            float* sinP = sp, cosP = cp;
            Range(tokens, values, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
            {
                for (long t = s; t < e; t++)
                {
                    float* st = sinP + (long)(pos[t] - lo) * half, ct = cosP + (long)(pos[t] - lo) * half;
                    for (int h = 0; h < heads; h++)
                    {
                        long b = (t * heads + h) * dim;
                        for (int i = 0; i < half; i++)
                        {
                            float sn = st[i], cs = ct[i];
                            float x1 = x[b + i], x2 = x[b + i + half];
                            y[b + i] = x1 * cs - x2 * sn;
                            y[b + i + half] = x2 * cs + x1 * sn;
                        }
                    }
                }
            });
        }
    }

    /// <summary>
    /// The sum of squares of x as the twins' pair computes it: per chunk of <paramref name="chunk"/> values a partial
    /// summed in order (chunks split over the cores), then the partials summed in order.
    /// </summary>
    public static unsafe float SumOfSquares(float* x, long n, int chunk)
    {
        int chunks = (int)Math.Max(1, (n + chunk - 1) / chunk);
        var partial = new float[chunks];
        fixed (float* pp = partial)
        {
            float* part = pp;
            Range(chunks, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
            {
                for (long c = s; c < e; c++)
                {
                    long start = c * chunk, end = Math.Min(n, start + chunk);
                    float sum = 0f;
                    for (long i = start; i < end; i++) { float v = x[i]; sum += v * v; }
                    part[c] = sum;
                }
            });
        }
        float total = 0f;
        for (int c = 0; c < chunks; c++) total += partial[c];
        return total;
    }

    public static unsafe void LayerNormForward(float* y, float* mean, float* rstd, float* x, float* w, float* bias, int rows, int cols, float eps) =>
        Range(rows, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * cols;
                float sum = 0f;
                for (int c = 0; c < cols; c++) sum += x[b + c];
                float mu = sum / cols;
                float ss = 0f;
                for (int c = 0; c < cols; c++) { float d = x[b + c] - mu; ss += d * d; }
                float r = 1f / MathF.Sqrt(ss / cols + eps);
                mean[row] = mu;
                rstd[row] = r;
                for (int c = 0; c < cols; c++) y[b + c] = (x[b + c] - mu) * r * w[c] + (bias != null ? bias[c] : 0f);
            }
        });

    public static unsafe void LayerNormBackward(float* dx, float* dy, float* x, float* w, float* mean, float* rstd, int rows, int cols) =>
        Range(rows, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * cols;
                float mu = mean[row], r = rstd[row];
                float sg = 0f, sgx = 0f;
                for (int c = 0; c < cols; c++)
                {
                    float g = w[c] * dy[b + c];
                    sg += g;
                    sgx += g * (x[b + c] - mu) * r;
                }
                sg /= cols;
                sgx /= cols;
                for (int c = 0; c < cols; c++) dx[b + c] = r * (w[c] * dy[b + c] - sg - (x[b + c] - mu) * r * sgx);
            }
        });

    /// <summary>Column sums in row order, as the twin's one thread per column.</summary>
    public static unsafe void LayerNormBackwardParams(float* dw, float* db, float* dy, float* x, float* mean, float* rstd, int rows, int cols, bool accumulate) =>
        Range(cols, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long c = s; c < e; c++)
            {
                float sw = 0f, sb = 0f;
                for (int r0 = 0; r0 < rows; r0 += Backend.ColumnChunkRows)
                {
                    float pw = 0f, pb = 0f;
                    int r1 = Math.Min(rows, r0 + Backend.ColumnChunkRows);
                    for (int r = r0; r < r1; r++)
                    {
                        long i = (long)r * cols + c;
                        float g = dy[i];
                        pw += g * (x[i] - mean[r]) * rstd[r];
                        pb += g;
                    }
                    sw += pw;
                    sb += pb;
                }
                dw[c] = accumulate ? dw[c] + sw : sw;
                if (db != null) db[c] = accumulate ? db[c] + sb : sb;
            }
        });

    /// <summary>Fused LM-head loss, one vocabulary chunk: the running max and sum of exp per row, and the target's logit.</summary>
    public static unsafe void ChunkLseUpdate(float* m, float* sums, float* targetLogit, float* chunk, int* targets, int rows, int cols, int colOffset, float invTemp) =>
        Range(rows, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * cols;
                float mx = float.NegativeInfinity;
                for (int c = 0; c < cols; c++) mx = MathF.Max(mx, chunk[b + c] * invTemp);
                float sum = 0f;
                for (int c = 0; c < cols; c++) sum += MathF.Exp(chunk[b + c] * invTemp - mx);
                float mo = m[row], mn = MathF.Max(mo, mx);
                sums[row] = (mo == float.NegativeInfinity ? 0f : sums[row] * MathF.Exp(mo - mn)) + sum * MathF.Exp(mx - mn);
                m[row] = mn;
                int t = targets[row] - colOffset;
                if (t >= 0 && t < cols) targetLogit[row] = chunk[b + t] * invTemp;
            }
        });

    /// <summary>Fused LM-head loss, one vocabulary chunk: the logits' gradient in place of the logits.</summary>
    public static unsafe void ChunkLogitGrad(float* chunk, float* m, float* sums, int* targets, float* dlogp, int rows, int cols, int colOffset, float invTemp) =>
        Range(rows, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * cols;
                float g = targets[row] < 0 ? 0f : dlogp[row] * invTemp, lse = m[row] + MathF.Log(sums[row]);
                int t = targets[row] - colOffset;
                for (int c = 0; c < cols; c++) chunk[b + c] = g * ((c == t ? 1f : 0f) - MathF.Exp(chunk[b + c] * invTemp - lse));
            }
        });

    public static unsafe void EmbeddingForward(float* output, float* table, int* ids, int dim, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) output[i] = table[(long)ids[i / dim] * dim + i % dim]; });

    public static unsafe void AdamW(float* p, ushort* copy, float* g, float* m, float* v, AdamWArgs a, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long i = s; i < e; i++)
            {
                float gi = g[i] * a.GradScale;
                float mi = AdamWKernels.FirstMoment(m[i], gi, a), vi = AdamWKernels.SecondMoment(v[i], gi, a);
                m[i] = mi;
                v[i] = vi;
                float pi = AdamWKernels.Weight(p[i], mi, vi, a);
                p[i] = pi;
                if (copy != null) copy[i] = CpuMath.ToBf16(pi);
            }
        });
    public static unsafe void EmbeddingBackward(float* dtable, float* doutput, int* order, int* starts, int* rows, int groups, int dim) =>
        Range((long)groups * dim, (long)starts[groups] * dim, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long i = s; i < e; i++)
            {
                int g = (int)(i / dim), c = (int)(i % dim);
                long at = (long)rows[g] * dim + c;
                float sum = dtable[at];
                for (int k = starts[g]; k < starts[g + 1]; k++) sum += doutput[(long)order[k] * dim + c];
                dtable[at] = sum;
            }
        });

    public static unsafe void CrossEntropyForward(float* logprob, float* lse, float* logits, int* targets, int rows, int vocab, int ignoreIndex) =>
        Range(rows, (long)rows * vocab, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * vocab;
                float l = LogSumExp(logits + b, vocab);
                lse[row] = l;
                int target = targets[row];
                logprob[row] = target == ignoreIndex ? 0f : logits[b + target] - l;
            }
        });

    /// <summary>The host loop of <see cref="CrossEntropyKernels.LogSumExp"/>: the same values in the same order.</summary>
    private static unsafe float LogSumExp(float* x, int vocab)
    {
        var acc = new RunningLse(float.NegativeInfinity, 0f);
        int n = RunningLse.Vector(vocab);
        if (n == 1)
        {
            for (int v = 0; v < vocab; v++) acc = acc.Add(x[v]);
            return acc.Log;
        }
        for (int v0 = 0; v0 < vocab; v0 += n)
        {
            float vm = x[v0];
            for (int k = 1; k < n; k++) vm = MathF.Max(vm, x[v0 + k]);
            if (!(vm > float.NegativeInfinity)) continue;
            acc = acc.Rescale(vm);
            for (int k = 0; k < n; k++) acc = acc.AddBelow(x[v0 + k]);
        }
        return acc.Log;
    }

    /// <summary>dlogits may alias logits: each logit is read before its gradient is written.</summary>
    public static unsafe void CrossEntropyBackward(float* dlogits, float* logits, float* lse, int* targets, float* dlogprob, int rows, int vocab,
        int ignoreIndex) =>
        Range(rows, (long)rows * vocab, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long row = s; row < e; row++)
            {
                long b = row * vocab;
                int target = targets[row];
                float g = target == ignoreIndex ? 0f : dlogprob[row];
                float l = lse[row];
                for (int v = 0; v < vocab; v++) dlogits[b + v] = CrossEntropyKernels.Gradient(logits[b + v], l, g, v == target);
            }
        });

    public static unsafe void ScaleColumns(float* y, float* x, float* scale, int cols, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) y[i] = x[i] * scale[i % cols]; });

    public static unsafe void ScaleColumnsBackward(float* ds, float* dy, float* x, int rows, int cols, bool accumulate) =>
        Range(cols, (long)rows * cols, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long c = s; c < e; c++)
            {
                float sum = 0f;
                for (int r = 0; r < rows; r++) { long i = (long)r * cols + c; sum += dy[i] * x[i]; }
                ds[c] = accumulate ? ds[c] + sum : sum;
            }
        });

    public static unsafe void ScatterRows(float* dst, float* src, int* index, int cols, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) dst[(long)index[i / cols] * cols + i % cols] = src[i]; });

    public static unsafe void KvAppend(float* kCache, float* vCache, float* k, float* v, int* slots, int rowLength, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            for (long i = s; i < e; i++)
            {
                long dst = (long)slots[i / rowLength] * rowLength + i % rowLength;
                kCache[dst] = k[i];
                vCache[dst] = v[i];
            }
        });

    public static unsafe void ToBf16(ushort* y, float* x, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) y[i] = CpuMath.ToBf16(x[i]); });

    public static unsafe void FromBf16(float* y, ushort* x, long n) =>
        Range(n, n, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) => { for (long i = s; i < e; i++) y[i] = BitConverter.UInt32BitsToSingle((uint)x[i] << 16); });
    /// <summary>
    /// Sampling, one row per index, as the twin's Sample: repetition penalty, temperature, top-k and top-p thresholds by
    /// a bitwise search over order keys, min-p, then the inverse CDF at the row's counter-based uniform.
    /// </summary>
    public static unsafe void Sample(int* tokens, float* logprobs, float* logits, int* prev, int* prevOffsets, float* temperature, int* topK,
        float* topP, float* minP, float* repPenalty, ulong* seeds, int* steps, int rows, SampleShape shape) =>
        Range(rows, (long)rows * shape.Vocab * 64, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (long s, long e) =>
        {
            int vocab = shape.Vocab;
            var seen = new bool[vocab];
            // A row's adjusted values, their order keys and exp(value - max): the twin recomputes them in every pass
            // (34 passes with top-p); computed once here, the same floats go into the same sums in the same order.
            var vals = new float[vocab];
            var keys = new uint[vocab];
            var exps = new float[vocab];
            for (long rl = s; rl < e; rl++)
            {
                int row = (int)rl;
                long b = (long)row * shape.Stride;
                float temp = temperature[row], pen = repPenalty[row], invT = temp > 0f ? 1f / temp : 1f;
                Array.Clear(seen);
                if (pen != 1f)
                    for (int j = prevOffsets[row]; j < prevOffsets[row + 1]; j++) if (prev[j] >= 0 && prev[j] < vocab) seen[prev[j]] = true;

                float m0 = float.NegativeInfinity;
                for (int v = 0; v < vocab; v++) m0 = MathF.Max(m0, logits[b + v] * invT);
                float z0 = 0f;
                for (int v = 0; v < vocab; v++) z0 += MathF.Exp(logits[b + v] * invT - m0);
                for (int v = 0; v < vocab; v++) vals[v] = SamplingKernels.Adjust(logits[b + v], seen[v], pen, invT);

                if (temp <= 0f)
                {
                    float best = float.NegativeInfinity;
                    int bestI = 0;
                    for (int v = 0; v < vocab; v++) { float val = vals[v]; if (val > best) { best = val; bestI = v; } }
                    tokens[row] = bestI;
                    logprobs[row] = logits[b + bestI] * invT - m0 - MathF.Log(z0);
                    continue;
                }

                float m = float.NegativeInfinity;
                for (int v = 0; v < vocab; v++) m = MathF.Max(m, vals[v]);
                for (int v = 0; v < vocab; v++)
                {
                    keys[v] = SamplingKernels.OrderKey(vals[v]);
                    exps[v] = MathF.Exp(vals[v] - m);
                }

                uint keyK = 0u;
                int k = topK[row];
                if (k > 0 && k < vocab)
                    for (int bit = 31; bit >= 0; bit--)
                    {
                        uint cand = keyK | (1u << bit);
                        int c = 0;
                        for (int v = 0; v < vocab; v++) if (keys[v] >= cand) c++;
                        if (c >= k) keyK = cand;
                    }

                uint keyP = 0u;
                float p = topP[row];
                if (p > 0f && p < 1f)
                {
                    float zk = 0f;
                    for (int v = 0; v < vocab; v++) if (keys[v] >= keyK) zk += exps[v];
                    for (int bit = 31; bit >= 0; bit--)
                    {
                        uint cand = keyP | (1u << bit);
                        float mass = 0f;
                        for (int v = 0; v < vocab; v++)
                        {
                            uint kv = keys[v];
                            if (kv >= keyK && kv >= cand) mass += exps[v];
                        }
                        if (mass >= p * zk) keyP = cand;
                    }
                }
                float mp = minP[row];
                float floorValue = mp > 0f ? m + MathF.Log(mp) : float.NegativeInfinity;
                uint keyMin = keyK > keyP ? keyK : keyP;

                float total = 0f;
                for (int v = 0; v < vocab; v++)
                    if (keys[v] >= keyMin && vals[v] >= floorValue) total += exps[v];
                float target = SamplingKernels.Uniform(seeds[row], steps[row]) * total;
                int chosen = -1, lastKept = 0;
                float acc = 0f;
                for (int v = 0; v < vocab; v++)
                {
                    if (!(keys[v] >= keyMin && vals[v] >= floorValue)) continue;
                    lastKept = v;
                    acc += exps[v];
                    if (chosen < 0 && target < acc) chosen = v;
                }
                if (chosen < 0) chosen = lastKept;
                tokens[row] = chosen;
                logprobs[row] = logits[b + chosen] * invT - m0 - MathF.Log(z0);
            }
        });
}
