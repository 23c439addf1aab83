using R1V2.Native.Engine.Backends;
using R1V2.Native.Engine.Layers;
using R1V2.Native.Engine.Tensors;

namespace R1V2.Native.Engine.Models;

/// <summary>
/// Pixel shuffle (InternVL's, v1 or v2) then the adapter mlp1: LayerNorm(4C) -> Linear(4C -> D) -> GELU ->
/// Linear(D -> D). Shapes: n tiles, P = side^2 patches, C ViT width, r = 1 / downsample_ratio, P' = P / r^2 tokens.
/// </summary>
public sealed class VisionAdapter
{
    private readonly Backend _b;
    private readonly VlmConfig _c;
    private readonly Norm _norm;
    private readonly Linear _fc1, _fc2;

    public VisionAdapter(Backend backend, VlmConfig config, ParameterStore p)
    {
        _b = backend;
        _c = config;
        _norm = new Norm(backend, p["mlp1.0.weight"], p["mlp1.0.bias"], layerNorm: true, eps: 1e-5f);
        _fc1 = new Linear(backend, p["mlp1.1.weight"], p["mlp1.1.bias"]);
        _fc2 = new Linear(backend, p["mlp1.3.weight"], p["mlp1.3.bias"]);
    }

    /// <summary>
    /// For each output row of the shuffled tensor viewed as [n P' r^2, C]: the ViT patch row it takes. This is the
    /// HF view/permute sequence (x [n, w, h, c] -> view [n, w, h/r, r c] -> permute -> view [n, h/r, w/r, r^2 c],
    /// v2 permutes once more) written as an index map, so forward is a row gather and backward a row scatter.
    /// </summary>
    public static int[] ShuffleRows(int tiles, int side, int r, string psVersion)
    {
        int outSide = side / r, perTile = outSide * outSide, chunks = r * r;
        var map = new int[tiles * perTile * chunks];
        for (int t = 0; t < tiles; t++)
            for (int a2 = 0; a2 < outSide; a2++)          // index along w / r
                for (int b2 = 0; b2 < outSide; b2++)      // index along h / r
                {
                    int o = psVersion == "v2" ? a2 * outSide + b2 : b2 * outSide + a2;
                    for (int j = 0; j < chunks; j++)
                    {
                        // chunk j of the 4c-wide row: j = r * (a % r) + (b % r)
                        int a = r * a2 + j / r, b = r * b2 + j % r;
                        map[(t * perTile + o) * chunks + j] = t * side * side + a * side + b;
                    }
                }
        return map;
    }

    public sealed class State : IDisposable
    {
        internal readonly Activations Held = new();
        internal RowIndex Shuffle = null!;
        internal Tensor Shuffled = null!, Normed = null!, Hidden = null!, Activated = null!;
        internal NormCache NormCache = null!;
        public Tensor Output = null!; // [n P', D]
        public void Dispose() => Held.Dispose();
    }

    /// <summary>vit: [n P, C] patch features -> [n P', D] image tokens for the LLM.</summary>
    public State Forward(Tensor vit, int tiles)
    {
        int side = _c.TilePatchesPerSide, r = (int)Math.Round(1 / _c.DownsampleRatio), cv = _c.Vision.HiddenSize;
        var st = new State();
        var h = st.Held;
        var map = ShuffleRows(tiles, side, r, _c.PsVersion);
        st.Shuffle = h.Keep(_b.Rows(map, tiles * side * side, distinct: true, "pixel_shuffle"));
        int rows = map.Length / (r * r);
        st.Shuffled = h.Keep(_b.Activations(rows, r * r * cv));
        _b.GatherRows(vit, st.Shuffle, st.Shuffled.Reshape(map.Length, cv));
        st.Normed = h.Keep(_norm.Forward(st.Shuffled, out st.NormCache)); h.Keep(st.NormCache);
        st.Hidden = h.Keep(_fc1.Forward(st.Normed));
        st.Activated = h.Keep(_b.Activations(rows, _fc1.Out));
        _b.GeluForward(st.Hidden, st.Activated, GeluApproximation.Erf);
        st.Output = h.Keep(_fc2.Forward(st.Activated));
        return st;
    }

    /// <summary>dOutput [n P', D] -> parameter gradients, and d(vit) [n P, C] when <paramref name="inputGradient"/>.</summary>
    public Tensor? Backward(State st, Tensor dOutput, bool inputGradient)
    {
        using var held = new Activations();
        var dAct = held.Keep(_fc2.Backward(dOutput, st.Activated)!);
        var dHidden = held.Keep(_b.Activations(dAct.Rows, dAct.Cols));
        _b.GeluBackward(dAct, st.Hidden, dHidden, GeluApproximation.Erf);
        var dNormed = held.Keep(_fc1.Backward(dHidden, st.Normed)!);
        if (!inputGradient && _norm.Weight.Grad is null) return null;
        var dShuffled = held.Keep(_norm.Backward(dNormed, st.Shuffled, st.NormCache));
        if (!inputGradient) return null;
        int cv = _c.Vision.HiddenSize;
        var dVit = _b.Activations(st.Shuffle.Bound, cv);
        _b.ScatterRows(dShuffled.Reshape(st.Shuffle.Length, cv), st.Shuffle, dVit); // a permutation: every row is written
        return dVit;
    }
}
