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
// than a second depthwise (see _ops.call); a tile's rows go out as they are made. In
// x's layout an NCHW u was transposed twice more (out of the tile here, back into the
// forward's tiles): the forward's y (Co <= Cm channels) is transposed instead.
template <class T>
int mean_impl(const Geometry& g, const T* x, const T* dww, const T* dwb, T* out, T* u) {
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, kk = g.kh * g.kw;
  const bool cl = g.channels_last;
  const int64_t P = tile_pixels<T>(g, 8), tiles_per_image = ceil_div(HWo, P);
  const int64_t ldu = padded_ld<T>(Cm, 16, 1024);
  constexpr int64_t line = 64 / (int64_t)sizeof(T);
  const int64_t lw = round_up(kk * Cm, line), lc = round_up(2 * g.kw, 8);
  const int64_t band = cl ? 0 : round_up(band_elems(g, P), line);
  const int64_t per_thread = P * ldu + band, sums = round_up(g.N * Cm, 8);
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
  T* U = ws.p + tid * per_thread;
  T* xb = U + P * ldu;
  double* const S = acc.p + tid * sums;
  memset(S, 0, g.N * Cm * sizeof(double));
  int64_t t_begin, t_end;
  static_range(g.N * tiles_per_image, tid, omp_get_num_threads(), &t_begin, &t_end);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n = t / tiles_per_image, p0 = (t % tiles_per_image) * P,
                  p1 = imin(p0 + P, HWo);
    depthwise_pixels(g, cols_t, x + n * g.C * g.H * g.W, p0, p1, wt_t, dwb, U, ldu, xb);
    if (u)
      for (int64_t p = p0; p < p1; ++p) memcpy(u + (n * HWo + p) * Cm, U + (p - p0) * ldu, Cm * sizeof(T));
    double* s = S + n * Cm;
    for (int64_t p = 0; p < p1 - p0; ++p) {
      const T* u = U + p * ldu;
      for (int64_t c = 0; c < Cm; ++c) s[c] += (double)u[c];
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
