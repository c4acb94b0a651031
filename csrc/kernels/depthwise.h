// The depthwise stage, forward and backward, and the walkers over its taps.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// Output range [lo, hi) of ow whose input column ow*s + off lies in [0, W).
inline void valid_range(int64_t W, int64_t s, int64_t off, int64_t* lo, int64_t* hi) {
  *lo = off >= 0 ? 0 : ceil_div(-off, s);
  *hi = W - 1 - off >= 0 ? floor_div(W - 1 - off, s) + 1 : 0;
}

// cols[2j], cols[2j+1]: the valid ow range of tap column j, within [0, Wo) (computed
// once per call: the divisions are too slow for the inner loops).
inline void column_ranges(const Geometry& g, int64_t* cols) {
  for (int64_t j = 0; j < g.kw; ++j) {
    valid_range(g.W, g.sw, j * g.dw - g.pl, cols + 2 * j, cols + 2 * j + 1);
    cols[2 * j + 1] = imin(cols[2 * j + 1], g.Wo);
  }
}

// For each output pixel of [p0, p1) and each tap inside the input:
// f(r, tap, input_pixel) with r the tile-local pixel and input_pixel = ih*W + iw.
template <class F> void walk_pixels(const Geometry& g, int64_t p0, int64_t p1, F&& f) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t oh = p / g.Wo, ow = p % g.Wo;
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        f(p - p0, i * g.kw + j, ih * g.W + iw);
      }
    }
  }
}

// ---------------------------------------------------------------- depthwise stage
// NHWC, depth multiplier 1: the taps of output pixel (oh, ow) that read inside the
// input form a rectangle [i0, i0 + di) x [j0, j0 + dj) (di = 0 where none does); x and
// w are the offsets of its first tap in the image (which holds rows from row0 on) and in
// the [tap][Cm] weight.
struct TapRect {
  int64_t di, dj, x, w;
};
// The tap rows [*i0, *i1) of output row oh that read inside the image.
inline void tap_rows(const Geometry& g, int64_t oh, int64_t* i0, int64_t* i1) {
  auto row_ok = [&](int64_t i) { int64_t ih = oh * g.sh - g.pt + i * g.dh; return ih >= 0 && ih < g.H; };
  *i0 = 0, *i1 = g.kh;
  while (*i0 < *i1 && !row_ok(*i0)) ++*i0;
  while (*i1 > *i0 && !row_ok(*i1 - 1)) --*i1;
}
inline TapRect tap_rect(const Geometry& g, const int64_t* cols, int64_t oh, int64_t ow,
                        int64_t row0) {
  int64_t i0, i1, j0 = 0, j1 = g.kw;
  tap_rows(g, oh, &i0, &i1);
  auto col_ok = [&](int64_t j) { return ow >= cols[2 * j] && ow < cols[2 * j + 1]; };
  while (j0 < j1 && !col_ok(j0)) ++j0;
  while (j1 > j0 && !col_ok(j1 - 1)) --j1;
  if (j0 >= j1) i1 = i0;  // no tap reads inside the input: bias only
  const int64_t x = (oh * g.sh - g.pt + i0 * g.dh - row0) * g.W + ow * g.sw - g.pl + j0 * g.dw;
  return {i1 - i0, j1 - j0, x * g.C, (i0 * g.kw + j0) * g.Cm};
}

