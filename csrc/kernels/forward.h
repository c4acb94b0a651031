// The fused forward driver: tiles, threads, depthwise then GEMM per tile.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// Pixels per tile: the depthwise tile U (P x Cm) should stay within g.tile_bytes of L2,
// and an image's tiles should be equal in size so that the threads finish together.
// With few tiles in all, their number is raised to a multiple of the threads while
// tiles keep at least min_p pixels: 7 tiles on 2 threads leave one idle for a whole tile.
// It is raised further, to the next such multiple, while a tile's share of the image's
// input is more than a quarter of the L2: a large image in one tile per thread was
// copied (NCHW) and read from memory with nothing else in flight, and with tiles to
// come a thread's GEMM pulls the next tile's input into L2 (forward_impl). Granite
// Rapids guest, forward, batch 1, in-process A/B (NCHW / CL, AVX-512; NCHW AVX2):
// 64x112->128/s2 1.43 / 1.08x, 1.89x; 96x112->24/s2 1.46 / 1.03x, 1.22x; 128x56->256/s2
// 1.38 / 1.20x, 1.28x. Layers with larger weights and smaller images lost with more
// tiles (each re-reads the weights): 512x14->512 0.85-0.92x, 384x14->1536 0.85-0.95x.
// So the count is not raised for the input where a tile's share of it is no more than
// the pointwise weights, which each tile reads again: 256x28->512/s2 at batch 1
// (weights 512 KiB, input 784 KiB) now runs 2 tiles, not 4. Zen 4, forward, in-process
// A/B, four runs: NCHW 1.05-1.07x, CL 1.03-1.12x.
// prefetched: the forward's tiles, whose input the GEMM of the tile before prefetches
// (the mean pass has no GEMM).
template <class T> int64_t tile_pixels(const Geometry& g, int64_t min_p, bool prefetched) {
  const int64_t HWo = g.Ho * g.Wo;
  const int64_t p = imax(1, imin(g.tile_bytes / (int64_t)sizeof(T) / imax(g.Cm, 1), 2048));
  const int64_t image_bytes = g.C * g.H * g.W * (int64_t)sizeof(T);
  const int64_t weight_bytes = g.Co * g.Cm * (int64_t)sizeof(T);
  int64_t n = ceil_div(HWo, p), fit = 0;
  for (int64_t k = n; g.N * k < 8 * g.threads && ceil_div(HWo, k) >= min_p; ++k)
    if ((g.N * k) % g.threads == 0) {
      fit = k;
      if (image_bytes / k <= g.l2_bytes / 4 || image_bytes / k <= weight_bytes) break;
    }
  if (fit) n = fit;
  // With images enough to share out (batch 8, 32 on 2 threads), a channels-last tile's
  // input is kept within half the L2, what the GEMM of the tile before prefetches
  // (add_input_band): the U budget alone left a stride-2 tile (4 input pixels an output
  // pixel) 750 KiB of input at 60x56->216/s2, a third of it met from DRAM by the
  // depthwise. Zen 5, in-process, time against the budget's tiles: batch 32 AVX-512
  // 60x56->216/s2/g3 0.91x, 96x112->24/s2 0.94x, 128x56->256/s2 0.94x, 192x28->64/s2
  // 0.92x, others 0.95-0.99x; AVX2 path 0.84-0.93x (256x28->512/s2 0.99x); batch 8
  // 60x56->216/s2/g3 0.88-0.89x, 192x28->64/s2 0.94-0.98x, others 0.99-1.00x. Not for
  // NCHW (a run per plane): 0.98-1.05x there.
  if (prefetched && g.channels_last && g.N >= 4 * g.threads)
    while (image_bytes / n > g.l2_bytes / 2 && image_bytes / n > weight_bytes &&
           ceil_div(HWo, n + 1) >= min_p)
      ++n;
  // With many tiles (so that the last, smaller one does not unbalance the threads), a
  // whole number of MR-row GEMM blocks per tile where MR is 6 (AVX2): 73 pixels were 13
  // blocks of 5 and 6 rows, and a 5-row block has 10 of the 12 accumulators. Zen 5,
  // AVX2, batch 32, in-process A/B: 728x19->728 1.016-1.027x (CL and NCHW, three runs),
  // 512x14->512 1.01-1.04x, others 0.99-1.01x. AVX-512's 12-row blocks split as 10-11
  // rows and measured 0.99-1.00x, so there it is not done.
  if (MR <= 6 && g.N * n >= 8 * g.threads) return imin(HWo, round_up(ceil_div(HWo, n), MR));
  return ceil_div(HWo, n);
}

