// The register-blocked GEMM micro-kernels and their driver.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// Memory for the GEMM to pull into L2 while it computes: the next tile's input (and
// in the backward its grad_y and y), up to three regions of `runs` runs of `bytes`,
// `stride` apart. Two lines per step of the micro-kernel's k loop spread the misses
// over the GEMM instead of one burst that would fill the miss buffers and stall it.
struct Prefetch {
  struct Region {
    const char* p;
    int64_t bytes, stride, runs;
  };
  Region r[3];
  int n = 0, i = 0;          // regions, and the one being fetched
  int64_t run = 0, off = 0;  // the cursor within it
  int64_t chunk = 128;       // bytes a step fetches (a multiple of 64; pace sets it)
  void add(const void* p, int64_t bytes, int64_t stride, int64_t runs) {
    if (bytes > 0 && runs > 0 && n < 3) r[n++] = {(const char*)p, bytes, stride, runs};
  }
  bool pending() const { return i < n; }
  // Spread over `steps` steps, at least 128 bytes each: at 128 a step, the backward's
  // GEMMs at 32 -> 16 channels (no z to recompute: 304 steps a band) had steps for
  // half of the next band's x and grad_y (71 KB), and its depthwise waited on the rest.
  // Zen 5, training step, batch 32, processes alternated 3 times: 32x112->16 AVX-512 CL
  // 0.89-0.94x the time, NCHW 0.96-0.97x, AVX2 path 0.99x; mobilenet_v2's other layers,
  // mobilenet_v1 and shufflenet_v1 (batch 8) 0.94-1.07x, noise. (A step's last chunk
  // may reach past its region: prefetches never fault.)
  void pace(int64_t steps) { chunk = imax(128, round_up(ceil_div(bytes(), imax(steps, 1)), 64)); }
  int64_t bytes() const {
    int64_t b = 0;
    for (int k = 0; k < n; ++k) b += r[k].bytes * r[k].runs;
    return b;
  }
  void step() {
    if (i >= n) return;
    const char* q = r[i].p + run * r[i].stride + off;
    for (int64_t b = 0; b < chunk; b += 64) __builtin_prefetch(q + b, 0, 2);  // prefetcht1: into L2
    off += chunk;
    if (off < r[i].bytes) return;
    off = 0;
    if (++run == r[i].runs) run = 0, ++i;
  }
};

// C[i][j] (i < M, j < N) = epilogue(sum_k A[i][k] B[k][j]).
// A: row i, column k at A + i*ars + k*acs where a_block = 0 (a strided matrix);
//    else row blocks of MR rows, block b from A + b*a_block (the weight gradient packs
//    A into blocks of K x MR, ars = 1, acs = MR, that it reads in order).
// B: panels of NR columns; panel q starts at B + q*b_panel, row k at + k*ldb.
//    Every panel is readable for all NR columns (callers pad), so no masking.
// C: C[i][j] at c + i*rs + j, or at c + j*rs + i when transposed.
template <class T> struct Out {
  T* c;
  int64_t rs;
  bool accumulate;      // C += result instead of C = result
  const T* bias;        // the sum starts from it (before the activation)
  int bias_mode;        // 0 none, 1 bias[i] (per row), 2 bias[j] (per column, NR-padded)
  int act;
  bool transposed = false;  // (not with accumulate)
  Prefetch* prefetch = nullptr;  // advanced once per k step of every micro-tile, or null
  bool stream = false;           // aligned whole vectors stored non-temporally (not with accumulate)
  int64_t panel_group = 1;       // panels per sweep of the row blocks (the forward: 1 with transposed)
  // Whether rows from c on are stored non-temporally: streamed and aligned.
  bool streams_at(const T* c) const {
    return stream && (uintptr_t)c % VB == 0 && rs * (int64_t)sizeof(T) % VB == 0;
  }
};