// NHWC, depth multiplier 1, over the taps' rectangle (tap_rect). PX pixels of one
// row (ps apart in x, ldu apart in U) times B vectors of channels accumulate in
// registers over it (at least 4 independent FMA chains where the channels allow), and
// act1 is applied before the one store. Channels [c, nc) of the pointers given (a
// range's first channel); Cm is the weight's row stride.
// Always inlined, and its loop body too, so that act1 is the caller's constant
// (dw_run): GCC had left the body out of line on the AVX2 path for some activations,
// where act1 then arrived as a value and every stored vector went through the
// activation's switch. Zen 5, AVX2 path, batch 8, processes alternated three times:
// mobilenet_v1 (relu) CL forward 32x112->64 0.85-0.88x the time, 64x112->128/s2
// 0.84-0.96x, 128x56->128 0.90-0.94x, 256x28->256 0.95-0.99x (the five layers' sum
// 0.90-0.95x), NCHW 0.93-0.94x, training 0.92-0.97x; mobilenet_v2 0.87-1.00x, and
// shufflenet_v1, convnext, xception 0.95-1.06x (noise); on AVX-512, where it was
// inlined already, mobilenet_v1 / v2 and convnext 0.95-1.06x (noise).
template <class T, int PX, int B, int DJ = 0>
[[gnu::always_inline]] inline int64_t dw_block(const T* x, int64_t ps, int64_t xs_i,
                                               int64_t xs_j, const T* w, int64_t ws_i,
                                               int64_t Cm, int64_t nc, int64_t di, int64_t dj,
                                               const T* dwb, int act1, T* u, int64_t ldu,
                                               int64_t c) {
  constexpr int L = lanes<T>();
  // channels [c, c + B*L) of the PX pixels
  auto channels = [&](int64_t c) __attribute__((always_inline)) {
    V<T> acc[PX][B];
    for (int b = 0; b < B; ++b) acc[0][b] = dwb ? loadu(dwb + c + b * L) : V<T>{};
    for (int q = 1; q < PX; ++q)
      for (int b = 0; b < B; ++b) acc[q][b] = acc[0][b];
    const int64_t ncols = DJ ? DJ : dj;  // DJ: the tap columns, known at compile time
    for (int64_t i = 0; i < di; ++i)
#pragma GCC unroll 8
      for (int64_t j = 0; j < ncols; ++j) {
        const T* xp = x + i * xs_i + j * xs_j + c;
        const T* wp = w + i * ws_i + j * Cm + c;
        for (int b = 0; b < B; ++b) {
          const V<T> wv = loadu(wp + b * L);
          for (int q = 0; q < PX; ++q) acc[q][b] += loadu(xp + q * ps + b * L) * wv;
        }
      }
    for (int q = 0; q < PX; ++q)
      for (int b = 0; b < B; ++b) storeu(u + q * ldu + c + b * L, act_vec<T>(act1, acc[q][b]));
  };
  for (; c + B * L <= nc; c += B * L) channels(c);
  // One vector (B = 1, the last block the callers run) also takes the channels past
  // the last whole vector where nc >= L: a vector ending at nc recomputes a few
  // channels of the one before it (the same arithmetic, so the same bits) instead of
  // the scalar tail, which at Cm = 58 took 10 of 58 channels and most of the stage.
  if (B == 1 && c < nc && nc >= L) {
    channels(nc - L);
    c = nc;
  }
  return c;
}

// nb blocks of PX pixels, one after another along a row of full taps (the same tap
// rectangle), for channels [0, nc), nc >= one vector. A whole row's worth per call,
// with act1 a template argument: at 32 channels a 4-pixel block is 72 FMAs, and the
// per-block work around it (the tap rectangle, the input prefetch, the activation's
// switch at every store) took more time than they did. Zen 5, fused forward, CL, in-
// process A/B: AVX-512 batch 32 32x112->16 1.37x, 96x112->24/s2 1.36x, 144x56->32/s2
// 1.30x, 32x112->64 1.18x, 128x56->128 1.09x, 728x19->728 1.00x; AVX2 batch 8
// 32x112->16 1.53x, 144x56->24 1.25x, 32x112->64 1.20x.
// Seven tap columns (ConvNeXt's 7x7, which AVX2 runs here: dw_segment is AVX-512's)
// are unrolled whole (DJ = 7): no loop branch and pointer steps per tap. Granite Rapids
// guest, AVX2, forward, batch 8, in-process A/B: 96x56->384 1.02-1.03x, 192x28->768
// 1.03-1.05x, 384x14->1536 1.00-1.01x (CL; NCHW 1.02x). Not at 3 or 5 columns: 3x3
// lost 0.94-1.00x, 5x5 0.96-1.01x.
template <class T, int PX, int A, int DJ = 0>
void dw_run(int64_t nb, const T* x, int64_t ps, int64_t xs_i, int64_t xs_j, const T* w,
            int64_t ws_i, int64_t Cm, int64_t nc, int64_t di, int64_t dj, const T* dwb, T* u,
            int64_t ldu) {
  if constexpr (DJ == 0)
    if (dj == 7) return dw_run<T, PX, A, 7>(nb, x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, u, ldu);
  for (int64_t b = 0; b < nb; ++b, x += PX * ps, u += PX * ldu) {
    const int64_t c = dw_block<T, PX, 2, DJ>(x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, A, u, ldu, 0);
    dw_block<T, PX, 1, DJ>(x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, A, u, ldu, c);
  }
}

