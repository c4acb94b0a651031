// LayerNorm over the mid channels of each pixel (ConvNeXt's block: dw -> LN -> pw),
// forward and backward on pixel-major rows of the depthwise tile: whole rows in one
// thread (the forward, backward_impl), or rows whose channels the team shares
// (backward_split).
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.
//
// N = (u - mean) * rstd with nn.LayerNorm's biased variance, then its affine
// A = N * gamma + beta (affine_rows; either may be absent), which the pointwise GEMM
// reads. A row of U holds every mid channel of its pixel, in cache: two passes for the
// statistics (mean, then the centred squares: no cancellation), one to normalise, one
// for the affine. The statistics are in T (float or double), float at the least as the
// issue asks. The backward keeps N beside A (A cannot give N back where gamma is 0):
// d gamma and d beta are sums over the pixels of dL/dA * N and dL/dA, per channel.
// (The affine was first folded into the pointwise weight and bias by the caller:
// passes over the Co x Cm weight on every call, forward and backward, a quarter of a
// 768x7->3072 training step at batch 1. The op path still folds: sepconv/_norm.py.)

// Rows [0, rows) of U (channels [0, n), ld apart) normalised into N (which may be U);
// rstd[r] (when given) keeps 1 / sqrt(var + eps) of row r for the backward.
template <class T>
void layer_norm_rows(const T* U, T* N, int64_t rows, int64_t ld, int64_t n, double eps,
                     T* rstd) {
  const T inv_n = T(1) / T(n);
  for (int64_t r = 0; r < rows; ++r) {
    const T* u = U + r * ld;
    T* v = N + r * ld;
    T s = 0, q = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < n; ++c) s += u[c];
    const T mean = s * inv_n;
#pragma omp simd reduction(+ : q)
    for (int64_t c = 0; c < n; ++c) q += (u[c] - mean) * (u[c] - mean);
    const T inv = T(1) / std::sqrt(q * inv_n + T(eps));
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) v[c] = (u[c] - mean) * inv;
    if (rstd) rstd[r] = inv;
  }
}

// A = N * gamma + beta on rows [0, rows) of n channels, ld apart (A may be N; gamma /
// beta null: 1 / 0).
template <class T>
void affine_rows(const T* N, T* A, int64_t ld, int64_t rows, int64_t n, const T* gamma,
                 const T* beta) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* v = N + r * ld;
    T* a = A + r * ld;
    if (gamma && beta) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) a[c] = v[c] * gamma[c] + beta[c];
    } else if (gamma) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) a[c] = v[c] * gamma[c];
    } else if (beta) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) a[c] = v[c] + beta[c];
    } else if (a != v) {
      memcpy(a, v, n * sizeof(T));
    }
  }
}

// The affine's backward on rows [0, rows) of n channels, ld apart: on entry G = dL/dA,
// on return dL/dN = G * gamma; dgamma += the sum over the rows of G * N, dbeta += that
// of G (each null where not wanted; gamma null: 1).
template <class T>
void affine_grad_rows(T* G, const T* N, int64_t ld, int64_t rows, int64_t n, const T* gamma,
                      T* dgamma, T* dbeta) {
  for (int64_t r = 0; r < rows; ++r) {
    T* gr = G + r * ld;
    const T* v = N + r * ld;
    if (dgamma) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) dgamma[c] += gr[c] * v[c];
    }
    if (dbeta) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) dbeta[c] += gr[c];
    }
    if (gamma) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) gr[c] *= gamma[c];
    }
  }
}

// LayerNorm's backward without the affine, in place: on entry G = dL/dN for the normalised
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

// LayerNorm over rows whose channels are shared out over the team (backward_split):
// thread tid holds channels [c0, c1) of each of the np rows of M. Each stage's per-pixel
// sums over a thread's channels go to its slot of `part` ([thread][slot][sP]: slots 0, 1
// for the statistics, 2, 3 for the backward's, so that no stage overwrites sums another
// thread may still be reading) and a barrier; every thread then adds the team's in thread
// order (the same bits on every thread) into its own mean and rstd ([thread][sP]).
template <class T>
void split_layer_norm(const Geometry& g, T* M, int64_t ld, int64_t np, int64_t c0, int64_t c1,
                      int64_t tid, int64_t team, T* part, int64_t sP, T* mean, T* rstd) {
  const T inv_n = T(1) / T(g.Cm);
  T* s = part + tid * 4 * sP;
  for (int64_t r = 0; r < np; ++r) {
    const T* u = M + r * ld;
    T a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t c = c0; c < c1; ++c) a += u[c];
    s[r] = a;
  }
#pragma omp barrier
  for (int64_t r = 0; r < np; ++r) {
    T a = 0;
    for (int64_t t = 0; t < team; ++t) a += part[t * 4 * sP + r];
    mean[r] = a * inv_n;
    const T* u = M + r * ld;
    const T m = mean[r];
    T q = 0;
#pragma omp simd reduction(+ : q)
    for (int64_t c = c0; c < c1; ++c) q += (u[c] - m) * (u[c] - m);
    s[sP + r] = q;
  }
#pragma omp barrier
  for (int64_t r = 0; r < np; ++r) {
    T q = 0;
    for (int64_t t = 0; t < team; ++t) q += part[t * 4 * sP + sP + r];
    rstd[r] = T(1) / std::sqrt(q * inv_n + T(g.norm_eps));
    T* u = M + r * ld;
    const T m = mean[r], v = rstd[r];
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) u[c] = (u[c] - m) * v;
  }
}

// layer_norm_grad_rows for rows shared out as in split_layer_norm: G = dL/dN on entry,
// dL/d(act1(U)) on return, this thread's channels; one barrier for the sums.
template <class T>
void split_layer_norm_grad(const Geometry& g, T* G, const T* N, int64_t ld, int64_t np,
                           int64_t c0, int64_t c1, int64_t tid, int64_t team, T* part,
                           int64_t sP, const T* rstd) {
  const T inv_n = T(1) / T(g.Cm);
  T* s = part + tid * 4 * sP + 2 * sP;
  for (int64_t r = 0; r < np; ++r) {
    const T* gr = G + r * ld;
    const T* v = N + r * ld;
    T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t c = c0; c < c1; ++c) a += gr[c], b += gr[c] * v[c];
    s[r] = a, s[sP + r] = b;
  }
#pragma omp barrier
  for (int64_t r = 0; r < np; ++r) {
    T a = 0, b = 0;
    for (int64_t t = 0; t < team; ++t)
      a += part[t * 4 * sP + 2 * sP + r], b += part[t * 4 * sP + 3 * sP + r];
    a *= inv_n, b *= inv_n;
    T* gr = G + r * ld;
    const T* v = N + r * ld;
    const T k = rstd[r];
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) gr[c] = k * (gr[c] - a - v[c] * b);
  }
}