// Whole images per tile, where a tile takes a whole image (7x7 at wide layers) and
// the packed weights exceed half the L2: every tile reads all of them, from L3 (9.4
// MiB at 768x7->3072), for one image's pixels. Images are joined while the tile stays
// within the budget of tile_pixels and each thread keeps a whole number of tiles, two
// at least (so that one tile's GEMM pulls the next one's input into L2: with one tile
// per thread, 576x14->160/s2 ran at 0.7x). Granite Rapids guest, forward, batch 8 /
// 32, in-process A/B, NCHW / CL: 768x7->3072 1.05 / 1.05x, 1.04 / 1.03x; 1024x7->1024
// 1.02 / 1.02x, 1.02 / 1.02x. (With weights that fit, 960x7->160 0.98-1.04x.)
template <class T> int64_t images_per_tile(const Geometry& g, int64_t P, bool weights_fit) {
  const int64_t HWo = g.Ho * g.Wo, budget = g.tile_bytes / (int64_t)sizeof(T) / imax(g.Cm, 1);
  int64_t k = 1;
  if (P >= HWo && !weights_fit)
    for (int64_t j = 2; j <= g.N && j * HWo <= budget; ++j)
      if (ceil_div(g.N, j) >= 2 * g.threads && ceil_div(g.N, j) % g.threads == 0) k = j;
  return k;
}

// The depthwise weight as [tap][Cm], the pointwise bias into its (zeroed, NR-padded)
// buffer, and each tap column's valid ow range: the start of both directions.
template <class T>
void prepare_weights(const Geometry& g, const T* dww, const T* pwb, T* wt, T* bias, int64_t* cols) {
  const int64_t kk = g.kh * g.kw;
  column_ranges(g, cols);
  // by register blocks: element by element it took an eighth of a 1152x7x7 (5x5)
  // depthwise pass at batch 1, as every thread makes its own copy in every call
  transpose_copy(dww, kk, wt, g.Cm, g.Cm, kk);
  if (pwb)
    for (int64_t co = 0; co < g.Co; ++co) bias[co] = pwb[co];
}

// ---------------------------------------------------------------- forward
// Input rows that output pixels [p0, p1) read: [*r0, *r1), within the image.
inline void input_rows(const Geometry& g, int64_t p0, int64_t p1, int64_t* r0, int64_t* r1) {
  *r0 = imax(0, (p0 / g.Wo) * g.sh - g.pt);
  *r1 = imin(g.H, ((p1 - 1) / g.Wo) * g.sh - g.pt + (g.kh - 1) * g.dh + 1);
}

// The input band that output pixels [p0, p1) of image xn read, added to f (NHWC: one
// run; NCHW: a run per channel plane), at most half the L2 of it.
template <class T>
void add_input_band(const Geometry& g, const T* xn, int64_t p0, int64_t p1, Prefetch* f) {
  int64_t r0, r1;
  input_rows(g, p0, p1, &r0, &r1);
  if (r1 <= r0) return;
  const int64_t row = g.W * (int64_t)sizeof(T) * (g.channels_last ? g.C : 1);  // one input row
  const int64_t planes = g.channels_last ? 1 : g.C, run = (r1 - r0) * row, most = g.l2_bytes / 2;
  f->add((const char*)xn + r0 * row, imin(run, most), g.H * g.W * (int64_t)sizeof(T),
         imin(planes, imax(1, most / run)));
}

// [*lo, *hi): thread tid's share of n tasks, dealt as OpenMP's static schedule deals
// them (the first n % team threads take one more; busiest_rows counts on it), but
// explicitly, so that each thread knows its next task and can prefetch its input.
inline void static_range(int64_t n, int64_t tid, int64_t team, int64_t* lo, int64_t* hi) {
  const int64_t q = n / team, r = n % team;
  *lo = tid * q + imin(tid, r);
  *hi = *lo + q + (tid < r);
}

