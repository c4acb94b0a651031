// The fused backward driver: every gradient, recomputing U per band.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// What a backward call computes besides the gradients asked for.
struct BackwardNeeds {
  bool g;       // d loss / d U (or LayerNorm's output): grad_x, a depthwise or LN gradient
  bool from_y;  // dL/dz from y
  bool z;       // z = W.M + b recomputed
};
template <class T>
BackwardNeeds backward_needs(const Geometry& g, const T* y, const Grads<T>& out) {
  // GZ = dL/dz where z = W.M + b. relu'(z) and relu6'(z) equal relu'(y) and relu6'(y)
  // exactly (NaN included), so with y at hand z is not recomputed; the others need z
  // itself, which the caller may have kept (y_is_z: _ops._NativeAutograd for GELU).
  const bool from_y = y && (g.y_is_z || g.act2 == ACT_RELU || g.act2 == ACT_RELU6);
  return {out.x || out.dw_weight || out.dw_bias || out.scale || out.mid || out.norm_weight ||
              out.norm_bias,
          from_y, g.act2 != ACT_NONE && !from_y};
}

// dL/dM of `rows` pixels of a band (G, rows ldg apart; M = act1(U)), channels [0, n):
// plus the caller's (in), and given out, as pixel-major rows `ld` apart. A squeeze-and-
// excitation block's backward takes dL/dM from the conv's backward and adds it to the
// mean's, so that one depthwise backward serves both (_ops._NativeExcited).
template <class T>
void mid_rows(T* G, int64_t ldg, const T* in, T* out, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* gr = G + r * ldg;
    if (in)
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) gr[c] += in[r * ld + c];
    if (out) memcpy(out + r * ld, gr, n * sizeof(T));
  }
}

// Squeeze-and-excitation's scale s (the forward multiplies M = act1(U) by s[n] before the
// GEMM): on entry G = dL/d(M * s) of `rows` pixels. ds (when wanted) adds the sum over them
// of G * M, and G becomes dL/dM = G * s; act1' follows as without a scale. M is remade
// from U here, a chunk of a row at a time, rather than kept beside it.
template <class T>
void scale_grad_rows(int act1, T* G, const T* U, int64_t ld, int64_t rows, const T* s, T* ds,
                     int64_t n) {
  constexpr int64_t chunk = 256;
  T m[chunk];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t k = imin(chunk, n - c0);
      T* gr = G + r * ld + c0;
      if (ds) {
        memcpy(m, U + r * ld + c0, k * sizeof(T));
        act_inplace(act1, m, k);
#pragma omp simd
        for (int64_t c = 0; c < k; ++c) ds[c0 + c] += gr[c] * m[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < k; ++c) gr[c] *= s[c0 + c];
    }
}

// Whether a call wants a gradient of the depthwise stage's input or weights.
template <class T> bool wants_depthwise(const Grads<T>& out) {
  return out.x || out.dw_weight || out.dw_bias;
}

// The gradients that are sums over every pixel (both biases', the depthwise weight's, the
// scale's, LayerNorm's) were added pixel by pixel (the depthwise weight's at multiplier 1:
// row by row) into one accumulator per call and thread, whose float32 rounding error grows
// with the pixels summed. Float32, 12.8-25.6 thousand pixels a call, the largest error
// against float64 over the nn.Conv2d pair's in float32 (test_float32_pixel_sums' kind of
// case, both ISA paths, layouts and backward modes): the depthwise bias's 0.5-8.0x, the
// depthwise weight's at depth multiplier 2 7.2-9.6x, the pointwise bias's 0.4-1.3x. So the
// bands sum into cleared parts, each added into its accumulator once about kPixels pixels
// have gone into it, at each new image and at the end: the error of a block's additions
// plus the blocks'. Now 0.1-1.7x, 1.0-1.3x and 0.1-0.5x the pair's; the time unchanged
// (column_sums' A/B). The blocks do not depend on which gradients are wanted, so each
// gradient has the same bits whichever others are computed. (The pointwise weight's
// gradient is summed by its GEMM, a stack of pixels at a time.)
template <class T> struct BlockSums {
  static constexpr int64_t kPixels = 256;
  static constexpr int kRegions = 6;
  T* total[kRegions] = {};  // an accumulator, or null (not wanted)
  T* part[kRegions] = {};
  int64_t len[kRegions] = {};
  int64_t pending = 0;  // pixels summed in the parts
  int64_t image = -1;   // their image
  T* next;              // the parts' memory not yet taken
  explicit BlockSums(T* buf) : next(buf) {}
  // Region i: n sums into `to` (null: not wanted), made in the next n elements of the
  // parts' memory (cleared here); returns where the bands sum them (null: not wanted).
  T* region(int i, T* to, int64_t n) {
    T* buf = next;
    next += n;
    if (!to) return nullptr;
    total[i] = to, part[i] = buf, len[i] = n;
    memset(buf, 0, n * sizeof(T));
    return buf;
  }
  void flush() {
    for (int i = 0; i < kRegions; ++i)
      if (total[i] && pending) {
        T* t = total[i];
        T* q = part[i];
#pragma omp simd
        for (int64_t k = 0; k < len[i]; ++k) t[k] += q[k];
        memset(q, 0, len[i] * sizeof(T));
      }
    pending = 0;
  }
  // Before a band of `pixels` of image n; region 5, where wanted, is the scale's, whose
  // accumulator is image n's (scale_sums).
  void band(int64_t pixels, int64_t n, T* scale_sums) {
    if (pending + pixels > kPixels || n != image) flush();
    pending += pixels, image = n;
    if (total[5]) total[5] = scale_sums;
  }
};