template <class T, int PX>
void dw_run_act(int act1, int64_t nb, const T* x, int64_t ps, int64_t xs_i, int64_t xs_j,
                const T* w, int64_t ws_i, int64_t Cm, int64_t nc, int64_t di, int64_t dj,
                const T* dwb, T* u, int64_t ldu) {
  with_act(act1, [&](auto a) {
    dw_run<T, PX, decltype(a)::value>(nb, x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, u, ldu);
  });
}

// S output pixels of one row (stride SW, dilation 1), for channels [0, nc) of the
// pointers given, nc >= one vector. Per tap row, the NX input vectors the S pixels read
// are loaded once into registers and each tap column's weight multiplies S of them: NX +
// KW loads for S * KW FMAs (at 7 taps, 21 for 56, where dw_block's 4 pixels x 2 vectors
// take 70 for 56), with S independent accumulators at every step. The sum runs in
// dw_block's order (bias, then the taps row by row), so the bits are the same.
// Zen 5, one thread, cycles per output vector with the image in L2: 7x7 taps 52 -> 41
// at 56 columns, 74 -> 60 at 28, 86 -> 79 at 14; no gain at 3x3 (13.4 either way),
// where it is not used. AVX-512 only: with 16 registers, 4 pixels are all that fit, and
// 4 accumulators are fewer than the FMA latency x pipes (AVX2, one thread: 7x7 at 14
// columns 1.15x slower).
// Border pixels take it too (MASK): of the NX input columns, only [lo, hi) lie inside
// the image (x points at column lo), and the others read as zeros, as the zero padding
// they stand for; 0 * w adds nothing, so the bits are still dw_block's. It replaced a
// zero-padded copy of each tile's input band (a sixth of a 5x5 depthwise pass over
// 672x14x14, its halo rows copied again for every tile). Zen 4, AVX-512, batch 8, SE
// mean pass (5x5, silu), in-process A/B against the copy: CL 672x14 1.31x, 480x14
// 1.18x, 672x14/s2 1.44x, 1152x7 1.34x; NCHW 1.16-1.31x; 3x3 layers and those with
// few border columns 0.99-1.04x.
template <class T, int S, int KW, int SW, bool MASK>
void dw_segment(const T* x, int64_t xs_c, int64_t xs_i, int lo, int hi, const T* w,
                int64_t ws_i, int64_t Cm, int64_t nc, int64_t di, const T* dwb, int act1, T* u,
                int64_t ldu) {
  constexpr int L = lanes<T>(), NX = (S - 1) * SW + KW;
  static_assert(S + NX + 1 <= 32, "accumulators, inputs and a weight in 32 registers");
  // Channels [c, c + L); the last vector ends at nc, overlapping the one before it
  // where nc is not a multiple of L (the same arithmetic, so the same bits).
  // MASK: column n is loaded with lanes[n] lanes (all, or none: zeros, and no memory
  // read) from offset[n], a column inside the image either way.
  int lanes_of[MASK ? NX : 1];
  int64_t offset[MASK ? NX : 1];
  if constexpr (MASK)
    for (int n = 0; n < NX; ++n) {
      const bool in = n >= lo && n < hi;
      lanes_of[n] = in ? L : 0;
      offset[n] = (in ? n - lo : 0) * xs_c;
    }
  for (int64_t c0 = 0; c0 < nc; c0 += L) {
    const int64_t c = imin(c0, nc - L);
    V<T> acc[S];
    const V<T> b = dwb ? loadu(dwb + c) : V<T>{};
    for (int q = 0; q < S; ++q) acc[q] = b;
    for (int64_t i = 0; i < di; ++i) {
      const T* xr = x + i * xs_i + c;
      const T* wr = w + i * ws_i + c;
      V<T> xv[NX];
      for (int n = 0; n < NX; ++n)
        if constexpr (MASK)
          xv[n] = load_n(xr + offset[n], lanes_of[n]);
        else
          xv[n] = loadu(xr + n * xs_c);
      for (int j = 0; j < KW; ++j) {
        const V<T> wv = loadu(wr + j * Cm);
        for (int q = 0; q < S; ++q) acc[q] += xv[q * SW + j] * wv;
      }
    }
    for (int q = 0; q < S; ++q) storeu(u + q * ldu + c, act_vec<T>(act1, acc[q]));
  }
}