// Elements of the NHWC band that holds the input rows of any P consecutive output
// pixels (they span at most P / Wo + 2 output rows).
inline int64_t band_elems(const Geometry& g, int64_t P) {
  const int64_t rows = imin(g.Ho, P / g.Wo + 2);
  return imin(g.H, (rows - 1) * g.sh + (g.kh - 1) * g.dh + 1) * g.W * g.C;
}

// A channel shuffle of an NCHW x (g.shuffle groups) is read, not made: the transposes
// that copy each band of input rows into an NHWC band take its planes in the shuffled
// order, and grad_x's bands go back the same way (xrow[c]: the offset of shuffled
// channel c's plane in an image). Zen 5, AVX-512, batch 8, ShuffleNetV1's (g=3) six unit
// shapes, against F.channel_shuffle and then the kernel, summed over three runs: forward
// 1.08-1.16x, training step 1.09-1.13x. A channels-last x is shuffled by the caller
// (_ops.call): a gathering copy of each band here measured 0.82-0.98x of that (stride 2
// reads 4 input pixels an output pixel; sum 0.91x forward).
inline void shuffle_planes(const Geometry& g, int64_t* xrow) {
  const int64_t s = g.shuffle, n = g.C / s;
  for (int64_t c = 0; c < g.C; ++c) xrow[c] = ((c % s) * n + c / s) * g.H * g.W;
}

// U's rows [0, p1 - p0) = act1(dw(x) + b_dw) at output pixels [p0, p1) of the image xn,
// all mid channels: an NCHW image's band of input rows is transposed into xb first (as
// NHWC; its planes in a channel shuffle's order where xrow is given: shuffle_planes).
template <class T>
void depthwise_pixels(const Geometry& g, const int64_t* cols, const T* xn, int64_t p0, int64_t p1,
                      const T* wt, const T* dwb, T* U, int64_t ldu, T* xb, const int64_t* xrow) {
  int64_t r0 = 0, r1 = g.H;
  if (!g.channels_last) {  // the band of input rows these pixels read, as NHWC
    input_rows(g, p0, p1, &r0, &r1);
    if (r1 > r0) transpose_copy(xn + r0 * g.W, g.H * g.W, xb, g.C, g.C, (r1 - r0) * g.W, xrow);
    xn = xb;
  }
  dw_forward(g, cols, xn, r0, r1, wt, dwb, g.act1, p0, p1, U, ldu, 0, g.Cm);
}

// U's rows times a per-image scale of each mid channel (squeeze-and-excitation's
// excitation, applied before the pointwise GEMM): a pass over the tile in cache.
template <class T> void scale_rows(T* U, int64_t rows, int64_t ldu, const T* s, int64_t n) {
  for (int64_t p = 0; p < rows; ++p) {
    T* u = U + p * ldu;
    for (int64_t c = 0; c < n; ++c) u[c] *= s[c];
  }
}

