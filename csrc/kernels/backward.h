// The fused backward driver: every gradient, recomputing U per band.
// A fragment of kernels.h, included inside namespace sepconv::<isa>::{anonymous}
// (after the files listed before it there); it includes nothing itself.

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
  const int64_t ldm = round_up(Cm, nr), ldo = round_up(Co, nr), ldp = round_up(P, nr);

  // The weight gradient sums GZ^T . M over all pixels. Per tile its K is one band
  // (49 pixels at 7x7), so each call streamed the Co x Cm accumulator from L3 for
  // little work; NHWC keeps the M and GZ of KS consecutive tiles of a thread side by
  // side and runs that GEMM once per KS tiles, with K of about 256 pixels.
  const int64_t KS = cl ? imax(1, 256 / P) : 1;
  // Per-thread tile buffers: U, dL/dU (G), KS x act1(U) (M), KS x dL/dz (GZ), and
  // U^T (NCHW only).
  const int64_t sU = cl ? P * ldm : Cm * ldp, sGZ = cl ? P * ldo : Co * ldp;
  const int64_t sMT = cl ? 0 : P * ldm;
  const int64_t per_thread = (2 + KS) * sU + KS * sGZ + sMT;
  // Per-thread gradient accumulators, reduced in thread order at the end.
  const int64_t sacc = Co * Cm + kk * Cm + Cm + Co;
  Buf<T> ws(T_ * per_thread), acc(T_ * sacc, true), wt(cl ? kk * Cm : 0), bp(cl ? ldo * Cm : 0),
      wpad(cl ? Co * ldm : 0), bias(ldo, true);
  Buf<int64_t> cols(2 * g.kw);
  if (!ws.p || !acc.p || !wt.p || !bp.p || !wpad.p || !bias.p || !cols.p) return OUT_OF_MEMORY;
  column_ranges(g, cols.p);
  if (cl) {
    for (int64_t c = 0; c < Cm; ++c)
      for (int64_t t = 0; t < kk; ++t) wt.p[t * Cm + c] = dww[c * kk + t];
    for (int64_t q = 0; q < ldo / nr; ++q) pack_wt_panel(pww, Co, Cm, q, bp.p);
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t c = 0; c < Cm; ++c) wpad.p[co * ldm + c] = pww[co * Cm + c];
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
    T* MT = GZs + KS * sGZ;
    T* a_pw = acc.p + tid * sacc;
    int64_t stacked = 0;  // pixels (NHWC) in Ms / GZs whose weight gradient is pending
    auto flush_pw = [&] {  // gW[co][c] += sum_p GZ[p][co] * M[p][c] over the stack
      if (out.pw_weight && stacked) {
        Out<T> o{a_pw, Cm, true, nullptr, 0, ACT_NONE};
        gemm(Co, Cm, stacked, GZs, (int64_t)1, ldo, Ms, nr, ldm, o, false);
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
        if (stacked + P > KS * P) flush_pw();  // NCHW: KS = 1 and stacked stays 0
        T* M = Ms + stacked * ldm;  // act1(U)
        T* GZ = GZs + stacked * ldo;
        const T* xn = x + n * g.C * g.H * g.W;
        T* gxn = out.x ? out.x + n * g.C * g.H * g.W : nullptr;
        dw_forward(g, cols.p, xn, dww, wt.p, dwb, ACT_NONE, p0, p1, U, cl ? ldm : ldp);
        // M = act1(U); rows of M are pixels (NHWC) or channels (NCHW)
        const int64_t rows_u = cl ? np : Cm, ldu = cl ? ldm : ldp, cols_u = cl ? Cm : np;
        for (int64_t r = 0; r < rows_u; ++r) {
          for (int64_t c = 0; c < cols_u; ++c) M[r * ldu + c] = U[r * ldu + c];
          act_inplace(g.act1, M + r * ldu, cols_u);
        }
        // GZ = dL/dz where z = W.M + b. relu'(z) and relu6'(z) equal relu'(y) and
        // relu6'(y) exactly (NaN included), so with y at hand z is not recomputed;
        // silu and hardswish need z itself.
        const int64_t rows_z = cl ? np : Co, cols_z = cl ? Co : np, ldz = cl ? ldo : ldp;
        const int64_t off = cl ? (n * HWo + p0) * Co : n * Co * HWo + p0;
        const T* gyt = gy + off;
        const T* yt = from_y ? y + off : nullptr;
        const int64_t gy_rs = cl ? Co : HWo;
        if (g.act2 != ACT_NONE && !from_y) {
          if (cl) {
            Out<T> o{GZ, ldo, false, bias.p, pwb ? 2 : 0, ACT_NONE};
            gemm(np, Co, Cm, M, ldm, (int64_t)1, bp.p, Cm * nr, nr, o, false);
          } else {
            Out<T> o{GZ, ldp, false, bias.p, pwb ? 1 : 0, ACT_NONE};
            gemm(Co, np, Cm, pww, Cm, (int64_t)1, M, nr, ldp, o, true);
          }
        }
        for (int64_t r = 0; r < rows_z; ++r)
          grad_act(g.act2, gyt + r * gy_rs, from_y ? yt + r * gy_rs : GZ + r * ldz,
                   GZ + r * ldz, cols_z);
        if (out.pw_bias)
          for (int64_t r = 0; r < rows_z; ++r) {
            const T* z = GZ + r * ldz;
            if (cl) {
#pragma omp simd
              for (int64_t c = 0; c < cols_z; ++c) a_pwb[c] += z[c];
            } else {
              for (int64_t c = 0; c < cols_z; ++c) a_pwb[r] += z[c];
            }
          }
        if (cl) {
          stacked += np;  // its weight gradient waits for flush_pw
        } else if (out.pw_weight) {  // gW[co][c] += sum_p GZ[co][p] * M^T[p][c]
          for (int64_t c = 0; c < Cm; ++c)
            for (int64_t r = 0; r < np; ++r) MT[r * ldm + c] = M[c * ldp + r];
          Out<T> o{a_pw, Cm, true, nullptr, 0, ACT_NONE};
          gemm(Co, Cm, np, GZ, ldp, (int64_t)1, MT, nr, ldm, o, true);
        }
        if (!need_g) continue;
        // G = dL/dU = (W^T . GZ) * act1'(U)
        if (cl) {
          Out<T> o{G, ldm, false, nullptr, 0, ACT_NONE};
          gemm(np, Cm, Co, GZ, ldo, (int64_t)1, wpad.p, nr, ldm, o, false);
        } else {
          Out<T> o{G, ldp, false, nullptr, 0, ACT_NONE};
          gemm(Cm, np, Co, pww, (int64_t)1, Cm, GZ, nr, ldp, o, false);
        }
        if (g.act1 != ACT_NONE)
          for (int64_t r = 0; r < rows_u; ++r)
            grad_act(g.act1, G + r * ldu, U + r * ldu, G + r * ldu, cols_u);
        dw_backward(g, cols.p, xn, dww, wt.p, G, ldu, p0, p1, out.dw_weight ? a_dw : nullptr,
                    out.dw_bias ? a_dwb : nullptr, gxn);
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
    if (out.dw_weight)  // NHWC accumulates [tap][Cm]; the result is [Cm][tap]
      for (int64_t c = 0; c < Cm; ++c)
        for (int64_t k = 0; k < kk; ++k)
          out.dw_weight[c * kk + k] =
              (t ? out.dw_weight[c * kk + k] : T(0)) + (cl ? a_dw[k * Cm + c] : a_dw[c * kk + k]);
    if (out.dw_bias)
      for (int64_t c = 0; c < Cm; ++c) out.dw_bias[c] = (t ? out.dw_bias[c] : T(0)) + a_dwb[c];
    if (out.pw_bias)
      for (int64_t co = 0; co < Co; ++co) out.pw_bias[co] = (t ? out.pw_bias[co] : T(0)) + a_pwb[co];
  }
  return OK;
}