// The segment kernel for the shape (5 or 7 tap columns, stride 1 or 2), or null.
template <class T>
using SegmentFn = void (*)(const T*, int64_t, int64_t, int, int, const T*, int64_t, int64_t,
                           int64_t, int64_t, const T*, int, T*, int64_t);
template <class T, int S, bool MASK> SegmentFn<T> segment_for(int64_t kw, int64_t sw) {
  if (kw == 5) return sw == 1 ? dw_segment<T, S, 5, 1, MASK> : dw_segment<T, S, 5, 2, MASK>;
  if (kw == 7) return sw == 1 ? dw_segment<T, S, 7, 1, MASK> : dw_segment<T, S, 7, 2, MASK>;
  return nullptr;
}

template <class T>
void dw_forward_nhwc(const Geometry& g, const int64_t* cols, const T* xn, int64_t row0,
                     int64_t row1, const T* wt, const T* dwb, int act1, int64_t p0, int64_t p1,
                     T* U, int64_t ldu, int64_t c0, int64_t c1) {
  constexpr int PX = 4;
  const int64_t Cm = g.Cm, C = g.C, ps = g.sw * C, xs_i = g.dh * g.W * C, xs_j = g.dw * C,
                ws_i = g.kw * Cm, nc = c1 - c0;
  if (dwb) dwb += c0;
  // Output columns [ca, cb) see every tap column.
  int64_t ca = 0, cb = g.Wo;
  for (int64_t j = 0; j < g.kw; ++j) ca = imax(ca, cols[2 * j]), cb = imin(cb, cols[2 * j + 1]);
  // Row segments (dw_segment, AVX-512) where the shape has them: 5 or 7 tap columns,
  // stride 1 or 2, no dilation, at least one vector of channels. 8 pixels, or 7 where
  // 7 divides the row and 8 does not (7, 14 and 28 columns: no pixel made twice, and a
  // 7x7 image takes them at all).
  int64_t seg = 0;
  SegmentFn<T> full = nullptr, masked = nullptr;
  if constexpr (VB >= 64) {
    if (g.dw == 1 && nc >= lanes<T>() && (g.sw == 1 || g.sw == 2) && (g.kw == 5 || g.kw == 7)) {
      seg = g.Wo % 8 && g.Wo % 7 == 0 ? 7 : 8;
      full = seg == 7 ? segment_for<T, 7, false>(g.kw, g.sw) : segment_for<T, 8, false>(g.kw, g.sw);
      masked = seg == 7 ? segment_for<T, 7, true>(g.kw, g.sw) : segment_for<T, 8, true>(g.kw, g.sw);
    }
  }
  // Where n pixels from p would run past the row's full-tap columns or the tile's end,
  // they start as many pixels earlier, recomputing some (the same arithmetic, so the
  // same bits): the 4-pixel kernel instead of the one-pixel one for a row's last
  // pixels, where that recomputes at most half of them (7 columns of 3x3 taps: 3 of 4
  // again, 0.97x). The shift, or -1 where n pixels of columns [a, b) do not fit there:
  // full-tap columns for the blocks, the whole row for a segment (borders masked).
  auto shift = [&](int64_t p, int64_t ow, int64_t n, int64_t a, int64_t b) -> int64_t {
    if (ow < a || ow >= b || b - a < n) return -1;
    const int64_t back = imax(0, imax(ow + n - b, p + n - p1));
    return 2 * back <= n && ow - back >= a && p - back >= p0 ? back : -1;
  };
  for (int64_t p = p0; p < p1;) {
    int64_t ow = p % g.Wo;
    const int64_t back_seg = seg ? shift(p, ow, seg, 0, g.Wo) : -1;
    const int64_t back = back_seg >= 0 ? back_seg : shift(p, ow, PX, ca, cb);
    if (back > 0) p -= back, ow -= back;
    const int64_t oh = p / g.Wo;
    const TapRect t = tap_rect(g, cols, oh, ow, row0);
    const int64_t di = t.di, dj = t.dj;
    const T* x = xn + t.x + c0;
    const T* w = wt + t.w + c0;
    T* u = U + (p - p0) * ldu + c0;
    // The channels dw_block leaves (only where nc < one vector), one at a time.
    auto scalar_tail = [&](int64_t npx, int64_t from) {
      for (int64_t q = 0; q < npx; ++q)
        for (int64_t c = from; c < nc; ++c) {
          T acc = dwb ? dwb[c] : T(0);
          for (int64_t i = 0; i < di; ++i)
            for (int64_t j = 0; j < dj; ++j)
              acc += x[q * ps + i * xs_i + j * xs_j + c] * w[i * ws_i + j * Cm + c];
          u[q * ldu + c] = act(act1, acc);
        }
    };
    const bool segment = back_seg >= 0, block = !segment && back >= 0;  // pixels of the same rectangle
    // With a vector of channels or more, the blocks run on to the row's last full-tap
    // pixel in the tile (at least one block: shift() left room for it).
    const bool run = block && nc >= lanes<T>();
    const int64_t npx = segment ? seg : run ? imin(cb - ow, p1 - p) / PX * PX : block ? PX : 1;
    // Prefetch the input rows that output row oh + 1 adds, under these pixels' columns
    // (to the row's end at its last pixel). The depthwise stage otherwise waits on
    // DRAM: in a network x arrives from cold cache, and the hardware prefetcher
    // ramps up too slowly over tiles of a few rows.
    const int64_t c_lo = ow * g.sw, c_hi = ow + npx == g.Wo ? g.W : imin((ow + npx) * g.sw, g.W);
    // With a block of the channels (the mean's NCHW channel blocks, the backward's split),
    // only its lines of each pixel: the whole rows were fetched again for every block.
    // Zen 5, NCHW batch 1 mean pass (silu), processes alternated 6 times: 672x14 k5
    // 1.07-1.24x, 672x14/s2 1.22-1.42x, 480x14 1.02-1.23x, 1152x7 k3 1.13-1.16x (k5
    // 0.86-1.41x, noise); the split backward at batch 1 unchanged.
    for (int64_t ih = imax(oh * g.sh - g.pt + (g.kh - 1) * g.dh + 1, 0),
                 ie = imin((oh + 1) * g.sh - g.pt + (g.kh - 1) * g.dh + 1, row1);
         ih < ie && c_lo < c_hi; ++ih) {
      const char* r = (const char*)(xn + ((ih - row0) * g.W + c_lo) * C);
      if (nc == C) {
        const int64_t bytes = (c_hi - c_lo) * C * (int64_t)sizeof(T);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 2);  // T1: into L2
      } else {
        for (int64_t q = 0; q < c_hi - c_lo; ++q)
          for (int64_t b = 0; b < nc * (int64_t)sizeof(T); b += 64)
            __builtin_prefetch(r + (q * C + c0) * (int64_t)sizeof(T) + b, 0, 2);
      }
    }
    if (segment) {
      // its tap rows inside the image, and its NX input columns [lo, hi) inside it
      const int64_t ih0 = oh * g.sh - g.pt, ic0 = ow * g.sw - g.pl, nx = (seg - 1) * g.sw + g.kw;
      int64_t i0, i1;
      tap_rows(g, oh, &i0, &i1);
      const int lo = (int)imax(0, -ic0), hi = (int)imin(nx, g.W - ic0);
      if (hi <= lo) i1 = i0;  // no input column: the bias alone
      const T* xs = hi <= lo ? xn : xn + ((ih0 + i0 * g.dh - row0) * g.W + ic0 + lo) * C + c0;
      (lo > 0 || hi < nx ? masked : full)(xs, C, xs_i, lo, hi, wt + i0 * ws_i + c0, ws_i, Cm, nc,
                                          i1 - i0, dwb, act1, u, ldu);
      p += seg;
    } else if (run) {
      dw_run_act<T, PX>(act1, npx / PX, x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, u, ldu);
      p += npx;
    } else if (block) {  // fewer channels than a vector: the scalar loop takes them all
      scalar_tail(PX, 0);
      p += PX;
    } else {
      int64_t c = dw_block<T, 1, 4>(x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, act1, u, ldu, 0);
      c = dw_block<T, 1, 1>(x, ps, xs_i, xs_j, w, ws_i, Cm, nc, di, dj, dwb, act1, u, ldu, c);
      scalar_tail(1, c);
      ++p;
    }
  }
}