// Both layouts run one pipeline, pixel-major: U[p][c] = act1(dw(x) + b_dw) by the
// NHWC depthwise (vectorised along channels, where even 7x7 planes fill the vectors),
// then y[p][co] = act2(U . W^T + b_pw) by the GEMM. An NCHW x is transposed into an
// NHWC band per tile and y is stored transposed from the GEMM's registers, so NCHW
// costs two in-cache transposes and no extra pass over memory.
template <class T>
int forward_impl(const Geometry& g, const T* x, const T* dww, const T* pww, const T* dwb,
                 const T* pwb, const T* scale, const T* lnw, const T* lnb, T* y) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, Co = g.Co, kk = g.kh * g.kw;
  const bool xcl = g.channels_last, cl = g.y_channels_last;  // x's layout, y's
  // Pointwise groups: output channels [i * Cog, (i + 1) * Cog) read mid channels [i * Kg,
  // (i + 1) * Kg) only, a GEMM per group on U's column block; the weight (Co x Kg) is
  // packed by groups, npg panels each. (One group: Kg = Cm, the plain GEMM.)
  const int64_t G = g.groups, Kg = Cm / G, Cog = Co / G, npg = wt_panels<T>(g);
  // The packed weights in half the L2 (else they stream from L3: images_per_tile and
  // the GEMM's panel groups below).
  const int64_t npanels = G * npg, panel_bytes = Kg * nr * (int64_t)sizeof(T);
  const bool weights_fit = npanels * panel_bytes <= g.l2_bytes / 2;
  const int64_t P = tile_pixels<T>(g, 4 * MR, true), images = images_per_tile<T>(g, P, weights_fit);
  const int64_t ldu = padded_ld<T>(Cm, 16, 1024);
  const int64_t pixel_tiles = images > 1 ? ceil_div(g.N, images) : g.N * ceil_div(HWo, P);
  // Split the output channels too when there are few pixel tiles (batch 1, 7x7):
  // up to two tiles per thread, each holding a share of the weights in L2. Each
  // split recomputes its depthwise tile (k^2/Co extra work). With one pixel tile,
  // each weight block serves one tile, so its panels are packed as they are used
  // (pack_each): into the thread's own L2-sized buffer just before its GEMM, instead
  // of all of them first (a pass over the packed copy out to memory and back: 9.4
  // MiB at 768x7->3072), and the split is one block per thread. Zen 5, batch 1, in-
  // process A/B: 960x7->320 1.39-1.41x, 1024x7 1.09-1.28x, 768x7->3072 1.16x.
  // (With pointwise groups every tile takes all the output channels, group by group.)
  const bool pack_each = pixel_tiles == 1 && G == 1;
  int64_t co_splits = G > 1       ? 1
                      : pack_each ? g.threads
                                  : imin(ceil_div(2 * g.threads, imax(pixel_tiles, 1)),
                                         ceil_div(Co, 4 * nr));
  // With few tiles, a count that is not a multiple of the threads leaves one idle.
  while (G == 1 && co_splits < ceil_div(Co, nr) && (pixel_tiles * co_splits) % g.threads != 0 &&
         pixel_tiles * co_splits < 8 * g.threads)
    ++co_splits;
  const int64_t co_block = round_up(ceil_div(Co, co_splits), nr);
  co_splits = ceil_div(Co, co_block);

  // Each thread packs its own copy of the weights (own_weight_copies), as its first
  // tile of a weight block needs them.
  const int64_t packed_elems = npanels * nr * Kg;
  const bool own = !pack_each && own_weight_copies(g, packed_elems * (int64_t)sizeof(T));
  constexpr int64_t line = 64 / (int64_t)sizeof(T);  // each thread's buffers start on a line
  // The depthwise weight as [tap][Cm], the bias (NR-padded) and the tap columns' ranges:
  // a copy per thread, made by the thread (as own_weight_copies: a
  // shared one was read by every thread and written again by the next call). Zen 4,
  // forward, batch 1, in-process A/B against one copy made before the threads start:
  // mobilenet_v2 CL 1.011x, NCHW 1.015x, mobilenet_v1 CL 1.015x.
  const int64_t lw = round_up(kk * Cm, line), lb = round_up(grouped_bias_len<T>(g), nr),
                lc = round_up(2 * g.kw, 8);
  const bool shuffled = g.shuffle > 1;
  Buf<T> wt(0, g.threads * lw), bp(1, pack_each || own ? 0 : packed_elems), bias(2, g.threads * lb);
  Buf<int64_t> cols(3, g.threads * lc + (shuffled ? g.C : 0));  // (+ shuffle_planes')
  const int64_t* const xrow = shuffled ? cols.p + g.threads * lc : nullptr;
  if (shuffled && cols.p) shuffle_planes(g, cols.p + g.threads * lc);
  const int64_t band = xcl ? 0 : round_up(band_elems(g, P), line);
  const int64_t per_thread = images * P * ldu + band + (pack_each ? Cm * nr : 0) +
                             (own ? packed_elems : 0);
  Buf<T> ws(4, g.threads * per_thread);
  if (!wt.p || !bp.p || !bias.p || !ws.p || !cols.p) return OUT_OF_MEMORY;

  const int64_t ntiles = pixel_tiles * co_splits, tiles_per_image = ceil_div(HWo, P);
  // Tile t's first image, its images and output pixels [p0, p1) in each. Output-
  // channel block major: with few pixel tiles each thread keeps to one weight block,
  // and unequal pixel tiles are shared out evenly.
  auto pixels_of = [&](int64_t t, int64_t* n, int64_t* ni, int64_t* p0, int64_t* p1) {
    const int64_t pt = t % pixel_tiles;
    if (images > 1) {
      *n = pt * images, *ni = imin(images, g.N - *n), *p0 = 0, *p1 = HWo;
      return;
    }
    *n = pt / tiles_per_image, *ni = 1;
    *p0 = (pt % tiles_per_image) * P;
    *p1 = imin(*p0 + P, HWo);
  };
  // A channels-last y beyond the stream size is written around the caches: y is not
  // read again here, and by the next layer mostly from DRAM anyway. Zen 5 (AVX-512),
  // batch 32, in-process A/B: 32x112->64 1.36x, 128x56->128 1.03x, 96x56->384 (k7)
  // 1.02-1.05x, the rest 1.00x; batch 8: 32x112->64 1.40x, 64x112->128/s2 1.20x.
  // AVX2 on the same machine 0.99-1.03x (those layers are not waiting on stores there).
  // (An NCHW y is stored transposed, in part lines: left as it is.)
  const bool stream = cl && g.N * HWo * Co * (int64_t)sizeof(T) >= g.stream_bytes;
  // A channels-last y is written by groups of weight panels (gemm, panel_group): all of
  // them where the packed weights fit in half the L2, else as many as fit in a quarter
  // (all at once, larger weights would stream from L3 once per row block). Granite
  // Rapids guest, in-process A/B against one panel at a time, batch 8: all panels
  // 96x56->384 1.16x, 192x28->768 1.08x, 32x112->64 1.05x, 512x14->512 1.03x, others
  // 0.98-1.02x (AVX2 path 1.00-1.06x); groups of 5-10 panels 728x19->728, 384x14->
  // 1536, 768x7->3072, 1024x7->1024 1.01-1.02x (AVX2 1.01-1.02x), batch 32 1.03-1.06x.
  // An NCHW y (stored transposed, in part lines) keeps one panel at a time within a
  // GEMM; a tile of several images takes the groups one GEMM per image (below).
  const int64_t weight_group = weights_fit ? npanels : imax(1, g.l2_bytes / 4 / panel_bytes);
  const int64_t panel_group = cl ? weight_group : 1;