// The pointwise weight's panels both backward drivers read, as W^T for z = W.M + b,
// as W for dL/dU (inside a parallel region; no barrier): all of them by this thread
// into its own copy (`all`, own_weight_copies), else this thread's share of one copy.
// With pointwise groups, each group's panels (pack_wt_grouped, pack_w_grouped).
template <class T>
void pack_weights(const Geometry& g, const T* pww, const BackwardNeeds& need, T* bp, T* wpk,
                  bool all = false) {
  int64_t lo, hi;
  auto range = [&](int64_t n) {
    if (all) lo = 0, hi = n;
    else static_range(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
  };
  if (need.z)
    for (range(g.groups * wt_panels<T>(g)); lo < hi; ++lo) pack_wt_grouped(g, pww, lo, bp);
  if (need.g)
    for (range(g.groups * w_panels<T>(g)); lo < hi; ++lo) pack_w_grouped(g, pww, lo, wpk);
}

// The weight-gradient GEMM's operands, packed where their rows reach 4 KiB (see
// backward_impl): GZ^T in blocks of MR output channels, M in panels of nr channels.
template <class T> bool packs(int64_t ld) { return ld * (int64_t)sizeof(T) >= 4096; }
// backward_impl also packs GZ^T where its rows are wide and read by many weight
// panels: unpacked, each k step of a micro-tile takes MR channels (48 bytes) from a row
// ldo apart, part of a line, and again for each of the ceil(Cm / nr) panels. Granite
// Rapids guest, training step, in-process A/B against rows of 4 KiB only, AVX-512,
// batch 1 / 8 / 32: 728x19->728 1.04 / 1.05 / 1.08-1.11x, 512x14->512 1.02 / 1.04 /
// 1.04-1.05x, 256x28->256 1.01 / 1.01 / 1.01-1.03x, 960x7->320 1.00 / 1.02 / 1.02x;
// AVX2 path, batch 8: 728x19 1.07x, 512x14 1.05x, 256x28 1.02x. Not repaid on narrower
// rows or fewer panels: 32x112->64 0.94x, 192x28->768 (6 panels) 0.99x, 960x7->160
// 0.95-1.06x, 384x14->64 0.96-1.00x. (backward_split's share of the panels is smaller:
// there it measured 0.96-1.00x, and it keeps the 4 KiB rule.)
template <class T> bool packs_gz(int64_t Co, int64_t ldo, int64_t Cm) {
  return packs<T>(ldo) || (Co * (int64_t)sizeof(T) >= 1024 && ceil_div(Cm, NR<T>()) >= 8);
}

// Output rows the busiest thread computes over backward_impl's two phases, with bands
// of R rows (OpenMP's static schedule: the first n % T threads take one task more).
inline int64_t busiest_rows(const Geometry& g, int64_t R) {
  const int64_t nb = ceil_div(g.Ho, R), T = g.threads;
  int64_t total = 0;
  for (int phase = 0; phase < 2; ++phase) {
    const int64_t per_n = (nb + 1 - phase) / 2, n = g.N * per_n, q = n / imax(T, 1), r = n % T;
    int64_t most = 0;
    for (int64_t t = 0, task = 0; t < imin(T, n); ++t) {
      int64_t rows = 0;
      for (const int64_t end = task + q + (t < r); task < end; ++task)
        rows += imin(R, g.Ho - (2 * (task % per_n) + phase) * R);
      most = imax(most, rows);
    }
    total += most;
  }
  return total;
}

// backward_impl's tiles: bands of R whole output rows. Bands b and b+2 read disjoint
// input rows when (R + 1) * sh > (kh - 1) * dh, so the even bands, then the odd ones,
// can scatter into grad_x in parallel without races and in a fixed order. About 64
// pixels a band; with few bands in all, the height from about 32 to 256 pixels whose
// phases keep the threads busiest. At batch 1 on 2 threads, 19x19 in bands of 4 rows
// kept one thread busy 12 row-times for 19 rows, 5 rows take 10 (train step 728x19
// 1.14x, 256x28 1.17x, 192x28->32 1.15x; Zen 5, A/B in one process).
inline int64_t band_rows(const Geometry& g) {
  const int64_t r_min = imax(1, (g.kh - 1) * g.dh / g.sh), Ho = imax(g.Ho, 1);
  const int64_t r0 = imin(imax(r_min, ceil_div(64, g.Wo)), Ho);
  // Many bands: even enough. An NCHW band is copied into NHWC with its (kh - 1) * dh
  // rows of halo, so there bands are a row taller. Granite Rapids guest, training step,
  // batch 8, NCHW, in-process A/B: 32x112->64 1.04x, 64x112->128/s2 1.04x, 144x56->24
  // 1.03x, 256x28->256 1.03x, 58x28->58 1.02x, 512x14 and 728x19 0.99-1.00x.
  if (g.N * ceil_div(Ho, r0) > 16 * g.threads)
    return g.channels_last ? r0 : imin(r0 + 1, Ho);
  int64_t best = r0, cost = busiest_rows(g, r0);
  for (int64_t R = imin(imax(r_min, ceil_div(32, g.Wo)), Ho); R <= imin(ceil_div(256, g.Wo), Ho);
       ++R) {
    const int64_t c = busiest_rows(g, R);
    if (c < cost || (c == cost && imax(R - r0, r0 - R) < imax(best - r0, r0 - best)))
      best = R, cost = c;
  }
  return best;
}

// Whether the backward splits the mid channels over the threads (backward_split)
// rather than running bands in parallel: where the bands' phases would leave the
// threads idle a quarter of the time or more. Each thread needs a panel of channels, of
// whole input channels. Measured on Zen 5, batch 1, 2 threads, backward call against
// bands of the old fixed height: 768x7->3072 (k7) 3.73 -> 1.67 ms, 1024x7 1.18 -> 0.68,
// 384x14->1536 (k7) 2.02 -> 1.43, 512x14 0.74 -> 0.67, 960x7->160 0.22 -> 0.18. Where
// band_rows balances the phases (19x19, 28x28, 56x56) bands were as fast or faster.
// The split's three barriers a band and narrower GEMMs cost more than a 14x14 output's
// 12% of idling (k3: busiest thread 8 rows of 14): Zen 4, batch 1, training step,
// in-process A/B, bands / split against the pair, NCHW and CL: 192x28->64/s2 1.63 / 0.82x
// and 1.92 / 0.98x, 576x14->96 1.02 / 0.86x and 1.17 / 1.02x, 256x28->512/s2 0.95 / 0.77x
// and 1.17 / 1.01x, 384x14->64 1.31 / 1.02x and 1.50 / 1.19x, 512x14->512 1.08 / 1.03x and
// 1.17 / 1.13x (Zen 5 had 512x14 even: 1.09 / 1.07 ms). At 7x7 (50% idle) and 14x14 with
// k7 (42%) the split still wins there: 960x7->320 1.03 / 1.29x and 1.02 / 1.30x,
// 512x14->1024/s2 0.81 / 0.99x and 1.48 / 1.77x, 384x14->1536 0.99 / 1.14x and 1.09 / 1.34x.
template <class T> bool splits_channels(const Geometry& g, int64_t R) {
  constexpr int64_t nr = NR<T>();
  // (pointwise groups or a channel shuffle: bands only)
  if (g.N == 0 || nr % g.m != 0 || g.backward_mode == BACKWARD_BANDS || g.groups > 1 ||
      g.shuffle > 1)
    return false;
  if (g.backward_mode == BACKWARD_SPLIT) return true;
  return g.threads > 1 && ceil_div(g.Cm, nr) >= g.threads &&
         3 * busiest_rows(g, R) * g.threads > 4 * g.N * g.Ho;
}

// The backward with the mid channels split over the threads, for calls with few
// bands: backward_impl runs bands in parallel, and a 7x7 image at batch 1 is one
// band, so one thread ran the whole backward (19x19 and 14x14: 1.2-1.3x band-times
// of idling). Here all threads work on one band at a time. Each owns whole panels
// of mid channels: its share of U, dL/dU, grad_x, both depthwise gradients and the
// pointwise weight gradient's columns, so no gradient needs a private copy or a
// reduction. dL/dz is shared out by output channels. Barriers order the two stages
// that cross the shares: z reads all of M, and dL/dU all of dL/dz.
template <class T>
int backward_split(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww,
                   const T* pww, const T* dwb, const T* pwb, const T* scale, const T* mid_in,
                   const T* lnw, const T* lnb, const Grads<T>& out) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, HW = g.H * g.W, C = g.C, Cm = g.Cm, Co = g.Co;
  const int64_t kk = g.kh * g.kw;
  const bool cl = g.channels_last;
  const BackwardNeeds need = backward_needs(g, y, out);
  // Bands of whole output rows, about 128 pixels (one at a time: no height constraint).
  const int64_t R = imin(ceil_div(128, g.Wo), g.Ho), P = R * g.Wo, nb = ceil_div(g.Ho, R);
  const int64_t ldm = padded_ld<T>(Cm, nr, 128), ldo = padded_ld<T>(Co, nr, 128);
  const bool pack_gz = packs<T>(ldo), pack_m = packs<T>(ldm);
  const int64_t sU = P * ldm, sGZ = P * ldo, sB = cl ? 0 : band_elems(g, P);
  const int64_t sGZs = pack_gz ? P * round_up(Co, MR) : 0, sMs = pack_m ? P * ldm : 0;
  // LayerNorm: M (its normalised N) in its own buffer (G's GEMM overwrites G, and LN's
  // backward reads N), and per thread and pixel the partial sums over the thread's
  // channels (two of them a stage) and the pixels' mean and rstd: a row's statistics
  // cross the channel shares. With an affine, A = N * gamma + beta (what the GEMMs read)
  // goes in G, unused until G's GEMM: its barrier follows the last read of A.
  const bool norm = g.norm_eps >= 0, affine = norm && (lnw || lnb);
  const int64_t sN = norm ? sU : 0, sP = round_up(P, 16);
  const int64_t sNorm = norm ? sN + 6 * g.threads * sP : 0;
  // Each thread's accumulators, of all channels (its BlockSums parts are added whole),
  // then its parts (the scale's: an image's, this thread's channels, into out.scale),
  // on cache lines of their own.
  constexpr int64_t line = 64 / (int64_t)sizeof(T);
  const int64_t sacc = kk * Cm + Cm + Co + 2 * Cm, sparts = sacc + Cm,
                sthread = round_up(sacc + sparts, line);
  Buf<T> ws(0, 2 * sU + sGZ + sGZs + sMs + (cl ? 0 : sGZ + 2 * sB) + sNorm),
      acc(1, g.threads * sthread),
      wt(2, kk * Cm), bp(3, need.z ? ldo * Cm : 0), wpk(4, need.g ? Co * ldm : 0),
      bias(5, ldo, true);
  Buf<int64_t> cols(6, 2 * g.kw);
  if (!ws.p || !acc.p || !wt.p || !bp.p || !wpk.p || !bias.p || !cols.p) return OUT_OF_MEMORY;
  prepare_weights(g, dww, pwb, wt.p, bias.p, cols.p);
  T* U = ws.p;
  T* G = U + sU;
  T* GZ = G + sU;
  T* GZs = GZ + sGZ;
  T* Ms = GZs + sGZs;
  T* GY = Ms + sMs;  // NCHW only: grad_y's tile, then the two bands
  T* XB = GY + sGZ;
  T* GXB = XB + sB;
  // LayerNorm, at the end (GY, XB and GXB exist only for NCHW): M, then the sums, means
  // and rstds per thread
  T* NB = ws.p + (2 * sU + sGZ + sGZs + sMs + (cl ? 0 : sGZ + 2 * sB));
  T* part = NB + sN;            // [thread][4][sP]
  T* means = part + 4 * g.threads * sP;   // [thread][sP]
  T* rstds = means + g.threads * sP;      // [thread][sP]
  // act1(U) (times the scale); dL/dU overwrites it after its last use
  T* M = norm ? NB : g.act1 == ACT_NONE && !scale ? U : G;
  T* A = affine ? G : M;  // what the GEMMs read
#pragma omp parallel num_threads(g.threads)
  {
    const DenormalMode thread_mode(g.flush_denormals);
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    // [*lo, *hi): this thread's share of n units of `unit` elements, within [0, end)
    auto share = [&](int64_t n, int64_t unit, int64_t end, int64_t* lo, int64_t* hi) {
      *lo = imin(n * tid / team * unit, end);
      *hi = imin(n * (tid + 1) / team * unit, end);
    };
    int64_t c0, c1, o0, o1, b0, b1;
    share(ceil_div(Cm, nr), nr, Cm, &c0, &c1);           // mid channels: whole panels
    share(ceil_div(Co, nr), nr, Co, &o0, &o1);           // output channels, for dL/dz
    share(ceil_div(Co, MR), 1, ceil_div(Co, MR), &b0, &b1);  // GZ^T's packed blocks
    const int64_t nc = c1 - c0, i0 = c0 / g.m, i1 = c1 / g.m;  // i: input channels
    pack_weights(g, pww, need, bp.p, wpk.p);
    T* const a_dw = acc.p + tid * sthread;  // [tap][Cm]
    T* const a_dwb = a_dw + kk * Cm;
    T* const a_pwb = a_dwb + Cm;
    T* const a_lnw = a_pwb + Co;  // LayerNorm's weight and bias
    T* const a_lnb = a_lnw + Cm;
    memset(a_dw, 0, sacc * sizeof(T));
    BlockSums<T> sums(a_dw + sacc);
    T* const s_dw = sums.region(0, out.dw_weight ? a_dw : nullptr, kk * Cm);
    T* const s_dwb = sums.region(1, out.dw_bias ? a_dwb : nullptr, Cm);
    T* const s_pwb = sums.region(2, out.pw_bias ? a_pwb : nullptr, Co);
    T* const s_lnw = sums.region(3, out.norm_weight ? a_lnw : nullptr, Cm);
    T* const s_lnb = sums.region(4, out.norm_bias ? a_lnb : nullptr, Cm);
    T* const s_s = sums.region(5, out.scale, nc);  // (image n's, from c0: band())
#pragma omp barrier
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t band = 0; band < nb; ++band) {
        const int64_t p0 = band * P, p1 = imin(p0 + P, HWo), np = p1 - p0;
        sums.band(np, n, out.scale ? out.scale + n * Cm + c0 : nullptr);
        const T* xn = x + n * C * HW;
        T* gxn = out.x ? out.x + n * C * HW : nullptr;
        if (gxn && band == 0 && i1 > i0) {  // this thread's channels of grad_x, cleared
          if (cl)
            for (int64_t p = 0; p < HW; ++p) memset(gxn + p * C + i0, 0, (i1 - i0) * sizeof(T));
          else
            memset(gxn + i0 * HW, 0, (i1 - i0) * HW * sizeof(T));
        }
        int64_t r0 = 0, r1 = g.H;
        if (!cl) {  // this thread's channels of the band of x (and grad_x), NHWC
          input_rows(g, p0, p1, &r0, &r1);
          if (r1 > r0)
            transpose_copy(xn + i0 * HW + r0 * g.W, HW, XB + i0, C, i1 - i0, (r1 - r0) * g.W);
          xn = XB;
          if (gxn)
            for (int64_t p = 0; p < (r1 - r0) * g.W; ++p)
              memset(GXB + p * C + i0, 0, (i1 - i0) * sizeof(T));
        }
        if (nc > 0) {
          dw_forward(g, cols.p, xn, r0, r1, wt.p, dwb, ACT_NONE, p0, p1, U, ldm, c0, c1);
          if (M != U)
            for (int64_t r = 0; r < np; ++r) {
              memcpy(M + r * ldm + c0, U + r * ldm + c0, nc * sizeof(T));
              act_inplace(g.act1, M + r * ldm + c0, nc);
            }
          if (scale) scale_rows(M + c0, np, ldm, scale + n * Cm + c0, nc);
          if (out.scale && band == 0) memset(out.scale + n * Cm + c0, 0, nc * sizeof(T));
        }
        if (norm)
          split_layer_norm(g, M, ldm, np, c0, c1, tid, team, part, sP, means + tid * sP,
                           rstds + tid * sP);
        if (affine)
          affine_rows(M + c0, A + c0, ldm, np, nc, lnw ? lnw + c0 : nullptr,
                      lnb ? lnb + c0 : nullptr);
        // All of M is made, and every thread is done with the last band's dL/dz.
#pragma omp barrier
        // GZ = dL/dz of output channels [o0, o1), pixel-major
        const T* gyt = gy + (n * HWo + p0) * Co;
        const T* yt = need.from_y ? y + (n * HWo + p0) * Co : nullptr;
        int64_t gy_rs = Co;
        if (!cl) {
          const int64_t off = n * Co * HWo + p0 + o0 * HWo;
          transpose_copy(gy + off, HWo, GY + o0, ldo, o1 - o0, np);
          if (need.from_y) transpose_copy(y + off, HWo, GZ + o0, ldo, o1 - o0, np);
          gyt = GY, yt = GZ, gy_rs = ldo;
        }
        if (need.z && o1 > o0) {
          Out<T> o{GZ + o0, ldo, false, bias.p + o0, pwb ? 2 : 0, ACT_NONE};
          gemm(np, o1 - o0, Cm, A, ldm, (int64_t)1, (int64_t)0, bp.p + o0 * Cm, Cm * nr, nr, o);
        }
        for (int64_t r = 0; r < np; ++r) {
          T* z = GZ + r * ldo + o0;
          grad_act(g.act2, gyt + r * gy_rs + o0, need.from_y ? yt + r * gy_rs + o0 : z, z,
                   o1 - o0);
        }
        if (s_pwb) column_sums(GZ, ldo, np, o0, o1, s_pwb);
#pragma omp barrier
        if (out.pw_weight && pack_gz) {  // GZ^T, in the order the GEMM reads it
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t k = 0; k < np; ++k)
              for (int64_t i = 0; i < MR && b * MR + i < Co; ++i)
                GZs[(b * P + k) * MR + i] = GZ[k * ldo + b * MR + i];
#pragma omp barrier
        }
        if (nc == 0 && !(norm && need.g)) continue;  // (LN's backward: every thread's sums)
        if (nc > 0 && out.pw_weight) {  // gW[:, c0:c1] (+)= GZ^T . M[:, c0:c1]
          const T* B = A + c0;
          int64_t b_panel = nr, ldb = ldm;
          if (pack_m) {
            for (int64_t q = c0 / nr; q < ceil_div(c1, nr); ++q)
              for (int64_t k = 0; k < np; ++k)
                storeu_n<T, nr>(Ms + (q * P + k) * nr, A + k * ldm + q * nr);
            B = Ms + c0 * P, b_panel = P * nr, ldb = nr;
          }
          Out<T> o{out.pw_weight + c0, Cm, n > 0 || band > 0, nullptr, 0, ACT_NONE};
          gemm(Co, nc, np, pack_gz ? GZs : GZ, (int64_t)1, pack_gz ? MR : ldo,
               pack_gz ? P * MR : 0, B, b_panel, ldb, o);
        }
        if (!need.g) continue;
        // G = dL/dU = (W^T . GZ) * act1'(U), this thread's channels
        if (nc > 0) {
          Out<T> o{G + c0, ldm, false, nullptr, 0, ACT_NONE};
          gemm(np, nc, Co, GZ, ldo, (int64_t)1, (int64_t)0, wpk.p + c0 * Co, Co * nr, nr, o);
        }
        if (affine)
          affine_grad_rows(G + c0, M + c0, ldm, np, nc, lnw ? lnw + c0 : nullptr,
                           s_lnw ? s_lnw + c0 : nullptr, s_lnb ? s_lnb + c0 : nullptr);
        if (norm)
          split_layer_norm_grad(g, G, M, ldm, np, c0, c1, tid, team, part, sP, rstds + tid * sP);
        if (nc == 0) continue;
        if (scale)  // (this thread's channels of the scale's gradient are its own)
          scale_grad_rows(g.act1, G + c0, U + c0, ldm, np, scale + n * Cm + c0, s_s, nc);
        if (mid_in || out.mid) {
          const int64_t at = (n * HWo + p0) * Cm + c0;
          mid_rows(G + c0, ldm, mid_in ? mid_in + at : nullptr, out.mid ? out.mid + at : nullptr,
                   Cm, np, nc);
        }
        if (!wants_depthwise(out)) continue;
        if (g.act1 != ACT_NONE)
          for (int64_t r = 0; r < np; ++r)
            grad_act(g.act1, G + r * ldm + c0, U + r * ldm + c0, G + r * ldm + c0, nc);
        dw_backward(g, cols.p, xn, r0, wt.p, G, ldm, p0, p1, s_dw, s_dwb,
                    cl ? gxn : (gxn ? GXB : nullptr), c0, c1);
        if (!cl && gxn && r1 > r0)
          transpose_add(GXB + i0, C, gxn + i0 * HW + r0 * g.W, HW, (r1 - r0) * g.W, i1 - i0);
      }
    sums.flush();
    if (out.dw_weight)  // accumulated as [tap][Cm]; the result is [Cm][tap]
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t k = 0; k < kk; ++k) out.dw_weight[c * kk + k] = a_dw[k * Cm + c];
    if (out.dw_bias)
      for (int64_t c = c0; c < c1; ++c) out.dw_bias[c] = a_dwb[c];
    if (out.pw_bias)
      for (int64_t co = o0; co < o1; ++co) out.pw_bias[co] = a_pwb[co];
    if (out.norm_weight) memcpy(out.norm_weight + c0, a_lnw + c0, nc * sizeof(T));
    if (out.norm_bias) memcpy(out.norm_bias + c0, a_lnb + c0, nc * sizeof(T));
  }
  return OK;
}