// act1(depthwise output) of pixels [p0, p1) and mid channels [c0, c1) of the NHWC
// image xn into U[r][c] at U + r*ldu, applied while the tile is still in L1. xn holds
// input rows [row0, row1) only, from row0 on; wt is the weight as [tap][Cm].
template <class T>
void dw_forward(const Geometry& g, const int64_t* cols, const T* xn, int64_t row0, int64_t row1,
                const T* wt, const T* dwb, int act1, int64_t p0, int64_t p1, T* U, int64_t ldu,
                int64_t c0, int64_t c1) {
  const int64_t Cm = g.Cm, C = g.C, m = g.m;
  if (m == 1)
    return dw_forward_nhwc(g, cols, xn, row0, row1, wt, dwb, act1, p0, p1, U, ldu, c0, c1);
  for (int64_t p = p0; p < p1; ++p) {
    T* u = U + (p - p0) * ldu;
    for (int64_t c = c0; c < c1; ++c) u[c] = dwb ? dwb[c] : T(0);
    const int64_t oh = p / g.Wo, ow = p % g.Wo;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        const T* xp = xn + ((ih - row0) * g.W + iw) * C;
        const T* w = wt + (i * g.kw + j) * Cm;
        for (int64_t c = c0; c < c1; ++c) u[c] += xp[c / m] * w[c];
      }
    }
    act_inplace(act1, u + c0, c1 - c0);
  }
}

