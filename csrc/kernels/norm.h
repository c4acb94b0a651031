// LayerNorm over the mid channels of each pixel (ConvNeXt's block: dw -> LN -> pw),
// forward and backward on pixel-major rows of the depthwise tile.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.
//
// The kernels normalise only: (u - mean) * rstd with nn.LayerNorm's biased variance.
// LN's affine (gamma, beta) is folded into the pointwise weight and bias by the caller
// (W * gamma, b + W . beta: sepconv.functional), so its gradients come from the
// pointwise ones by autograd and the kernels have no extra operands. A row of U holds
// every mid channel of its pixel, in cache: two passes for the statistics (mean, then
// the centred squares: no cancellation), one to normalise. The statistics are in T
// (float or double), float at the least as the issue asks.

// Rows [0, rows) of U (channels [0, n), ld apart) normalised in place; rstd[r] (when
// given) keeps 1 / sqrt(var + eps) of row r for the backward.
template <class T>
void layer_norm_rows(T* U, int64_t rows, int64_t ld, int64_t n, double eps, T* rstd) {
  const T inv_n = T(1) / T(n);
  for (int64_t r = 0; r < rows; ++r) {
    T* u = U + r * ld;
    T s = 0, q = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < n; ++c) s += u[c];
    const T mean = s * inv_n;
#pragma omp simd reduction(+ : q)
    for (int64_t c = 0; c < n; ++c) q += (u[c] - mean) * (u[c] - mean);
    const T inv = T(1) / std::sqrt(q * inv_n + T(eps));
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) u[c] = (u[c] - mean) * inv;
    if (rstd) rstd[r] = inv;
  }
}

// LayerNorm's backward without affine, in place: on entry G = dL/dN for the normalised
// rows N; on return dL/dU = rstd * (G - mean(G) - N * mean(G * N)) (aten's
// layer_norm_backward with gamma = 1).
template <class T>
void layer_norm_grad_rows(T* G, const T* N, int64_t ld, int64_t rows, int64_t n, const T* rstd) {
  const T inv_n = T(1) / T(n);
  for (int64_t r = 0; r < rows; ++r) {
    T* g = G + r * ld;
    const T* v = N + r * ld;
    T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t c = 0; c < n; ++c) a += g[c], b += g[c] * v[c];
    a *= inv_n, b *= inv_n;
    const T s = rstd[r];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) g[c] = s * (g[c] - a - v[c] * b);
  }
}
