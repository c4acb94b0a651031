// The fused backward driver: every gradient, recomputing U per band.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

// Both layouts run one pipeline, pixel-major as in the forward: an NCHW x, grad_y
// and y are transposed into NHWC tiles per band, and grad_x is gathered in an NHWC
// band and added into the NCHW tensor by a transpose.
template <class T>
int backward_impl(const Geometry& g, const T* gy, const T* y, const T* x, const T* dww,
                  const T* pww, const T* dwb, const T* pwb, const Grads<T>& out) {
  constexpr int64_t nr = NR<T>();
  const int64_t HWo = g.Ho * g.Wo, Cm = g.Cm, Co = g.Co, kk = g.kh * g.kw, T_ = g.threads;
  const bool cl = g.channels_last;
  const bool need_g = out.x || out.dw_weight || out.dw_bias;  // d loss / d U needed
  const bool from_y = y && (g.act2 == ACT_RELU || g.act2 == ACT_RELU6);
  // GZ = dL/dz where z = W.M + b. relu'(z) and relu6'(z) equal relu'(y) and relu6'(y)
  // exactly (NaN included), so with y at hand z is not recomputed; silu and
  // hardswish need z itself.
  const bool need_z = g.act2 != ACT_NONE && !from_y;
  // Tiles are bands of R whole output rows. Bands b and b+2 read disjoint input
  // rows when (R + 1) * sh > (kh - 1) * dh, so the even bands, then the odd ones,
  // can scatter into grad_x in parallel without races and in a fixed order.
  const int64_t r_min = imax(1, (g.kh - 1) * g.dh / g.sh);
  const int64_t R = imin(imax(r_min, ceil_div(64, g.Wo)), imax(g.Ho, 1));
  const int64_t P = R * g.Wo, nb = ceil_div(g.Ho, R);
  const int64_t ldm = round_up(Cm, nr), ldo = round_up(Co, nr);

  // The weight gradient sums GZ^T . M over all pixels. Per tile its K is one band
  // (49 pixels at 7x7), so each call streamed the Co x Cm accumulator from L3 for
  // little work; the M and GZ of KS consecutive tiles of a thread are stacked (KP
  // pixels) and that GEMM runs once per stack. Stacked pixel-major, each k of that
  // GEMM steps a whole row of each; from rows of 4 KiB (1024 channels) on, each
  // step is a new page, which the prefetchers do not follow, and at Co = 3072 it
  // ran at half speed. Such a stack is packed instead, as the tiles are made, in the
  // order the GEMM reads it: GZ^T in blocks of MR output channels (KP x MR), M in
  // panels of nr mid channels (KP x nr). Narrower rows stay as they are: the copy
  // cost the 32- and 64-channel layers 3-7%.
  const int64_t KS = imax(1, 256 / P), KP = KS * P;
  const bool pack_gz = ldo * (int64_t)sizeof(T) >= 4096, pack_m = ldm * (int64_t)sizeof(T) >= 4096;
  // Per-thread buffers: the tiles U, G (dL/dU, and act1(U) before it) and GZ (when
  // packed), the stacks, and for NCHW grad_y's tile and the NHWC bands of x, grad_x.
  const int64_t sU = P * ldm, sGZ = P * ldo, sB = cl ? 0 : band_elems(g, P);
  const int64_t sGZt = pack_gz ? sGZ : 0, sMs = KP * ldm, sGZs = KP * imax(ldo, round_up(Co, MR));
  const int64_t per_thread = 2 * sU + sGZt + sMs + sGZs + (cl ? 0 : sGZ + 2 * sB);
  // Per-thread gradient accumulators, reduced in thread order at the end.
  const int64_t sacc = Co * Cm + kk * Cm + Cm + Co;
  Buf<T> ws(0, T_ * per_thread), acc(1, T_ * sacc), wt(2, kk * Cm), bp(3, need_z ? ldo * Cm : 0),
      wpk(4, need_g ? Co * ldm : 0), bias(5, ldo, true);
  Buf<int64_t> cols(6, 2 * g.kw);
  if (!ws.p || !acc.p || !wt.p || !bp.p || !wpk.p || !bias.p || !cols.p) return OUT_OF_MEMORY;
  column_ranges(g, cols.p);
  for (int64_t c = 0; c < Cm; ++c)
    for (int64_t t = 0; t < kk; ++t) wt.p[t * Cm + c] = dww[c * kk + t];
  if (pwb)
    for (int64_t co = 0; co < Co; ++co) bias.p[co] = pwb[co];

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
    memset(acc.p + tid * sacc, 0, sacc * sizeof(T));
    if (need_z) {
#pragma omp for schedule(static) nowait
      for (int64_t q = 0; q < ldo / nr; ++q) pack_wt_panel(pww, Co, Cm, q, bp.p);
    }
    if (need_g) {
#pragma omp for schedule(static) nowait
      for (int64_t q = 0; q < ldm / nr; ++q) pack_w_panel(pww, Co, Cm, q, wpk.p);
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
    T* a_pw = acc.p + tid * sacc;
    int64_t stacked = 0;  // pixels in Ms / GZs whose weight gradient is pending
    auto flush_pw = [&] {  // gW[co][c] += sum_p GZ[p][co] * M[p][c] over the stack
      if (out.pw_weight && stacked) {
        Out<T> o{a_pw, Cm, true, nullptr, 0, ACT_NONE};
        const int64_t acs = pack_gz ? MR : ldo, a_block = pack_gz ? KP * MR : MR;
        const int64_t b_panel = pack_m ? KP * nr : nr, ldb = pack_m ? nr : ldm;
        gemm(Co, Cm, stacked, GZs, (int64_t)1, acs, a_block, Ms, b_panel, ldb, o);
      }
      stacked = 0;
    };
    T* a_dw = a_pw + Co * Cm;
    T* a_dwb = a_dw + kk * Cm;
    T* a_pwb = a_dwb + Cm;
    for (int phase = 0; phase < 2; ++phase) {
      const int64_t per_n = (nb + 1 - phase) / 2;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < g.N * per_n; ++t) {
        const int64_t n = t / per_n, band = 2 * (t % per_n) + phase;
        const int64_t p0 = band * P, p1 = imin(p0 + P, HWo), np = p1 - p0;
        if (stacked + P > KP) flush_pw();
        T* GZ = pack_gz ? GZt : GZs + stacked * ldo;
        const T* xn = x + n * g.C * g.H * g.W;
        T* gxn = out.x ? out.x + n * g.C * g.H * g.W : nullptr;
        // grad_x is cleared here rather than by the caller (a whole extra pass over
        // it, 6% of a MobileNetV2 training step): an even band clears the rows from
        // its first input row to the next even band's, all of the image together,
        // before any odd band (the next phase) adds to them.
        if (gxn && phase == 0) {
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
          if (r1 > r0) transpose_copy(xn + r0 * g.W, g.H * g.W, XB, g.C, g.C, (r1 - r0) * g.W);
          xn = XB;
          if (gxn) memset(GXB, 0, imax(r1 - r0, 0) * g.W * g.C * sizeof(T));
          const int64_t off = n * Co * HWo + p0;
          transpose_copy(gy + off, HWo, GY, ldo, Co, np);
          if (from_y) transpose_copy(y + off, HWo, GZ, ldo, Co, np);
          gyt = GY, yt = GZ, gy_rs = ldo;
        }
        dw_forward(g, cols.p, xn, r0, r1, wt.p, dwb, ACT_NONE, p0, p1, U, ldm);
        // M = act1(U), pixel-major: straight onto an unpacked stack, else in G, or U
        // itself when act1 is the identity.
        const T* M = U;
        T* Mt = out.pw_weight && !pack_m ? Ms + stacked * ldm : G;
        if ((out.pw_weight || need_z) && (g.act1 != ACT_NONE || Mt != G)) {
          for (int64_t r = 0; r < np; ++r) {
            for (int64_t c = 0; c < Cm; ++c) Mt[r * ldm + c] = U[r * ldm + c];
            act_inplace(g.act1, Mt + r * ldm, Cm);
          }
          M = Mt;
        }
        if (need_z) {
          Out<T> o{GZ, ldo, false, bias.p, pwb ? 2 : 0, ACT_NONE};
          gemm(np, Co, Cm, M, ldm, (int64_t)1, MR * ldm, bp.p, Cm * nr, nr, o);
        }
        for (int64_t r = 0; r < np; ++r)
          grad_act(g.act2, gyt + r * gy_rs, from_y ? yt + r * gy_rs : GZ + r * ldo, GZ + r * ldo,
                   Co);
        if (out.pw_bias)
          for (int64_t r = 0; r < np; ++r) {
            const T* z = GZ + r * ldo;
#pragma omp simd
            for (int64_t c = 0; c < Co; ++c) a_pwb[c] += z[c];
          }
        if (out.pw_weight) {  // onto the stacks; the weight gradient waits for flush_pw
          for (int64_t r = 0; r < np; ++r) {
            const int64_t k = stacked + r;
            if (pack_m)  // whole panels: M's rows are ldm long
              for (int64_t q = 0; q < ldm / nr; ++q)
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
        Out<T> o{G, ldm, false, nullptr, 0, ACT_NONE};
        gemm(np, Cm, Co, GZ, ldo, (int64_t)1, MR * ldo, wpk.p, Co * nr, nr, o);
        if (g.act1 != ACT_NONE)
          for (int64_t r = 0; r < np; ++r)
            grad_act(g.act1, G + r * ldm, U + r * ldm, G + r * ldm, Cm);
        dw_backward(g, cols.p, xn, r0, wt.p, G, ldm, p0, p1, out.dw_weight ? a_dw : nullptr,
                    out.dw_bias ? a_dwb : nullptr, cl ? gxn : (gxn ? GXB : nullptr));
        if (!cl && gxn && r1 > r0)
          transpose_add(GXB, g.C, gxn + r0 * g.W, g.H * g.W, (r1 - r0) * g.W, g.C);
      }
    }
    flush_pw();
    // The weight gradients of the threads are summed in thread order, so the result
    // does not depend on the schedule, and split by element over the threads: at
    // 1024 x 1024 this 4 MiB sum took 8% of the backward on one thread.
    if (out.pw_weight) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < Co * Cm; i0 += 4096) {
        const int64_t n = imin(4096, Co * Cm - i0);
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
    const T* a_dw = acc.p + t * sacc + Co * Cm;
    const T* a_dwb = a_dw + kk * Cm;
    const T* a_pwb = a_dwb + Cm;
    if (out.dw_weight)  // accumulated as [tap][Cm]; the result is [Cm][tap]
      for (int64_t c = 0; c < Cm; ++c)
        for (int64_t k = 0; k < kk; ++k)
          out.dw_weight[c * kk + k] = (t ? out.dw_weight[c * kk + k] : T(0)) + a_dw[k * Cm + c];
    if (out.dw_bias)
      for (int64_t c = 0; c < Cm; ++c) out.dw_bias[c] = (t ? out.dw_bias[c] : T(0)) + a_dwb[c];
    if (out.pw_bias)
      for (int64_t co = 0; co < Co; ++co) out.pw_bias[co] = (t ? out.pw_bias[co] : T(0)) + a_pwb[co];
  }
  return OK;
}