// Stores a micro-tile of NVT full vectors per row. The activation and accumulation
// are template arguments so that the unrolled stores carry no per-vector branches:
// with a short K (32 channels) the epilogue is a good part of the micro-tile's time.
// With `nt` (rows aligned to whole vectors) the stores are non-temporal: they skip the
// read for ownership of each line and leave the caches to the input and weights.
template <class T, int M, int NVT, int A, bool ACC>
inline void store_tile(const V<T> (&acc)[M][NVT], T* c, int64_t rs, bool nt) {
  constexpr int L = lanes<T>();
  if (!ACC && nt) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i)
      for (int v = 0; v < NVT; ++v) stream_store(c + i * rs + v * L, act_vec<T>(A, acc[i][v]));
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NVT; ++v) {
      V<T> r = acc[i][v];
      if (ACC) r += loadu(c + i * rs + v * L);
      storeu(c + i * rs + v * L, act_vec<T>(A, r));
    }
}

// Stores a micro-tile transposed: C[i][j] at c + j*rs + i for j < nr. The NHWC
// pipeline writes an NCHW y this way: a pixel-major tile becomes channel rows, by
// L x L register transposes (rows past M are padding and not stored). The activation
// is a template argument, as in store_tile: with it a runtime argument, GELU cost the
// NCHW forward twice what it cost channels-last (Zen 5, AVX2, 96x56->384 at batch 1:
// 0.30 against 0.16 ms).
template <class T, int M, int NVT, int a>
inline void store_tile_transposed(const V<T> (&acc)[M][NVT], T* c, int64_t rs, int64_t nr) {
  constexpr int L = lanes<T>();
  for (int v = 0; v < NVT && v * L < nr; ++v) {
    const int64_t n = imin(L, nr - v * L);
#pragma GCC unroll 2
    for (int i0 = 0; i0 < M; i0 += L) {
      V<T> r[L];
#pragma GCC unroll 16
      for (int t = 0; t < L; ++t) r[t] = i0 + t < M ? act_vec<T>(a, acc[i0 + t][v]) : V<T>{};
      transpose<T>(r);
      const int m = M - i0 < L ? M - i0 : L;
      for (int64_t t = 0; t < n; ++t) __builtin_memcpy(c + (v * L + t) * rs + i0, &r[t], m * sizeof(T));
    }
  }
}

