// In-register transposes and the packing of the pointwise weight.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// In-register transpose of an L x L block (r[t] = row t): log2(L) stages, each
// swapping the off-diagonal H x H blocks of every 2H x 2H block. The shuffle
// masks are constants after unrolling, so each step is one permute instruction.
template <class T> struct IVecOf;
template <> struct IVecOf<float> { typedef int32_t type __attribute__((vector_size(VB))); };
template <> struct IVecOf<double> { typedef int64_t type __attribute__((vector_size(VB))); };

template <class T, int H = lanes<T>() / 2> inline void transpose(V<T>* r) {
  constexpr int L = lanes<T>();
  typename IVecOf<T>::type lo, hi;
  for (int l = 0; l < L; ++l) {
    lo[l] = (l & H) ? L + l - H : l;
    hi[l] = (l & H) ? L + l : l + H;
  }
  for (int g = 0; g < L; g += 2 * H)
    for (int q = g; q < g + H; ++q) {
      const V<T> a = r[q], b = r[q + H];
      r[q] = __builtin_shuffle(a, b, lo);
      r[q + H] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (H > 1) transpose<T, H / 2>(r);
}

// Row accessors of transpose_copy: row i at p + i * ld (Strided), or at p + off[i]
// (Listed: an NCHW x's planes in a channel shuffle's order). shift(r, c): the same rows
// from row r on, from column c on.
template <class T> struct Strided {
  T* p;
  int64_t ld;
  T* operator()(int i) const { return p + i * ld; }
  Strided shift(int64_t r, int64_t c) const { return {p + r * ld + c, ld}; }
};
template <class T> struct Listed {
  T* p;
  const int64_t* off;
  T* operator()(int i) const { return p + off[i]; }
  Listed shift(int64_t r, int64_t c) const { return {p + c, off + r}; }
};

// One block of transpose_copy: rows [0, m) by columns [0, n) of src, m, n <= L,
// transposed in the registers. With AVX-512, partial blocks go by masked loads and
// stores: element by element, the 2 edge columns of a 114-pixel band took 10-15% of
// the transpose (24x56->58/s2 NCHW fwd+bwd 1.09-1.17x, the rest 1.0-1.04x). AVX2's
// masked moves measured no gain here, and on AMD cores the masked store is slow.
template <class T, bool ADD, class S, class D>
inline void transpose_block(S src, D dst, int m, int n) {
  constexpr int L = lanes<T>();
  if (VB < 64 && (m < L || n < L)) {
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        T* d = dst(j) + i;
        *d = ADD ? *d + src(i)[j] : src(i)[j];
      }
    return;
  }
  V<T> r[L];
  for (int t = 0; t < L; ++t)
    r[t] = t >= m ? V<T>{} : n == L ? loadu(src(t)) : load_n(src(t), n);
  transpose<T>(r);
  for (int t = 0; t < n; ++t) {
    T* d = dst(t);
    if (m == L)
      storeu(d, ADD ? loadu(d) + r[t] : r[t]);
    else
      store_n(d, ADD ? load_n(d, m) + r[t] : r[t], m);
  }
}

template <class T, bool ADD, class S, class D>
void transpose_blocks(S src, D dst, int64_t rows, int64_t cols) {
  constexpr int64_t L = lanes<T>();
  for (int64_t i0 = 0; i0 < rows; i0 += L) {
    const int m = (int)imin(L, rows - i0);
    int64_t j0 = 0;
    if (m == L)  // whole blocks, with the sizes known to the compiler
      for (; j0 + L <= cols; j0 += L)
        transpose_block<T, ADD>(src.shift(i0, j0), dst.shift(j0, i0), L, L);
    for (; j0 < cols; j0 += L)
      transpose_block<T, ADD>(src.shift(i0, j0), dst.shift(j0, i0), m, (int)imin(L, cols - j0));
  }
}

// dst[j*ldd + i] = src[i*lds + j] (or += with ADD) for i < rows, j < cols, by L x L
// blocks. NCHW tensors become NHWC tiles this way, and grad_x's NHWC bands go back.
// srow / drow (or null; not both): source row i at src + srow[i] instead of src + i*lds,
// destination row j at dst + drow[j] instead of dst + j*ldd (an NCHW x read through a
// channel shuffle: its planes in the shuffled order). (A runtime choice of the row
// inside the blocks cost the plain transposes 10-25% of an NCHW layer.)
template <class T, bool ADD = false>
void transpose_copy(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols,
                    const int64_t* srow = nullptr, const int64_t* drow = nullptr) {
  using S = const T;
  if (srow) return transpose_blocks<T, ADD>(Listed<S>{src, srow}, Strided<T>{dst, ldd}, rows, cols);
  if (drow) return transpose_blocks<T, ADD>(Strided<S>{src, lds}, Listed<T>{dst, drow}, rows, cols);
  transpose_blocks<T, ADD>(Strided<S>{src, lds}, Strided<T>{dst, ldd}, rows, cols);
}

template <class T>
void transpose_add(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols,
                   const int64_t* drow = nullptr) {
  transpose_copy<T, true>(src, lds, dst, ldd, rows, cols, nullptr, drow);
}