#pragma omp parallel num_threads(g.threads)
  {
  const DenormalMode mode(g.flush_denormals);
  const int64_t tid = omp_get_thread_num();
  T* const wt_t = wt.p + tid * lw;
  T* const bias_t = bias.p + tid * lb;
  int64_t* const cols_t = cols.p + tid * lc;
  memset(bias_t, 0, lb * sizeof(T));
  prepare_weights(g, dww, pwb, wt_t, bias_t, cols_t);
  if (!pack_each && !own) {
#pragma omp for schedule(static)
    for (int64_t q = 0; q < npanels; ++q) pack_wt_grouped(g, pww, q, bp.p);
  }
  // Each thread takes a contiguous run of tiles, so that it knows its next tile: the
  // GEMM of one tile pulls the next one's input into L2. A tile's depthwise otherwise
  // waits on DRAM while no input is in flight during the GEMM: stride-2 layers, which
  // read 4 input pixels per output pixel, at batch 32 (x far beyond L3), Zen 5, CL,
  // one process per variant: 192x28->64 1.2-1.3x, 144x56->32 1.25-1.3x, 96x112->24 1.2x.
  int64_t t_begin, t_end;
  static_range(ntiles, tid, omp_get_num_threads(), &t_begin, &t_end);
  T* U = ws.p + tid * per_thread;
  T* xb = U + images * P * ldu;
  T* const packed = own ? xb + band : bp.p;  // (own: no pack_each panel there)
  int64_t packed_block = -1;  // own: the weight block whose panels this thread packed last
  for (int64_t t = t_begin; t < t_end; ++t) {
    int64_t n, ni, p0, p1;
    pixels_of(t, &n, &ni, &p0, &p1);
    const int64_t np = p1 - p0, co0 = t / pixel_tiles * co_block, co1 = imin(co0 + co_block, Co);
    if (own && t / pixel_tiles != packed_block) {  // (a thread's tiles are block-major)
      for (int64_t q = G > 1 ? 0 : co0 / nr; q < (G > 1 ? npanels : ceil_div(co1, nr)); ++q)
        pack_wt_grouped(g, pww, q, packed);
      packed_block = t / pixel_tiles;
    }
    for (int64_t j = 0; j < ni; ++j) {  // image n + j's pixels into U's rows from j * np
      T* Uj = U + j * np * ldu;
      depthwise_pixels(g, cols_t, x + (n + j) * g.C * g.H * g.W, p0, p1, wt_t, dwb, Uj, ldu, xb,
                       xrow);
      if (scale) scale_rows(Uj, np, ldu, scale + (n + j) * Cm, Cm);
      if (g.norm_eps >= 0) {
        layer_norm_rows(Uj, Uj, np, ldu, Cm, g.norm_eps, (T*)nullptr);
        if (lnw || lnb) affine_rows(Uj, Uj, ldu, np, Cm, lnw, lnb);
      }
    }
    Prefetch next;  // the next tile's input, unless it is this tile's (another weight block)
    if (t + 1 < t_end && (t + 1) % pixel_tiles != t % pixel_tiles) {
      int64_t n2, ni2, q0, q1;
      pixels_of(t + 1, &n2, &ni2, &q0, &q1);
      for (int64_t j = 0; j < ni2; ++j)
        add_input_band(g, x + (n2 + j) * g.C * g.H * g.W, q0, q1, &next);
    }
    Out<T> o = cl ? Out<T>{y + (n * HWo + p0) * Co + co0, Co, false, bias_t + co0, pwb ? 2 : 0,
                           g.act2}
                  : Out<T>{y + (n * Co + co0) * HWo + p0, HWo, false, bias_t + co0, pwb ? 2 : 0,
                           g.act2, true};
    o.prefetch = &next;
    o.stream = stream;
    o.panel_group = panel_group;
    if (G > 1) {  // a GEMM per group (and per image where y is NCHW: Co planes apart)
      for (int64_t j = 0; j < (cl ? 1 : ni); ++j)
        for (int64_t i = 0; i < G; ++i) {
          Out<T> oi = o;
          oi.c += cl ? i * Cog : j * Co * HWo + i * Cog * HWo;
          oi.bias += i * Cog;
          gemm(cl ? ni * np : np, Cog, Kg, U + j * np * ldu + i * Kg, ldu, (int64_t)1,
               (int64_t)0, packed + i * npg * Kg * nr, Kg * nr, nr, oi);
        }
      continue;
    }
    if (!pack_each && (cl || ni == 1)) {  // channels-last: the images' rows follow in y
      gemm(ni * np, co1 - co0, Cm, U, ldu, (int64_t)1, (int64_t)0, packed + (co0 / nr) * Cm * nr,
           Cm * nr, nr, o);
      continue;
    }
    if (!pack_each) {  // NCHW images, Co planes apart: a GEMM per image and weight group
      for (int64_t j0 = co0; j0 < co1; j0 += weight_group * nr)
        for (int64_t j = 0; j < ni; ++j) {
          Out<T> oj = o;
          oj.c += j * Co * HWo + (j0 - co0) * HWo;
          oj.bias += j0 - co0;
          gemm(np, imin(weight_group * nr, co1 - j0), Cm, U + j * np * ldu, ldu, (int64_t)1,
               (int64_t)0, packed + (j0 / nr) * Cm * nr, Cm * nr, nr, oj);
        }
      continue;
    }
    T* panel = xb + band;
    for (int64_t j = co0; j < co1; j += nr) {  // output channels [j, j + nr)
      pack_wt_panel(pww, Co, Cm, j / nr, panel);
      Out<T> oj = o;
      oj.c += (j - co0) * (cl ? 1 : HWo);
      oj.bias += j - co0;
      gemm(np, imin(nr, co1 - j), Cm, U, ldu, (int64_t)1, (int64_t)0, panel, Cm * nr, nr, oj);
    }
  }
  if (stream) stream_fence();  // the non-temporal stores reach memory before the call returns
  }
  return OK;
}