// One micro-tile: rows [i0, i0 + M) by columns [j0, j0 + nr), nr <= NVT * L; a is
// the first row's A. NVT = 1 serves panels of at most L columns (16 output
// channels), which would otherwise spend half their FMAs on padding. PF: advance
// o.prefetch once per k step (a separate instantiation: the test alone, in every
// micro-tile's k loop, cost the GEMM-bound convnext layers 5-8%).
template <class T, int M, int NVT, bool PF = false>
void micro(int64_t K, const T* a, int64_t ars, int64_t acs, const T* B, int64_t ldb,
           const Out<T>& o, int64_t i0, int64_t j0, int64_t nr) {
  constexpr int L = lanes<T>();
  // The accumulators start from the bias, which leaves the epilogue bias-free. (As a
  // sum of a row's and a column's bias, one of them zero: written as a choice among
  // zero and the two, GCC cleared the whole array by a rep stos in every micro-tile
  // without a bias, a third of the GEMM at 32 -> 16 channels: panels of one vector,
  // NVT = 1. Zen 5, AVX-512, CL forward at batch 32, 32x112->16 without a bias: 3.7 ->
  // 2.8 ms, as with one; training steps, whose GEMMs mostly have two vectors a panel,
  // processes alternated 6 times: medians 0.97-1.01x, noise.)
  V<T> acc[M][NVT], col[NVT];
  for (int v = 0; v < NVT; ++v) col[v] = o.bias_mode == 2 ? loadu(o.bias + j0 + v * L) : V<T>{};
  for (int i = 0; i < M; ++i) {
    const V<T> row = o.bias_mode == 1 ? bcast(o.bias[i0 + i]) : V<T>{};
    for (int v = 0; v < NVT; ++v) acc[i][v] = row + col[v];
  }
  // A's rows: up to 6, a pointer each, indexed by k. AVX-512's 12 rows left GCC short
  // of general registers that way, and it reloaded three row pointers and K from the
  // stack every k step; there three rows share a pointer (at offsets 0, ars, 2 ars)
  // and the 4 pointers step by acs. Granite Rapids guest, AVX-512, training step, batch
  // 8, pair-normalised, processes alternated (NCHW / CL): 728x19->728 1.03 / 1.03-1.04x,
  // 1024x7 1.01-1.02 / 1.01-1.03x, 512x14 1.02-1.04 / 1.03x, 768x7->3072 1.02-1.03x;
  // the forward 1.00-1.03x. (AVX2's 6-row code is unchanged.)
  constexpr int R = M > 6 ? 3 : 1, NP = (M + R - 1) / R;
  const T* rows[NP];
  for (int j = 0; j < NP; ++j) rows[j] = a + j * R * ars;
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    const T* ak = a + k * acs;  // row i at ak + i ars (R == 1)
    V<T> bv[NVT];
    for (int v = 0; v < NVT; ++v) bv[v] = loadu(b + v * L);
    // B's row 16 steps ahead into L1: a weight panel of a few hundred input channels
    // (96 KiB at 768) streams from L2 on every micro-tile, and the hardware
    // prefetchers left the FMAs waiting on it. (Past B's end the address is only
    // prefetched, which never faults; within L1 it costs a spare load slot.)
    const uintptr_t ahead = (uintptr_t)(b) + 16 * ldb * sizeof(T);
    for (int v = 0; v < NVT * L * (int)sizeof(T); v += 64) __builtin_prefetch((const void*)(ahead + v), 0, 3);
    if constexpr (PF) o.prefetch->step();
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      V<T> ai = bcast(R == 1 ? ak[i * ars] : rows[i / R][i % R * ars]);
      for (int v = 0; v < NVT; ++v) acc[i][v] += ai * bv[v];
    }
    if constexpr (R > 1)
      for (int j = 0; j < NP; ++j) rows[j] += acs;
  }
  if (o.transposed) {
    T* ct = o.c + j0 * o.rs + i0;
    return with_act(o.act, [&](auto a) {
      store_tile_transposed<T, M, NVT, decltype(a)::value>(acc, ct, o.rs, nr);
    });
  }
  T* c = o.c + i0 * o.rs + j0;
  const bool nt = o.streams_at(c);
  if (nr == NVT * L && (!o.accumulate || o.act == ACT_NONE)) {
    if (o.accumulate) return store_tile<T, M, NVT, ACT_NONE, true>(acc, c, o.rs, nt);
    return with_act(o.act, [&](auto a) {
      store_tile<T, M, NVT, decltype(a)::value, false>(acc, c, o.rs, nt);
    });
  }
  // The last, partial panel: whole vectors, then the first nr % L lanes of one
  // through a copy (C has no room past column nr).
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NVT && v * L < nr; ++v) {
      T* cv = c + i * o.rs + v * L;
      const int64_t n = imin(L, nr - v * L);
      V<T> r = acc[i][v];
      if (o.accumulate) {
        V<T> old{};
        __builtin_memcpy(&old, cv, n * sizeof(T));
        r += old;
      }
      r = act_vec<T>(o.act, r);
      __builtin_memcpy(cv, &r, n * sizeof(T));
    }
}

template <class T, int NVT, int M = MR, bool PF = false>
void micro_rows(int mr, int64_t K, const T* a, int64_t ars, int64_t acs, const T* B,
                int64_t ldb, const Out<T>& o, int64_t i0, int64_t j0, int64_t nr) {
  if constexpr (M > 1) {
    if (mr < M) return micro_rows<T, NVT, M - 1, PF>(mr, K, a, ars, acs, B, ldb, o, i0, j0, nr);
  }
  micro<T, M, NVT, PF>(K, a, ars, acs, B, ldb, o, i0, j0, nr);
}

// The k steps in which gemm(M, N, K, ...) advances o.prefetch: K for each micro-tile
// (MR-row blocks, or as many near-equal ones, times NR-column panels).
template <class T> int64_t gemm_steps(int64_t M, int64_t N, int64_t K) {
  return M > 0 && N > 0 ? ceil_div(M, MR) * ceil_div(N, NR<T>()) * K : 0;
}