// Both layouts run one pipeline, pixel-major as in the forward: an NCHW x, grad_y
// and y are transposed into NHWC tiles per band, and grad_x is gathered in an NHWC
// band and added into the NCHW tensor by a transpose.
template <class T>
int backward_impl(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww,
                  const T* pww, const T* dwb, const T* pwb, const T* scale, const T* mid_in,
                  const T* lnw, const T* lnb, const Grads<T>& out) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, Co = g.Co, kk = g.kh * g.kw, T_ = g.threads;
  const bool cl = g.channels_last;
  const int64_t R = band_rows(g), P = R * g.Wo, nb = ceil_div(g.Ho, R);
  if (splits_channels<T>(g, R))
    return backward_split(g, gy, y, x, dww, pww, dwb, pwb, scale, mid_in, lnw, lnb, out);
  const BackwardNeeds need = backward_needs(g, y, out);
  const bool need_g = need.g, from_y = need.from_y, need_z = need.z;
  const int64_t ldm = padded_ld<T>(Cm, nr, 128), ldo = padded_ld<T>(Co, nr, 128);
  // Pointwise groups: each of the three GEMMs runs per group, on the groups' column
  // blocks of M, GZ and G and the group's packed weight; the weight gradient is Co x Kg.
  const int64_t NG = g.groups, Kg = Cm / NG, Cog = Co / NG;
  const bool shuffled = g.shuffle > 1;  // (NCHW only: shuffle_planes)

  // The weight gradient sums GZ^T . M over all pixels. Per tile its K is one band
  // (49 pixels at 7x7), so each call streamed the Co x Cm accumulator from L3 for
  // little work; the M and GZ of KS consecutive tiles of a thread are stacked (KP
  // pixels) and that GEMM runs once per stack. Stacked pixel-major, each k of that
  // GEMM steps a whole row of each; from rows of 4 KiB (1024 channels) on, each
  // step is a new page, which the prefetchers do not follow, and at Co = 3072 it
  // ran at half speed. Such a stack is packed instead, as the tiles are made, in the
  // order the GEMM reads it: GZ^T in blocks of MR output channels (KP x MR), M in
  // panels of nr mid channels (KP x nr). Narrower rows stay as they are (the copy
  // cost the 32- and 64-channel layers 3-7%), but for a GZ^T that many weight panels
  // read (packs_gz).
  const int64_t KS = imax(1, 256 / P), KP = KS * P;
  // (With groups the stacks stay unpacked: a group's block of rows / columns need not
  // start on a packed block or panel.)
  const bool pack_gz = NG == 1 && packs_gz<T>(Co, ldo, Cm), pack_m = NG == 1 && packs<T>(ldm);
  // Per-thread buffers: the tiles U, G (dL/dU, and act1(U) before it) and GZ (when
  // packed), the stacks, and for NCHW grad_y's tile and the NHWC bands of x, grad_x.
  const int64_t sU = P * ldm, sGZ = P * ldo, sB = cl ? 0 : band_elems(g, P);
  const int64_t sGZt = pack_gz ? sGZ : 0, sMs = KP * ldm, sGZs = KP * imax(ldo, round_up(Co, MR));
  // LayerNorm: the normalised N (it must outlive G's GEMM, which overwrites G, for LN's
  // backward; without an affine, the GEMMs' M where it is not on the stack) and each
  // pixel's rstd.
  const bool norm = g.norm_eps >= 0, affine = norm && (lnw || lnb);
  const int64_t sN = norm ? sU + round_up(P, 16) : 0;
  const int64_t per_thread = 2 * sU + sGZt + sMs + sGZs + (cl ? 0 : sGZ + 2 * sB) + sN;
  // Bytes a band's stages keep in use: the thread's buffers and the packed weights.
  // The packed weights: W^T's and W's panels, each group's (one group: as many as the
  // padded rows of GZ and M hold).
  const int64_t sbp = !need_z ? 0 : NG == 1 ? ldo * Cm : NG * wt_panels<T>(g) * nr * Kg;
  const int64_t swpk = !need_g ? 0 : NG == 1 ? Co * ldm : NG * w_panels<T>(g) * nr * Cog;
  const int64_t resident = (per_thread + sbp + swpk) * (int64_t)sizeof(T);
  // Per-thread gradient accumulators, reduced in thread order at the end.
  const int64_t sgw = Co * Kg,
                sacc = sgw + kk * Cm + Cm + Co + (out.scale ? g.N * Cm : 0) + (affine ? 2 * Cm : 0);
  // The weight gradient's GEMM takes a row block across all weight panels (the row
  // blocks outer: gemm's panel_group) where the accumulator is beyond a quarter of the
  // L2, so that it is read and written in whole rows, a few lines apart, rather than a
  // panel's 128 bytes per row, Cm * 4 bytes apart; the stack of M is read once per row
  // block instead of GZ^T once per panel. Granite Rapids guest, training step, batch 8,
  // in-process A/B (AVX-512 / AVX2 path): 728x19->728 1.02x / 1.01x, 1024x7->1024
  // 1.05x / 1.02x, 384x14->1536 1.05x / 1.03x, 512x14->512 1.01x / 1.02x; with
  // smaller accumulators 0.97-1.02x.
  const bool acc_rows_whole = sgw * (int64_t)sizeof(T) > g.l2_bytes / 4;
  // Where every thread's pixels fit in its stacks (small images at small batches),
  // the weight gradient is not summed per thread and then across the threads: after
  // the bands, each thread takes a share of its rows, over all the threads' stacks in
  // thread order, straight into the result. No Co x Cm accumulator per thread to
  // clear, fill and reduce (2.1 MB at 728 x 728, 4 MiB at 1024 x 1024). Granite Rapids
  // guest, training step, in-process A/B, NCHW / CL: batch 1 728x19->728 1.06 / 1.05x;
  // batch 2 1024x7->1024 1.15 / 1.12x, 768x7->3072 1.19 / 1.20x, 960x7->320 1.07 /
  // 1.06x; batch 8 1024x7 1.07x, 768x7->3072 1.05-1.06x; elsewhere 1.00-1.01x.
  const bool one_stack_fits = out.pw_weight && NG == 1 && busiest_rows(g, R) * g.Wo <= KP;
  // NCHW without act2: dL/dz is grad_y, transposed straight into GZ (no tile, no copy).
  const bool gz_is_gy = !cl && g.act2 == ACT_NONE;
  const bool own = own_weight_copies(g, (sbp + swpk) * (int64_t)sizeof(T));
  // and each thread's BlockSums parts (the depthwise weight, both biases, LayerNorm's
  // weight and bias, an image's scale) after them, on cache lines of their own.
  constexpr int64_t line = 64 / (int64_t)sizeof(T);
  const int64_t sparts = round_up(kk * Cm + 4 * Cm + Co, line), parts0 = round_up(T_ * sacc, line);
  Buf<T> ws(0, T_ * per_thread), acc(1, parts0 + T_ * sparts), wt(2, kk * Cm),
      bp(3, (own ? T_ : 1) * sbp),
      wpk(4, (own ? T_ : 1) * swpk),
      bias(5, imax(ldo, grouped_bias_len<T>(g)), true);
  Buf<int64_t> cols(6, 2 * g.kw + (shuffled ? g.C : 0)), counts(7, T_);
  if (!ws.p || !acc.p || !wt.p || !bp.p || !wpk.p || !bias.p || !cols.p || !counts.p)
    return OUT_OF_MEMORY;
  prepare_weights(g, dww, pwb, wt.p, bias.p, cols.p);
  const int64_t* const xrow = shuffled ? cols.p + 2 * g.kw : nullptr;
  if (shuffled) shuffle_planes(g, cols.p + 2 * g.kw);

  int team = 1;
  const DenormalMode mode(g.flush_denormals);  // also for the sums after the threads
