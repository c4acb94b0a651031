// The fused forward driver: tiles, threads, depthwise then GEMM per tile.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// Pixels per tile: the depthwise tile U (P x Cm) should stay within ~256 KiB of L2,
// and an image's tiles should be equal in size so that the threads finish together.
// unit: the granularity of the GEMM dimension that pixels map to (1 for NHWC, where
// a partial micro-tile row block costs in proportion to its rows). With few tiles
// in all, their number is raised to a multiple of the threads while tiles keep at
// least min_p pixels: 7 tiles on 2 threads leave one idle for a whole tile.
template <class T> int64_t tile_pixels(const Geometry& g, int64_t unit, int64_t min_p) {
  const int64_t HWo = g.Ho * g.Wo;
  const int64_t p = imax(unit, imin((int64_t)(256 * 1024 / sizeof(T)) / imax(g.Cm, 1), 2048));
  int64_t n = ceil_div(HWo, p);
  for (int64_t k = n; g.N * k < 8 * g.threads && ceil_div(HWo, k) >= min_p; ++k)
    if ((g.N * k) % g.threads == 0) {
      n = k;
      break;
    }
  return round_up(ceil_div(HWo, n), unit);
}

// ---------------------------------------------------------------- forward
template <class T>
int forward_impl(const Geometry& g, const T* x, const T* dww, const T* pww, const T* dwb,
                 const T* pwb, T* y) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, Co = g.Co, kk = g.kh * g.kw;
  const bool cl = g.channels_last;
  // NHWC: rows = pixels, columns = output channels; NCHW: the transpose.
  const int64_t P = cl ? tile_pixels<T>(g, 1, 4 * MR) : tile_pixels<T>(g, nr, 2 * nr);
  const int64_t ldu = cl ? padded_ld<T>(Cm) : P;
  const int64_t co_unit = cl ? nr : MR;
  const int64_t pixel_tiles = g.N * ceil_div(HWo, P);
  // Split the output channels too when there are few pixel tiles (batch 1, 7x7):
  // up to two tiles per thread, each holding a share of the weights in L2. Each
  // split recomputes its depthwise tile (k^2/Co extra work).
  int64_t co_splits = imin(ceil_div(2 * g.threads, imax(pixel_tiles, 1)), ceil_div(Co, 4 * co_unit));
  // With few tiles, a count that is not a multiple of the threads leaves one idle.
  while (co_splits < ceil_div(Co, co_unit) && (pixel_tiles * co_splits) % g.threads != 0 &&
         pixel_tiles * co_splits < 8 * g.threads)
    ++co_splits;
  const int64_t co_block = round_up(ceil_div(Co, co_splits), co_unit);
  co_splits = ceil_div(Co, co_block);

  const int64_t npanels = cl ? ceil_div(Co, nr) : 0;
  Buf<T> wt(cl ? kk * Cm : 0), bp(npanels * nr * Cm), bias(round_up(Co, nr), true);
  Buf<int64_t> cols(2 * g.kw);
  const int64_t per_thread = cl ? P * ldu : Cm * ldu;
  Buf<T> ws(g.threads * per_thread);
  if (!wt.p || !bp.p || !bias.p || !ws.p || !cols.p) return OUT_OF_MEMORY;
  column_ranges(g, cols.p);
  if (cl)
    for (int64_t c = 0; c < Cm; ++c)
      for (int64_t t = 0; t < kk; ++t) wt.p[t * Cm + c] = dww[c * kk + t];
  if (pwb)
    for (int64_t co = 0; co < Co; ++co) bias.p[co] = pwb[co];

  const int64_t ntiles = pixel_tiles * co_splits;
#pragma omp parallel num_threads(g.threads)
  {
#pragma omp for schedule(static)
  for (int64_t q = 0; q < npanels; ++q) pack_wt_panel(pww, Co, Cm, q, bp.p);
#pragma omp for schedule(static)
  for (int64_t t = 0; t < ntiles; ++t) {
    T* U = ws.p + omp_get_thread_num() * per_thread;
    // Output-channel block major: with few pixel tiles each thread keeps to one
    // weight block, and unequal pixel tiles are shared out evenly.
    const int64_t cb = t / pixel_tiles, pt = t % pixel_tiles;
    const int64_t n = pt / ceil_div(HWo, P), p0 = (pt % ceil_div(HWo, P)) * P;
    const int64_t p1 = imin(p0 + P, HWo), co0 = cb * co_block, co1 = imin(co0 + co_block, Co);
    const T* xn = x + n * g.C * g.H * g.W;
    dw_forward(g, cols.p, xn, dww, wt.p, dwb, g.act1, p0, p1, U, ldu);
    if (cl) {
      Out<T> o{y + (n * HWo + p0) * Co + co0, Co, false, bias.p + co0, pwb ? 2 : 0, g.act2};
      gemm(p1 - p0, co1 - co0, Cm, U, ldu, (int64_t)1, bp.p + (co0 / nr) * Cm * nr, Cm * nr,
           nr, o, false);
    } else {
      Out<T> o{y + (n * Co + co0) * HWo + p0, HWo, false, bias.p + co0, pwb ? 1 : 0, g.act2};
      gemm(co1 - co0, p1 - p0, Cm, pww + co0 * Cm, Cm, (int64_t)1, U, nr, ldu, o, true);
    }
  }
  }
  return OK;
}