// A panel of B (the weights, in the callers) in the outer loop, so that the weights
// are read once per call while the row blocks of A (the tile) stream past each panel.
// With o.panel_group > 1 the panels are taken in groups (that stay in L2), and within
// a group the row blocks are the outer loop: each block of A stays in L1 across the
// group's panels, and C's rows are written a group's width at a time instead of a
// panel's 128 bytes per row, Co * 4 bytes apart; all panels in one group where the
// weights fit.
template <class T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs,
          int64_t a_block, const T* B, int64_t b_panel, int64_t ldb, const Out<T>& o) {
  constexpr int64_t nr = NR<T>(), L = lanes<T>();
  const int64_t np = ceil_div(N, nr), nm = ceil_div(M, MR);
  if (M <= 0 || N <= 0) return;
  // A strided A whose last MR-row block would have 1-3 rows is cut into blocks of
  // near-equal height instead: such a block has 2-6 independent accumulators, fewer
  // than the FMA latency x pipes, and runs at a fraction of the peak (49 pixels =
  // 4 x 12 + 1). Zen 5, batch 1 forward, same process: 768x7->3072 1.07x, 1024x7
  // 1.04x, xception 1.04-1.05x, suites 1.01-1.05x.
  const bool even = !a_block && M % MR != 0 && M % MR < 4;
  auto first_row = [&](int64_t ib) { return imin(M, even ? ib * M / nm : ib * MR); };
  const int64_t group = imax(1, imin(o.panel_group, np));
  // Rows stored non-temporally (micro's nt: a streamed y, aligned) are not prefetched
  // for writing below: that read for ownership fetched each line a whole-line store then
  // bypasses, a read of all of y. Zen 5, AVX-512, channels-last forward at batch 32,
  // processes alternated 6 times: 32x112->16 1.20-1.35x, 60x28->240/g3 1.11-1.24x,
  // 32x112->64 0.92-1.06x, 96x56->384 0.93-1.08x, others 0.94-1.29x (noise); the AVX2
  // path 0.82-1.09x (no change beyond noise).
  const bool nt_rows = o.streams_at(o.c);
  for (int64_t g0 = 0; g0 < np; g0 += group)
    for (int64_t ib = 0; ib < nm; ++ib)
      for (int64_t q = g0; q < imin(np, g0 + group); ++q) {
        const T* bq = B + q * b_panel;
        const int64_t j0 = q * nr, cols = imin(nr, N - j0);
        const int64_t i0 = first_row(ib), i1 = first_row(ib + 1);
        const int mr = (int)(i1 - i0);
        const T* a = a_block ? A + ib * a_block : A + i0 * ars;
        const bool pf = o.prefetch && o.prefetch->pending();
        // The next row block's output lines, for writing (prefetchw), while this one
        // computes: a row-major C (channels-last y, the backward's stacks) takes a micro-
        // tile's rows from lines rs apart, each a miss whose read for ownership stalled
        // the stores. A transposed C (an NCHW y) takes a micro-tile's columns, the next
        // MR pixels of each of its channel planes: the lines of the block's first and
        // last pixel. Granite Rapids guest, AVX-512, NCHW forward, in-process A/B:
        // batch 8 728x19->728 1.06x, 384x14->1536 1.06x, 96x56->384 1.04x, 64x112->128/s2
        // 1.04x, 768x7->3072 1.00x, 256x28->256 0.98x; batch 32 1.00-1.09x (sum 1.06x);
        // batch 1 1.00-1.05x; the AVX2 path 0.99-1.03x (sum 1.00x).
        const int64_t n1 = first_row(ib + 2);  // the next block: rows [i1, n1)
        if (!o.transposed && !nt_rows)
          for (int64_t i = i1; i < n1; ++i)
            for (int64_t v = 0; v < cols * (int64_t)sizeof(T); v += 64)
              __builtin_prefetch((const char*)(o.c + i * o.rs + j0) + v, 1, 3);
        else if (o.transposed && n1 > i1)
          for (int64_t j = j0; j < j0 + cols; ++j) {
            __builtin_prefetch((const char*)(o.c + j * o.rs + i1), 1, 3);
            __builtin_prefetch((const char*)(o.c + j * o.rs + n1 - 1), 1, 3);
          }
        if (cols <= L)
          (pf ? micro_rows<T, 1, MR, true> : micro_rows<T, 1>)(mr, K, a, ars, acs, bq, ldb, o, i0,
                                                               j0, cols);
        else
          (pf ? micro_rows<T, NV, MR, true> : micro_rows<T, NV>)(mr, K, a, ars, acs, bq, ldb, o, i0,
                                                                 j0, cols);
      }
}