#pragma omp parallel num_threads(g.threads)
  {
    const DenormalMode thread_mode(g.flush_denormals);
    const int tid = omp_get_thread_num();
    // The weight panels are packed by all threads, and each thread clears its own
    // accumulators: done serially they were a tenth of the backward at 768 -> 3072.
    // (The team may be smaller than asked for: only its threads' accumulators are
    // cleared and summed.)
    if (tid == 0) team = omp_get_num_threads();
    const bool one_stack = one_stack_fits && omp_get_num_threads() == g.threads;
    const int64_t skip = one_stack ? sgw : 0;  // the accumulator it does not use
    memset(acc.p + tid * sacc + skip, 0, (sacc - skip) * sizeof(T));
    // Each thread's packed weights: its own copy (own_weight_copies), or the shared one.
    T* const bpt = bp.p + (own ? tid * sbp : 0);
    T* const wpkt = wpk.p + (own ? tid * swpk : 0);
    pack_weights(g, pww, need, bpt, wpkt, own);
    // An NCHW grad_x within a few L2s is cleared whole, before any band adds to it: a
    // band's rows are a short run in each of the C planes (684 bytes at 728x19->728 in
    // bands of 5 rows), and hundreds of small memsets each waited on their lines' reads
    // for ownership, where one long run goes by fast-string stores. Granite Rapids
    // guest, training step, NCHW, in-process A/B against the clear by band: batch 1
    // 728x19->728 1.02x, 256x28->256 1.03x, 32x112->64, 144x56->24, 96x56->384 1.01-
    // 1.02x, 1024x7 0.99x; batch 8 144x56->24 1.04x, 256x28 1.03x, 728x19 0.99x, sum
    // 1.01x. Larger, it is a pass over memory, and the bands read it back from there:
    // batch 32 96x112->24/s2 0.92x, 64x112->128/s2 0.95x. (A channels-last band's rows
    // are one run: there the clear stays by band, 0.98-1.01x.)
    const bool clear_whole =
        !cl && g.N * g.C * g.H * g.W * (int64_t)sizeof(T) <= 4 * g.threads * g.l2_bytes;
    if (clear_whole && out.x) {
      const int64_t total = g.N * g.C * g.H * g.W, chunk = 16384;
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < total; i += chunk)
        memset(out.x + i, 0, imin(chunk, total - i) * sizeof(T));
    }