// Depthwise backward, NHWC, depth multiplier 1, for the whole output rows [oh0, oh1)
// and the channels [c, c + NC vectors), or (PART) the last tail < L channels alone.
// Per tap, a sweep along the row: dW's sums stay in registers over it (one
// read-modify-write per tap and row, where pixel by pixel each tap's was one per
// pixel), and dx's read-modify-writes step through the row, so the next tap's update
// of the same input pixel comes a row later instead of a few instructions later.
// The channels past the last whole vector take masked loads and stores, in a sweep
// of their own (an overlapping whole vector, as in the forward, would add some
// channels twice). Against pixel by pixel with a scalar tail: the backward call
// 1.13-1.32x faster at 24 and 58 channels, 1.2-1.3x at 32 and 96, about even on
// the GEMM-bound wide layers (AVX-512, Sapphire Rapids; AVX2 1.0-1.1x).
template <class T, int NC, bool PART>
void dw_backward_rows(const Geometry& g, const int64_t* cols, const T* xn, int64_t row0,
                      const T* wt, const T* G, int64_t ldg, int64_t oh0, int64_t oh1, int64_t c,
                      int tail, T* gdw, T* gxn) {
  constexpr int L = lanes<T>();
  const int64_t Cm = g.Cm, xs = g.sw * g.C;
  static_assert(!PART || NC == 1, "the tail is one part vector");
  auto ld = [tail](const T* p) { return PART ? load_n(p, tail) : loadu(p); };
  auto st = [tail](T* p, V<T> v) { if (PART) store_n(p, v, tail); else storeu(p, v); };
  for (int64_t oh = oh0; oh < oh1; ++oh)
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t lo = cols[2 * j], hi = cols[2 * j + 1], tap = i * g.kw + j;
        if (lo >= hi) continue;
        const int64_t off = ((ih - row0) * g.W + lo * g.sw - g.pl + j * g.dw) * g.C + c;
        const T* g0 = G + ((oh - oh0) * g.Wo + lo) * ldg + c;
        // A sweep along the row for dW (dw), dx (dx) or both: two sets of sums (even and
        // odd pixels) for independent FMA chains, indexed by constants only (kept in
        // registers); dx's updates in pixel order. Its arguments are literals, so each
        // call compiles to the sweep it asks for.
        auto sweep = [&](bool dw, bool dx) {
          V<T> a0[NC] = {}, a1[NC] = {}, wv[NC];
          if (dx)
            for (int k = 0; k < NC; ++k) wv[k] = ld(wt + tap * Cm + c + k * L);
          const T* gp = g0;
          const T* xp = xn + off;
          T* gx = gxn + off;
          auto one = [&](V<T>* a, const T* gq, const T* xq, T* gxq) {
            for (int k = 0; k < NC; ++k) {
              const V<T> gv = ld(gq + k * L);
              if (dw) a[k] += gv * ld(xq + k * L);
              if (dx) st(gxq + k * L, ld(gxq + k * L) + gv * wv[k]);
            }
          };
          int64_t ow = lo;
          for (; ow + 1 < hi; ow += 2, gp += 2 * ldg, xp += 2 * xs, gx += 2 * xs) {
            one(a0, gp, xp, gx);
            one(a1, gp + ldg, xp + xs, gx + xs);
          }
          if (ow < hi) one(a0, gp, xp, gx);
          if (dw) {
            T* gw = gdw + tap * Cm + c;
            for (int k = 0; k < NC; ++k) st(gw + k * L, ld(gw + k * L) + (a0[k] + a1[k]));
          }
        };
        // With both gradients and 32 registers, one sweep: each G vector is loaded once
        // for both, and either gradient alone has the same bits (the same sums, in the
        // same order). Zen 5, backward call, batch 32, in-process A/B: CL 1.03-1.06x at
        // 16-96 channels, 1.01x at 728; NCHW 1.03-1.06x. AVX2 (16 registers):
        // 0.97-1.02x, so it keeps two sweeps.
        if (VB >= 64 && gdw && gxn) {
          sweep(true, true);
          continue;
        }
        if (gdw) sweep(true, false);
        if (gxn) sweep(false, true);
      }
    }
}

