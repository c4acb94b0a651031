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
  // Tiles are bands of R whole output rows. Bands b and b+2 read disjoint input
  // rows when (R + 1) * sh > (kh - 1) * dh, so the even bands, then the odd ones,
  // can scatter into grad_x in parallel without races and in a fixed order.
  const int64_t r_min = imax(1, (g.kh - 1) * g.dh / g.sh);
  const int64_t R = imin(imax(r_min, ceil_div(64, g.Wo)), imax(g.Ho, 1));
  const int64_t P = R * g.Wo, nb = ceil_div(g.Ho, R);
  const int64_t ldm = round_up(Cm, nr), ldo = round_up(Co, nr);

  // The weight gradient sums GZ^T . M over all pixels. Per tile its K is one band
  // (49 pixels at 7x7), so each call streamed the Co x Cm accumulator from L3 for
  // little work; the M and GZ of KS consecutive tiles of a thread are kept side by
  // side and that GEMM runs once per KS tiles, with K of about 256 pixels.
  const int64_t KS = imax(1, 256 / P);
  // Per-thread tile buffers: U, dL/dU (G), KS x act1(U) (M), KS x dL/dz (GZ); NCHW
  // adds the NHWC tiles of x (its band), grad_y and grad_x (its band).
  const int64_t sU = P * ldm, sGZ = P * ldo, sB = cl ? 0 : band_elems(g, P);
  const int64_t per_thread = (2 + KS) * sU + KS * sGZ + (cl ? 0 : sGZ + 2 * sB);
  // Per-thread gradient accumulators, reduced in thread order at the end.
  const int64_t sacc = Co * Cm + kk * Cm + Cm + Co;
  Buf<T> ws(T_ * per_thread), acc(T_ * sacc, true), wt(kk * Cm), bp(ldo * Cm), wpk(Co * ldm),
      bias(ldo, true);
  Buf<int64_t> cols(2 * g.kw);
  if (!ws.p || !acc.p || !wt.p || !bp.p || !wpk.p || !bias.p || !cols.p) return OUT_OF_MEMORY;
  column_ranges(g, cols.p);
  for (int64_t c = 0; c < Cm; ++c)
    for (int64_t t = 0; t < kk; ++t) wt.p[t * Cm + c] = dww[c * kk + t];
  for (int64_t q = 0; q < ldo / nr; ++q) pack_wt_panel(pww, Co, Cm, q, bp.p);
  // W itself is the B operand of dL/dU = GZ . W, in panels of nr mid channels, each
  // panel contiguous (Co x nr, zero padded): a panel read straight from the Co x Cm
  // matrix would be Co rows 4 * Cm bytes apart, 4 MiB of address range at 1024 x 1024.
  for (int64_t q = 0; q < ldm / nr; ++q)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t jj = 0; jj < nr; ++jj) {
        const int64_t c = q * nr + jj;
        wpk.p[(q * Co + co) * nr + jj] = c < Cm ? pww[co * Cm + c] : T(0);
      }
  if (pwb)
    for (int64_t co = 0; co < Co; ++co) bias.p[co] = pwb[co];

#pragma omp parallel num_threads(g.threads)
  {
    const int tid = omp_get_thread_num();
    T* U = ws.p + tid * per_thread;
    T* G = U + sU;
    T* Ms = G + sU;
    T* GZs = Ms + KS * sU;
    T* GY = GZs + KS * sGZ;  // NCHW only: grad_y's tile, then the two bands
    T* XB = GY + sGZ;
    T* GXB = XB + sB;
    T* a_pw = acc.p + tid * sacc;
    int64_t stacked = 0;  // pixels in Ms / GZs whose weight gradient is pending
    auto flush_pw = [&] {  // gW[co][c] += sum_p GZ[p][co] * M[p][c] over the stack
      if (out.pw_weight && stacked) {
        Out<T> o{a_pw, Cm, true, nullptr, 0, ACT_NONE};
        gemm(Co, Cm, stacked, GZs, (int64_t)1, ldo, Ms, nr, ldm, o);
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
        if (stacked + P > KS * P) flush_pw();
        T* M = Ms + stacked * ldm;  // act1(U)
        T* GZ = GZs + stacked * ldo;
        const T* xn = x + n * g.C * g.H * g.W;
        T* gxn = out.x ? out.x + n * g.C * g.H * g.W : nullptr;
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
        for (int64_t r = 0; r < np; ++r) {
          for (int64_t c = 0; c < Cm; ++c) M[r * ldm + c] = U[r * ldm + c];
          act_inplace(g.act1, M + r * ldm, Cm);
        }
        // GZ = dL/dz where z = W.M + b. relu'(z) and relu6'(z) equal relu'(y) and
        // relu6'(y) exactly (NaN included), so with y at hand z is not recomputed;
        // silu and hardswish need z itself.
        if (g.act2 != ACT_NONE && !from_y) {
          Out<T> o{GZ, ldo, false, bias.p, pwb ? 2 : 0, ACT_NONE};
          gemm(np, Co, Cm, M, ldm, (int64_t)1, bp.p, Cm * nr, nr, o);
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
        stacked += np;  // its weight gradient waits for flush_pw
        if (!need_g) continue;
        // G = dL/dU = (W^T . GZ) * act1'(U)
        Out<T> o{G, ldm, false, nullptr, 0, ACT_NONE};
        gemm(np, Cm, Co, GZ, ldo, (int64_t)1, wpk.p, Co * nr, nr, o);
        if (g.act1 != ACT_NONE)
          for (int64_t r = 0; r < np; ++r)
            grad_act(g.act1, G + r * ldm, U + r * ldm, G + r * ldm, Cm);
        dw_backward(g, xn, r0, wt.p, G, ldm, p0, p1, out.dw_weight ? a_dw : nullptr,
                    out.dw_bias ? a_dwb : nullptr, cl ? gxn : (gxn ? GXB : nullptr));
        if (!cl && gxn && r1 > r0)
          transpose_add(GXB, g.C, gxn + r0 * g.W, g.H * g.W, (r1 - r0) * g.W, g.C);
      }
    }
    flush_pw();
  }
  // Deterministic reduction of the per-thread accumulators, in thread order.
  for (int64_t t = 0; t < T_; ++t) {
    const T* a_pw = acc.p + t * sacc;
    const T* a_dw = a_pw + Co * Cm;
    const T* a_dwb = a_dw + kk * Cm;
    const T* a_pwb = a_dwb + Cm;
    if (out.pw_weight)
      for (int64_t i = 0; i < Co * Cm; ++i) out.pw_weight[i] = (t ? out.pw_weight[i] : T(0)) + a_pw[i];
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
