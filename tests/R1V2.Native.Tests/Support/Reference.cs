namespace R1V2.Native.Tests.Support;

/// <summary>
/// Double-precision references: forward formulas written directly from the math, and gradients taken by central
/// differences of those double forwards (h = 1e-6, error about 1e-9), so that a reference gradient never shares a
/// derivation with the kernel it checks.
/// </summary>
public static class Reference
{
    /// <summary>d/dx of loss at x by central differences in double precision.</summary>
    public static double[] Gradient(Func<double[], double> loss, double[] x, double h = 1e-6)
    {
        var g = new double[x.Length];
        for (int i = 0; i < x.Length; i++)
        {
            double v = x[i];
            x[i] = v + h;
            double up = loss(x);
            x[i] = v - h;
            double down = loss(x);
            x[i] = v;
            g[i] = (up - down) / (2 * h);
        }
        return g;
    }

    public static double Dot(double[] r, double[] y)
    {
        double s = 0;
        for (int i = 0; i < y.Length; i++) s += r[i] * y[i];
        return s;
    }

    public static double[] RmsNorm(double[] x, double[] w, int rows, int cols, double eps)
    {
        var y = new double[x.Length];
        for (int r = 0; r < rows; r++)
        {
            double ss = 0;
            for (int c = 0; c < cols; c++) ss += x[r * cols + c] * x[r * cols + c];
            double rs = 1 / Math.Sqrt(ss / cols + eps);
            for (int c = 0; c < cols; c++) y[r * cols + c] = w[c] * x[r * cols + c] * rs;
        }
        return y;
    }

    public static double[] LayerNorm(double[] x, double[] w, double[]? b, int rows, int cols, double eps)
    {
        var y = new double[x.Length];
        for (int r = 0; r < rows; r++)
        {
            double mu = 0;
            for (int c = 0; c < cols; c++) mu += x[r * cols + c];
            mu /= cols;
            double v = 0;
            for (int c = 0; c < cols; c++) v += Math.Pow(x[r * cols + c] - mu, 2);
            double rs = 1 / Math.Sqrt(v / cols + eps);
            for (int c = 0; c < cols; c++) y[r * cols + c] = (x[r * cols + c] - mu) * rs * w[c] + (b?[c] ?? 0);
        }
        return y;
    }

    /// <summary>Qwen2 rotate-half RoPE on [T, H, D].</summary>
    public static double[] Rope(double[] x, int[] pos, int heads, int dim, double theta)
    {
        var y = new double[x.Length];
        int tokens = pos.Length, half = dim / 2;
        for (int t = 0; t < tokens; t++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < half; i++)
                {
                    double a = pos[t] * Math.Pow(theta, -2.0 * i / dim);
                    int b = (t * heads + h) * dim;
                    double x1 = x[b + i], x2 = x[b + i + half];
                    y[b + i] = x1 * Math.Cos(a) - x2 * Math.Sin(a);
                    y[b + i + half] = x2 * Math.Cos(a) + x1 * Math.Sin(a);
                }
        return y;
    }

    public static double Silu(double g) => g / (1 + Math.Exp(-g));

    /// <summary>erf by Simpson integration of 2/sqrt(pi) exp(-t^2) (independent of the kernels' polynomial).</summary>
    public static double Erf(double x)
    {
        const int n = 2000;
        double h = x / n, s = 1 + Math.Exp(-x * x);
        for (int i = 1; i < n; i++) s += (i % 2 == 1 ? 4 : 2) * Math.Exp(-Math.Pow(i * h, 2));
        return 2 / Math.Sqrt(Math.PI) * s * h / 3;
    }

    public static double GeluErf(double x) => 0.5 * x * (1 + Erf(x / Math.Sqrt(2)));
    public static double GeluTanh(double x) => 0.5 * x * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));

    public static double[] Softmax(double[] x, int rows, int cols, double scale)
    {
        var y = new double[x.Length];
        for (int r = 0; r < rows; r++)
        {
            double m = double.NegativeInfinity;
            for (int c = 0; c < cols; c++) m = Math.Max(m, scale * x[r * cols + c]);
            double s = 0;
            for (int c = 0; c < cols; c++) s += Math.Exp(scale * x[r * cols + c] - m);
            for (int c = 0; c < cols; c++) y[r * cols + c] = Math.Exp(scale * x[r * cols + c] - m) / s;
        }
        return y;
    }

    /// <summary>Per-row log-sum-exp and log p(target), in double.</summary>
    public static (double[] LogProb, double[] Lse) LogSoftmaxGather(double[] logits, int[] targets, int vocab, int ignoreIndex)
    {
        int rows = targets.Length;
        var lp = new double[rows];
        var lse = new double[rows];
        for (int r = 0; r < rows; r++)
        {
            double m = double.NegativeInfinity;
            for (int v = 0; v < vocab; v++) m = Math.Max(m, logits[r * vocab + v]);
            double s = 0;
            for (int v = 0; v < vocab; v++) s += Math.Exp(logits[r * vocab + v] - m);
            lse[r] = m + Math.Log(s);
            lp[r] = targets[r] == ignoreIndex ? 0 : logits[r * vocab + targets[r]] - lse[r];
        }
        return (lp, lse);
    }

    /// <summary>Row-major c = alpha * op(a) op(b) + beta * c0 + bias.</summary>
    public static double[] Gemm(double[] a, bool transA, double[] b, bool transB, double[]? c0, double[]? bias, int m, int n, int k, double alpha, double beta)
    {
        var c = new double[m * n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = 0;
                for (int p = 0; p < k; p++)
                    s += (transA ? a[p * m + i] : a[i * k + p]) * (transB ? b[j * k + p] : b[p * n + j]);
                c[i * n + j] = alpha * s + (c0 is null ? 0 : beta * c0[i * n + j]) + (bias?[j] ?? 0);
            }
        return c;
    }

    /// <summary>Packed-sequence GQA attention, softmax(scale q k^T (+ causal mask)) v, straight from the definition.</summary>
    public static double[] Attention(double[] q, double[] k, double[] v, int[] cu, int heads, int kvHeads, int dim, double scale, bool causal)
    {
        int tokens = cu[^1];
        var o = new double[q.Length];
        for (int s = 0; s + 1 < cu.Length; s++)
            for (int i = cu[s]; i < cu[s + 1]; i++)
                for (int h = 0; h < heads; h++)
                {
                    int g = h / (heads / kvHeads), end = causal ? i + 1 : cu[s + 1];
                    var scores = new List<double>();
                    for (int j = cu[s]; j < end; j++)
                    {
                        double dot = 0;
                        for (int d = 0; d < dim; d++) dot += q[(i * heads + h) * dim + d] * k[(j * kvHeads + g) * dim + d];
                        scores.Add(scale * dot);
                    }
                    double m = scores.Max(), z = scores.Sum(x => Math.Exp(x - m));
                    for (int j = cu[s]; j < end; j++)
                    {
                        double p = Math.Exp(scores[j - cu[s]] - m) / z;
                        for (int d = 0; d < dim; d++) o[(i * heads + h) * dim + d] += p * v[(j * kvHeads + g) * dim + d];
                    }
                }
        _ = tokens;
        return o;
    }
}