// Channels [c0, c1) of dw_backward_rows: blocks of 4 vectors, the whole vectors left,
// the tail.
template <class T>
void dw_backward_nhwc(const Geometry& g, const int64_t* cols, const T* xn, int64_t row0,
                      const T* wt, const T* G, int64_t ldg, int64_t oh0, int64_t oh1, T* gdw,
                      T* gxn, int64_t c0, int64_t c1) {
  constexpr int L = lanes<T>();
  int64_t c = c0;
  for (; c + 4 * L <= c1; c += 4 * L)
    dw_backward_rows<T, 4, false>(g, cols, xn, row0, wt, G, ldg, oh0, oh1, c, 0, gdw, gxn);
  const int tail = (int)((c1 - c0) % L);
  auto run = [&](auto f) { f(g, cols, xn, row0, wt, G, ldg, oh0, oh1, c, tail, gdw, gxn); };
  switch ((c1 - c) / L) {
    case 1: run(dw_backward_rows<T, 1, false>); break;
    case 2: run(dw_backward_rows<T, 2, false>); break;
    case 3: run(dw_backward_rows<T, 3, false>); break;
  }
  c = c1 - tail;
  if (tail) run(dw_backward_rows<T, 1, true>);
}

// sums[c] += the sum of rows [0, rows) of G (ldg apart), channels [c0, c1), in row
// order: a bias's gradient. Eight rows at a time, each block of channels in registers
// over them. Added row by row into memory, each row's store and the next row's load of
// the same sums made a chain through memory, whose speed depended on where the sums lay
// (32x112->16 at 32 channels, training step, batch 8, CL, AVX-512, processes alternated:
// 1.02-1.09x the time with the sums in BlockSums' parts, 0.93-1.04x with them 1 KiB
// further on; this way 0.91-1.00x). Eight rows, not all: a block of channels over all
// the rows would walk G down its columns, out of L2 at hundreds of channels.
template <class T>
void column_sums(const T* G, int64_t ldg, int64_t rows, int64_t c0, int64_t c1, T* sums) {
  constexpr int L = lanes<T>();
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const T* g0 = G + r0 * ldg;
    const int64_t nr = imin(8, rows - r0);
    int64_t c = c0;
    for (; c + 4 * L <= c1; c += 4 * L) {
      V<T> s[4];
      for (int k = 0; k < 4; ++k) s[k] = loadu(sums + c + k * L);
      for (int64_t r = 0; r < nr; ++r)
        for (int k = 0; k < 4; ++k) s[k] += loadu(g0 + r * ldg + c + k * L);
      for (int k = 0; k < 4; ++k) storeu(sums + c + k * L, s[k]);
    }
    for (; c < c1; c += L) {
      const int n = (int)imin(L, c1 - c);
      V<T> s = load_n(sums + c, n);
      for (int64_t r = 0; r < nr; ++r) s += load_n(g0 + r * ldg + c, n);
      store_n(sums + c, s, n);
    }
  }
}