#pragma omp barrier
    T* U = ws.p + tid * per_thread;
    T* G = U + sU;
    T* GZt = G + sU;
    T* Ms = GZt + sGZt;
    T* GZs = Ms + sMs;
    T* GY = GZs + sGZs;  // NCHW only: grad_y's tile, then the two bands
    T* XB = GY + sGZ;
    T* GXB = XB + sB;
    T* NB = U + per_thread - sN;  // LayerNorm only: N's rows, then rstd per pixel
    T* rstd = NB + sU;
    T* a_pw = acc.p + tid * sacc;
    int64_t stacked = 0;  // pixels in Ms / GZs whose weight gradient is pending
    const int64_t acs = pack_gz ? MR : ldo, a_block = pack_gz ? KP * MR : 0;
    const int64_t b_panel = pack_m ? KP * nr : nr, ldb = pack_m ? nr : ldm;
    auto flush_pw = [&] {  // gW[co][c] += sum_p GZ[p][co] * M[p][c] over the stack
      if (out.pw_weight && stacked)
        for (int64_t i = 0; i < NG; ++i) {  // (the stacks are unpacked where NG > 1)
          Out<T> o{a_pw + i * Cog * Kg, Kg, true, nullptr, 0, ACT_NONE};
          o.panel_group = acc_rows_whole ? ceil_div(Kg, nr) : 1;
          gemm(Cog, Kg, stacked, GZs + i * Cog, (int64_t)1, acs, a_block, Ms + i * Kg, b_panel,
               ldb, o);
        }
      stacked = 0;
    };
    T* a_dw = a_pw + sgw;
    T* a_dwb = a_dw + kk * Cm;
    T* a_pwb = a_dwb + Cm;
    T* a_s = out.scale ? a_pwb + Co : nullptr;  // [n][Cm]
    T* a_lnw = a_pwb + Co + (out.scale ? g.N * Cm : 0);  // LayerNorm's weight and bias
    T* a_lnb = a_lnw + Cm;
    // The bands' sums go into these parts (BlockSums), null where not wanted.
    BlockSums<T> sums(acc.p + parts0 + tid * sparts);
    T* const s_dw = sums.region(0, out.dw_weight ? a_dw : nullptr, kk * Cm);
    T* const s_dwb = sums.region(1, out.dw_bias ? a_dwb : nullptr, Cm);
    T* const s_pwb = sums.region(2, out.pw_bias ? a_pwb : nullptr, Co);
    T* const s_lnw = sums.region(3, out.norm_weight ? a_lnw : nullptr, Cm);
    T* const s_lnb = sums.region(4, out.norm_bias ? a_lnb : nullptr, Cm);
    T* const s_s = sums.region(5, a_s, Cm);  // (image n's row of a_s: band())
    // Band t of a phase: its image and first and last output pixels.
    auto band_of = [&](int64_t t, int64_t per_n, int phase, int64_t* n, int64_t* p0, int64_t* p1) {
      *n = t / per_n;
      *p0 = (2 * (t % per_n) + phase) * P;
      *p1 = imin(*p0 + P, HWo);
    };
    for (int phase = 0; phase < 2; ++phase) {
      const int64_t per_n = (nb + 1 - phase) / 2;
      int64_t t_begin, t_end;
      static_range(g.N * per_n, tid, omp_get_num_threads(), &t_begin, &t_end);
      for (int64_t t = t_begin; t < t_end; ++t) {
        int64_t n, p0, p1;
        band_of(t, per_n, phase, &n, &p0, &p1);
        const int64_t band = p0 / P, np = p1 - p0;
        sums.band(np, n, a_s ? a_s + n * Cm : nullptr);
        // The next band's x, grad_y and y, pulled into L2 by this band's GEMMs: the
        // band's depthwise and dL/dz otherwise wait on DRAM with nothing in flight.
        // Only where they fit in L2 beside the band's own working set: otherwise they
        // evict the weights the GEMMs are reading (960x7->160, 576x14->96: 0.91-0.95x).
        Prefetch next;
        if (t + 1 < t_end) {
          int64_t n2, q0, q1;
          band_of(t + 1, per_n, phase, &n2, &q0, &q1);
          add_input_band(g, x + n2 * g.C * g.H * g.W, q0, q1, &next);
          const int64_t rows = cl ? 1 : Co, run = (q1 - q0) * (cl ? Co : 1) * (int64_t)sizeof(T);
          const int64_t off = cl ? (n2 * HWo + q0) * Co : n2 * Co * HWo + q0;
          next.add(gy + off, run, HWo * (int64_t)sizeof(T), rows);
          if (from_y) next.add(y + off, run, HWo * (int64_t)sizeof(T), rows);
          if (resident + next.bytes() > g.l2_bytes) next = Prefetch{};
          // over the k steps of this band's GEMMs that advance it (z's and dL/dU's)
          next.pace(NG * ((need_z ? gemm_steps<T>(np, Cog, Kg) : 0) +
                          (need_g ? gemm_steps<T>(np, Kg, Cog) : 0)));
        }
        // (np, not P: one_stack_fits counts the busiest thread's pixels, and a stack that
        // had flushed a short last band early left that thread's accumulator, which
        // one_stack does not clear, in the sum: wrong weight gradients on one thread.)
        if (stacked + np > KP) flush_pw();
        T* GZ = pack_gz ? GZt : GZs + stacked * ldo;
        const T* xn = x + n * g.C * g.H * g.W;
        T* gxn = out.x ? out.x + n * g.C * g.H * g.W : nullptr;
        // Else grad_x is cleared here rather than by the caller (a whole extra pass
        // over it, 6% of a MobileNetV2 training step): an even band clears the rows
        // from its first input row to the next even band's, all of the image together,
        // before any odd band (the next phase) adds to them.
        if (gxn && phase == 0 && !clear_whole) {
          auto first_row = [&](int64_t b) { return imin(g.H, imax(0, b * R * g.sh - g.pt)); };
          const int64_t z0 = band == 0 ? 0 : first_row(band);
          const int64_t z1 = band + 2 < nb ? first_row(band + 2) : g.H;
          if (cl)
            memset(gxn + z0 * g.W * g.C, 0, (z1 - z0) * g.W * g.C * sizeof(T));
          else
            for (int64_t c = 0; c < g.C; ++c)
              memset(gxn + (c * g.H + z0) * g.W, 0, (z1 - z0) * g.W * sizeof(T));
        }
        // grad_y and y of these pixels, pixel-major, rows gy_rs apart
        const T* gyt = gy + (n * HWo + p0) * Co;
        const T* yt = from_y ? y + (n * HWo + p0) * Co : nullptr;
        int64_t gy_rs = Co, r0 = 0, r1 = g.H;
        if (!cl) {
          input_rows(g, p0, p1, &r0, &r1);
          if (r1 > r0)
            transpose_copy(xn + r0 * g.W, g.H * g.W, XB, g.C, g.C, (r1 - r0) * g.W, xrow);
          xn = XB;
          if (gxn) memset(GXB, 0, imax(r1 - r0, 0) * g.W * g.C * sizeof(T));
          const int64_t off = n * Co * HWo + p0;
          if (gz_is_gy) {
            transpose_copy(gy + off, HWo, GZ, ldo, Co, np);
          } else {
            transpose_copy(gy + off, HWo, GY, ldo, Co, np);
            if (from_y) transpose_copy(y + off, HWo, GZ, ldo, Co, np);
          }
          gyt = GY, yt = GZ, gy_rs = ldo;
        }
        // M = act1(U), pixel-major: onto an unpacked stack, else in G, or U itself when
        // act1 is the identity. Where it goes onto the stack and act1 is the identity,
        // relu or relu6, the depthwise writes it there and U is not made: act1' is read
        // from M (relu'(u) is relu'(relu(u)) exactly, as for y). The copy cost the
        // backward 3-7% (Zen 5, AVX-512, batch 32, CL and NCHW, in-process A/B:
        // 32x112->64 relu 1.07x, 32x112->16 relu6 1.06x, 576x14->96 1.05x, 728x19 1.01x).
        // With LayerNorm, M is normalised into NB (in place without an affine: never in G,
        // see NB) and, with an affine, A = N * gamma + beta made in Mt; it is direct only
        // without act1, whose derivative it no longer tells.
        T* Mt = out.pw_weight && !pack_m ? Ms + stacked * ldm : norm && !affine ? NB : G;
        const bool direct = Mt != G && !scale &&
                            (g.act1 == ACT_NONE ||
                             (!norm && (g.act1 == ACT_RELU || g.act1 == ACT_RELU6)));
        dw_forward(g, cols.p, xn, r0, r1, wt.p, dwb, direct ? g.act1 : ACT_NONE, p0, p1,
                   direct ? Mt : U, ldm, 0, Cm);
        const T* M = direct ? Mt : U;
        if (!direct && (out.pw_weight || need_z || norm) &&
            (g.act1 != ACT_NONE || Mt != G || scale)) {
          for (int64_t r = 0; r < np; ++r) {
            for (int64_t c = 0; c < Cm; ++c) Mt[r * ldm + c] = U[r * ldm + c];
            act_inplace(g.act1, Mt + r * ldm, Cm);
          }
          if (scale) scale_rows(Mt, np, ldm, scale + n * Cm, Cm);
          M = Mt;
        }
        if (norm) layer_norm_rows(M, affine ? NB : Mt, np, ldm, Cm, g.norm_eps, rstd);
        if (affine) affine_rows(NB, Mt, ldm, np, Cm, lnw, lnb);
        if (norm) M = Mt;
        if (need_z)
          for (int64_t i = 0; i < NG; ++i) {
            Out<T> o{GZ + i * Cog, ldo, false, bias.p + i * Cog, pwb ? 2 : 0, ACT_NONE};
            o.prefetch = &next;
            gemm(np, Cog, Kg, M + i * Kg, ldm, (int64_t)1, (int64_t)0,
                 bpt + i * wt_panels<T>(g) * nr * Kg, Kg * nr, nr, o);
          }
        if (!gz_is_gy)
          for (int64_t r = 0; r < np; ++r)
            grad_act(g.act2, gyt + r * gy_rs, from_y ? yt + r * gy_rs : GZ + r * ldo, GZ + r * ldo,
                     Co);
        if (s_pwb) column_sums(GZ, ldo, np, 0, Co, s_pwb);
        if (out.pw_weight) {  // onto the stacks; the weight gradient waits for flush_pw
          for (int64_t r = 0; r < np; ++r) {
            const int64_t k = stacked + r;
            if (pack_m)  // whole panels: M's rows are at least that long
              for (int64_t q = 0; q < ceil_div(Cm, nr); ++q)
                storeu_n<T, nr>(Ms + (q * KP + k) * nr, M + r * ldm + q * nr);
            if (pack_gz) {
              int64_t b = 0;
              for (; (b + 1) * MR <= Co; ++b)
                storeu_n<T, MR>(GZs + (b * KP + k) * MR, GZ + r * ldo + b * MR);
              for (int64_t i = b * MR; i < Co; ++i) GZs[(b * KP + k) * MR + i - b * MR] = GZ[r * ldo + i];
            }
          }
          stacked += np;
        }
        if (!need_g) continue;
        // G = dL/dU = (W^T . GZ) * act1'(U)
        for (int64_t i = 0; i < NG; ++i) {
          Out<T> o{G + i * Kg, ldm, false, nullptr, 0, ACT_NONE};
          o.prefetch = &next;
          gemm(np, Kg, Cog, GZ + i * Cog, ldo, (int64_t)1, (int64_t)0,
               wpkt + i * w_panels<T>(g) * nr * Cog, Cog * nr, nr, o);
        }
        if (affine)
          affine_grad_rows(G, NB, ldm, np, Cm, lnw, s_lnw, s_lnb);
        if (norm) layer_norm_grad_rows(G, affine ? NB : M, ldm, np, Cm, rstd);
        if (scale) scale_grad_rows(g.act1, G, U, ldm, np, scale + n * Cm, s_s, Cm);
        if (mid_in || out.mid) {
          const int64_t at = (n * HWo + p0) * Cm;
          mid_rows(G, ldm, mid_in ? mid_in + at : nullptr, out.mid ? out.mid + at : nullptr, Cm,
                   np, Cm);
        }
        if (!wants_depthwise(out)) continue;
        if (g.act1 != ACT_NONE)
          for (int64_t r = 0; r < np; ++r)
            grad_act(g.act1, G + r * ldm, (direct ? M : U) + r * ldm, G + r * ldm, Cm);
        dw_backward(g, cols.p, xn, r0, wt.p, G, ldm, p0, p1, s_dw, s_dwb,
                    cl ? gxn : (gxn ? GXB : nullptr), 0, Cm);
        if (!cl && gxn && r1 > r0)
          transpose_add(GXB, g.C, gxn + r0 * g.W, g.H * g.W, (r1 - r0) * g.W, g.C, xrow);
      }
      // Odd bands add into the input rows that even bands cleared and added to.
#pragma omp barrier
    }
    sums.flush();
    if (one_stack) {  // rows [r0, r1) of gW, summed over the threads' stacks in order
      counts.p[tid] = stacked;
#pragma omp barrier
      int64_t b0, b1;
      static_range(ceil_div(Co, MR), tid, omp_get_num_threads(), &b0, &b1);
      const int64_t r0 = imin(b0 * MR, Co), r1 = imin(b1 * MR, Co);
      bool written = false;
      for (int64_t t = 0; t < omp_get_num_threads() && r1 > r0; ++t) {
        if (counts.p[t] == 0) continue;
        const T* Ms_t = ws.p + t * per_thread + (Ms - U);
        const T* GZs_t = ws.p + t * per_thread + (GZs - U);
        Out<T> o{out.pw_weight + r0 * Cm, Cm, written, nullptr, 0, ACT_NONE};
        o.panel_group = acc_rows_whole ? ceil_div(Cm, nr) : 1;
        gemm(r1 - r0, Cm, counts.p[t], pack_gz ? GZs_t + b0 * KP * MR : GZs_t + r0, (int64_t)1,
             acs, a_block, Ms_t, b_panel, ldb, o);
        written = true;
      }
      if (!written && r1 > r0) memset(out.pw_weight + r0 * Cm, 0, (r1 - r0) * Cm * sizeof(T));
    } else {
      flush_pw();
    }
    // The weight gradients of the threads are summed in thread order, so the result
    // does not depend on the schedule, and split by element over the threads: at
    // 1024 x 1024 this 4 MiB sum took 8% of the backward on one thread.
    if (out.pw_weight && !one_stack) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < sgw; i0 += 4096) {
        const int64_t n = imin(4096, sgw - i0);
        T* d = out.pw_weight + i0;
        for (int64_t t = 0; t < team; ++t) {
          const T* a = acc.p + t * sacc + i0;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) d[i] = (t ? d[i] : T(0)) + a[i];
        }
      }
    }
  }
  // The small accumulators, likewise in thread order.
  for (int64_t t = 0; t < team; ++t) {
    const T* a_dw = acc.p + t * sacc + sgw;
    const T* a_dwb = a_dw + kk * Cm;
    const T* a_pwb = a_dwb + Cm;
    const T* a_s = a_pwb + Co;
    if (out.scale)
      for (int64_t i = 0; i < g.N * Cm; ++i) out.scale[i] = (t ? out.scale[i] : T(0)) + a_s[i];
    if (out.dw_weight)  // accumulated as [tap][Cm]; the result is [Cm][tap]
      for (int64_t c = 0; c < Cm; ++c)
        for (int64_t k = 0; k < kk; ++k)
          out.dw_weight[c * kk + k] = (t ? out.dw_weight[c * kk + k] : T(0)) + a_dw[k * Cm + c];
    if (out.dw_bias)
      for (int64_t c = 0; c < Cm; ++c) out.dw_bias[c] = (t ? out.dw_bias[c] : T(0)) + a_dwb[c];
    if (out.pw_bias)
      for (int64_t co = 0; co < Co; ++co) out.pw_bias[co] = (t ? out.pw_bias[co] : T(0)) + a_pwb[co];
    const T* a_lnw = a_s + (out.scale ? g.N * Cm : 0);
    const T* a_lnb = a_lnw + Cm;
    if (out.norm_weight)
      for (int64_t c = 0; c < Cm; ++c)
        out.norm_weight[c] = (t ? out.norm_weight[c] : T(0)) + a_lnw[c];
    if (out.norm_bias)
      for (int64_t c = 0; c < Cm; ++c) out.norm_bias[c] = (t ? out.norm_bias[c] : T(0)) + a_lnb[c];
  }
  return OK;
}
