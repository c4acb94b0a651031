// Squeeze-and-excitation's squeeze, fused: out[n][c] = the mean over the output pixels
// of act1(dw(x) + b_dw)[n][c], without the full-size intermediate. The forward's tiles
// and depthwise stage (forward.h), with a column sum in place of the pointwise GEMM.
// A fragment of kernels.h, included after forward.h.
//
// Each thread sums its tiles into its own N x Cm partial sums, in double (an image's
// mean is a sum of up to 12544 pixels at 112x112); they are added in thread order at
// the end, so the result does not depend on the timing.
//
// u (null, or (N, Cm, Ho, Wo) channels-last, whatever x's layout): the intermediate
// itself is stored too, for a forward that then runs the pointwise stage on it rather
// than a second depthwise (see _ops.call). The depthwise stage writes it in place and
// the sums read it back from cache (a tile made apart and copied out pixel by pixel
// took as long as the silu: Zen 4, batch 8, CL, mean pass with keep and silu, before /
// after in separate runs, 32x112 1929 -> 1686 us, 144x56 2293 -> 1727 us). In x's
// layout an NCHW u was transposed twice more (out of the tile here, back into the
// forward's tiles): the forward makes its y in x's layout instead.
//
// An NCHW batch of few small images (14x14, 7x7: the whole image's input and
// intermediate for a block of channels within the tile budget) goes by (image, channel
// block) instead of by pixel tiles: at batch 1 a 14x14 image took 4 tiles of 3.5 output
// rows, and each transposed 7.5 input rows, 2.1 times the image in all. Zen 4, batch 1,
// NCHW, in-process A/B, mean pass with silu: 672x14 (5x5) 1.76-1.80x, 672x14/s2 2.25x,
// 480x14 1.26-1.31x, 1152x7 1.23x, 480x14 (3x3) 1.18x, 1152x7 (3x3) 0.90x. Not at batch
// 8 (3 tiles an image, each on its own thread: 0.86-1.11x), nor channels-last (no
// transposes: 0.75-1.03x at batch 1). Channels per block (64 floats, 32 doubles: four
// vectors; 32 and 128 floats were no better), or 0 (pixel tiles).
template <class T> int64_t mean_channel_block(const Geometry& g, int64_t P) {
  const int64_t blk = 4 * lanes<T>();
  const bool few_tiles = g.N * ceil_div(g.Ho * g.Wo, P) <= 2 * g.threads;
  const bool fits = (g.H * g.W + g.Ho * g.Wo) * blk * (int64_t)sizeof(T) <= g.tile_bytes;
  return !g.channels_last && g.m == 1 && few_tiles && fits && g.Cm > blk ? blk : 0;
}

template <class T>
int mean_impl(const Geometry& g, const T* x, const T* dww, const T* dwb, T* out, T* u) {
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, kk = g.kh * g.kw;
  const bool cl = g.channels_last;
  const int64_t tile = tile_pixels<T>(g, 8, false), blk = mean_channel_block<T>(g, tile);
  const int64_t blocks = blk ? ceil_div(Cm, blk) : 0, P = blk ? HWo : tile,
                tiles_per_image = ceil_div(HWo, P);
  const int64_t ldu = padded_ld<T>(Cm, 16, 1024);
  constexpr int64_t line = 64 / (int64_t)sizeof(T);
  const int64_t lw = round_up(kk * Cm, line), lc = round_up(2 * g.kw, 8);
  // NCHW: the band of input rows as NHWC (with channel blocks, a block's channels of
  // the whole image)
  const int64_t band = cl ? 0 : round_up(blk ? g.H * g.W * g.C : band_elems(g, P), line);
  const int64_t per_thread = (u ? 0 : P * ldu) + band, sums = round_up(g.N * Cm, 8);
  Buf<T> wt(0, g.threads * lw), ws(1, g.threads * per_thread);
  Buf<double> acc(2, g.threads * sums);
  Buf<int64_t> cols(3, g.threads * lc);
  if (!wt.p || !ws.p || !acc.p || !cols.p) return OUT_OF_MEMORY;

  int team = 1;
#pragma omp parallel num_threads(g.threads)
  {
  const DenormalMode mode(g.flush_denormals);
  const int64_t tid = omp_get_thread_num();
  if (tid == 0) team = omp_get_num_threads();
  T* const wt_t = wt.p + tid * lw;
  int64_t* const cols_t = cols.p + tid * lc;
  prepare_weights(g, dww, (const T*)nullptr, wt_t, (T*)nullptr, cols_t);
  T* const U = ws.p + tid * per_thread;
  T* const xb = U + (u ? 0 : P * ldu);  // (a kept intermediate is made in place)
  const int64_t ld = u ? Cm : ldu;  // the intermediate's row stride, kept or not
  double* const S = acc.p + tid * sums;
  memset(S, 0, g.N * Cm * sizeof(double));
  // Columns [c0, c1) of rows [0, rows) of V (ld apart) into image n's sums.
  auto add_rows = [&](const T* V, int64_t ld, int64_t rows, int64_t n, int64_t c0, int64_t c1) {
    double* s = S + n * Cm;
    for (int64_t p = 0; p < rows; ++p) {
      const T* v = V + p * ld;
      for (int64_t c = c0; c < c1; ++c) s[c] += (double)v[c];
    }
  };
  int64_t t_begin, t_end;
  if (blk) {
    static_range(g.N * blocks, tid, omp_get_num_threads(), &t_begin, &t_end);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n = t / blocks, c0 = (t % blocks) * blk, c1 = imin(c0 + blk, Cm);
      const T* xn = x + n * g.C * g.H * g.W;
      if (!cl) {  // this block's channels of the image, NHWC, in place in a whole-width band
        transpose_copy(xn + c0 * g.H * g.W, g.H * g.W, xb + c0, g.C, c1 - c0, g.H * g.W);
        xn = xb;
      }
      T* const V = u ? u + n * HWo * Cm : U;  // the intermediate, kept or not
      dw_forward(g, cols_t, xn, 0, g.H, wt_t, dwb, g.act1, 0, HWo, V, ld, c0, c1);
      add_rows(V, ld, HWo, n, c0, c1);
    }
  } else {
    static_range(g.N * tiles_per_image, tid, omp_get_num_threads(), &t_begin, &t_end);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n = t / tiles_per_image, p0 = (t % tiles_per_image) * P,
                    p1 = imin(p0 + P, HWo);
      T* const V = u ? u + (n * HWo + p0) * Cm : U;  // the intermediate, kept or not
      depthwise_pixels(g, cols_t, x + n * g.C * g.H * g.W, p0, p1, wt_t, dwb, V, ld, xb, nullptr);
      add_rows(V, ld, p1 - p0, n, 0, Cm);
    }
  }
  }
  for (int64_t i = 0; i < g.N * Cm; ++i) {
    double total = 0;
    for (int k = 0; k < team; ++k) total += acc.p[k * sums + i];
    out[i] = (T)(total / (double)HWo);
  }
  return OK;
}