// Depthwise backward for pixels [p0, p1) and mid channels [c0, c1) (whole input
// channels: multiples of m): G[r][c] at G + r*ldg holds d loss / d U. Accumulates into
// gdw ([tap][Cm]), gdwb and gxn (any may be null); xn and gxn are NHWC and hold input
// rows from row0 on.
template <class T>
void dw_backward(const Geometry& g, const int64_t* cols, const T* xn, int64_t row0, const T* wt,
                 const T* G, int64_t ldg, int64_t p0, int64_t p1, T* gdw, T* gdwb, T* gxn,
                 int64_t c0, int64_t c1) {
  const int64_t P = p1 - p0, Cm = g.Cm, C = g.C, m = g.m;
  if (gdwb) column_sums(G, ldg, P, c0, c1, gdwb);
  if (!gdw && !gxn) return;
  if (m == 1)  // bands are whole output rows: p0 and p1 are multiples of Wo
    return dw_backward_nhwc(g, cols, xn, row0, wt, G, ldg, p0 / g.Wo, p1 / g.Wo, gdw, gxn, c0,
                            c1);
  walk_pixels(g, p0, p1, [&](int64_t r, int64_t tap, int64_t ip) {
    ip -= row0 * g.W;
    const T* gr = G + r * ldg;
    const T* xp = xn + ip * C;
    const T* w = wt + tap * Cm;
    if (gdw)
      for (int64_t c = c0; c < c1; ++c) gdw[tap * Cm + c] += gr[c] * xp[c / m];
    if (gxn)
      for (int64_t c = c0; c < c1; ++c) gxn[ip * C + c / m] += gr[c] * w[c];
  });
}