// Panel q of W_pw (Co x Cm, row-major) as B operand of y = U . W^T (NHWC):
// panel[k][jj] = W[q*NR + jj][k], zero padded (Cm x NR).
// Full panels go by L x L register transposes (2.5x faster than element copies
// at 512 x 512); the rest by blocks of 16 k, so that each source line is read
// whole and the destination rows stay in L1.
template <class T> void pack_wt_panel(const T* w, int64_t Co, int64_t Cm, int64_t q, T* panel) {
  constexpr int64_t nr = NR<T>(), L = lanes<T>();
  const int64_t cols = imin(nr, Co - q * nr);
  const T* wq = w + q * nr * Cm;
  int64_t k0 = 0;
  if (cols == nr)
    for (; k0 + L <= Cm; k0 += L)
      for (int64_t h = 0; h < NV; ++h) {
        V<T> r[L];
        for (int64_t t = 0; t < L; ++t) r[t] = loadu(wq + (h * L + t) * Cm + k0);
        transpose<T>(r);
        for (int64_t t = 0; t < L; ++t) storeu(panel + (k0 + t) * nr + h * L, r[t]);
      }
  for (; k0 < Cm; k0 += 16) {
    const int64_t k1 = imin(k0 + 16, Cm);
    for (int64_t jj = 0; jj < nr; ++jj)
      for (int64_t k = k0; k < k1; ++k) panel[k * nr + jj] = jj < cols ? wq[jj * Cm + k] : T(0);
  }
}

// Panel q of W_pw as the B operand of dL/dU = GZ . W: panel[co][jj] = W[co][q*NR + jj],
// zero padded (Co x NR). Contiguous panels: read straight from the Co x Cm matrix, a panel would
// be Co rows 4 * Cm bytes apart, 4 MiB of address range at 1024 x 1024.
template <class T> void pack_w_panel(const T* w, int64_t Co, int64_t Cm, int64_t q, T* panel) {
  constexpr int64_t nr = NR<T>();
  const int64_t cols = imin(nr, Cm - q * nr);
  if (cols == nr) {  // whole rows as vector moves: element by element took 0.7 ms at 3072 x 768
    for (int64_t co = 0; co < Co; ++co) storeu_n<T, nr>(panel + co * nr, w + co * Cm + q * nr);
    return;
  }
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t jj = 0; jj < nr; ++jj) panel[co * nr + jj] = jj < cols ? w[co * Cm + q * nr + jj] : T(0);
}

// With pointwise groups each group's weight (Co / groups x Cm / groups) is packed as a
// matrix of its own, the groups one after another: wt_panels of W^T (for U . W^T, the
// forward's and the backward's z) and w_panels of W (for dL/dU) a group. Panel q of
// either packing goes to dst + q * its size: panel q % n of group q / n.
template <class T> int64_t wt_panels(const Geometry& g) {
  return ceil_div(g.Co / g.groups, NR<T>());
}
template <class T> int64_t w_panels(const Geometry& g) {
  return ceil_div(g.Cm / g.groups, NR<T>());
}
template <class T> void pack_wt_grouped(const Geometry& g, const T* pww, int64_t q, T* dst) {
  const int64_t Cog = g.Co / g.groups, Kg = g.Cm / g.groups, n = wt_panels<T>(g);
  pack_wt_panel(pww + q / n * Cog * Kg, Cog, Kg, q % n, dst + q * Kg * NR<T>());
}
template <class T> void pack_w_grouped(const Geometry& g, const T* pww, int64_t q, T* dst) {
  const int64_t Cog = g.Co / g.groups, Kg = g.Cm / g.groups, n = w_panels<T>(g);
  pack_w_panel(pww + q / n * Cog * Kg, Cog, Kg, q % n, dst + q * Cog * NR<T>());
}
// Elements of the NR-padded bias that the groups' z GEMMs read: up to NR past the last
// group's first channel (one group: Co rounded up to NR).
template <class T> int64_t grouped_bias_len(const Geometry& g) {
  return (g.groups - 1) * (g.Co / g.groups) + wt_panels<T>(g) * NR<T>();
}

// Whether each thread packs its own copy of the pointwise weights rather than a share
// of one copy for all (`bytes`: one copy). Every thread's GEMMs read every panel, so a
// shared copy was in both cores' caches when the next call packed it again, and each
// of its lines waited for the other core's copy to be invalidated. Zen 4, 2 threads:
// at 576x14->96, batch 1 (221 KiB packed), the pack took ~40 us of a ~230 us forward,
// 5 us on one thread with the lines its own; at 728x19->728 (2.1 MiB), ~500 us of 2.7
// ms, 67 us alone. In-process A/B, shared -> own, suite sums CL / NCHW: forward batch 1
// mobilenet_v2 1.07 / 1.05x, xception 1.17 / 1.16x, convnext 1.01 / 1.02x; batch 8
// xception 1.02 / 1.06x, convnext 1.03 / 1.05x; training step (the backward's W^T
// and W panels) batch 1 mobilenet_v2 CL 1.02x, xception 1.06 / 1.10x, batch 8 1.00x.
// The copies cost each thread a pack of all the weights where the shared one cost a
// share, so only while they fit in the L3 together and each thread has 64 pixels or
// more (a pack costs about what a GEMM pass over the weights for 8 pixels does).
inline bool own_weight_copies(const Geometry& g, int64_t bytes) {
  return g.threads * bytes <= g.l3_bytes && g.N * g.Ho * g.Wo >= 64 * g.threads;
}
