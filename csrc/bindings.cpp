// pybind11 front of the CPU kernels: checks the geometry, picks the instruction
// set at run time and releases the GIL while a kernel runs. Tensors arrive as raw
// addresses (Python ints); sepconv/_native.py guarantees dtype, layout and sizes,
// and this file re-checks everything that decides where the kernels read and write.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "sepconv.h"

namespace py = pybind11;
using sepconv::Geometry;
using sepconv::Grads;

namespace {

enum Isa : int { GENERIC = 0, AVX2 = 1, AVX512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 state.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return GENERIC;
}

const Isa kBestIsa = detect_isa();

// Data cache sizes in bytes (L2 per core), read once at load: from sysfs, which
// gives the cache of one core's own domain, else sysconf, else the values of a small
// current core. (In a KVM guest on Zen 5, glibc's sysconf gave 384 MiB of L3, the
// host's total; sysfs gave the guest's 32 MiB.)
struct Caches {
  int64_t l1d, l2, l3;
};
int64_t sysfs_cache(int level) {  // 0 where sysfs does not say
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lv(dir + "level"), ty(dir + "type"), sz(dir + "size");
    int l = 0;
    std::string type, size;
    if (!(lv >> l) || !(ty >> type) || !(sz >> size)) continue;
    if (l != level || type == "Instruction") continue;
    const int64_t n = std::atoll(size.c_str());
    const char unit = size.back();
    return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : n;
  }
  return 0;
}
int64_t cache_size(int level, int name, int64_t fallback) {
  if (const int64_t n = sysfs_cache(level); n > 0) return n;
  const long v = sysconf(name);
  return v > 0 ? (int64_t)v : fallback;
}
const Caches kCaches{cache_size(1, _SC_LEVEL1_DCACHE_SIZE, 32 << 10),
                     cache_size(2, _SC_LEVEL2_CACHE_SIZE, 512 << 10),
                     cache_size(3, _SC_LEVEL3_CACHE_SIZE, 8 << 20)};
// The forward's depthwise tile (P pixels x Cm channels) takes a quarter of L2: the
// rest holds the tile's share of the packed pointwise weights and the output rows.
// 256 KiB on a 1 MiB-L2 Zen 4, where this was tuned.
std::atomic<int64_t> g_tile_bytes{kCaches.l2 / 4 < (64 << 10) ? (64 << 10) : kCaches.l2 / 4};
// Forward outputs (channels-last) of at least this many bytes go around the caches
// (kernels/gemm.h, store_tile): half the L3, beyond which little of the output is
// still cached when the next layer reads it.
std::atomic<int64_t> g_stream_bytes{kCaches.l3 / 2};
std::atomic<int> g_isa{kBestIsa};
// The fewest multiply-adds a call gives each thread (team_size); -1: the ISA's default.
std::atomic<int64_t> g_thread_macs{-1};
// Subnormals flushed to zero inside the kernels (see DenormalMode in kernels/vec.h).
std::atomic<bool> g_flush_denormals{true};
std::atomic<int> g_backward_mode{sepconv::BACKWARD_AUTO};

// Transparent huge pages for large outputs. A fresh output of tens of MiB is a fresh
// mmap, and the compute threads fault in and clear its 4 KiB pages one at a time:
// 10-13 ms of a 60 ms call at 38 MiB (convnext 384x14->1536, batch 32, Sapphire
// Rapids); in 2 MiB pages the call took 8-10 ms less. Linux's default THP mode,
// "madvise", gives huge pages only where asked; PyTorch asks only under
// THP_MEM_ALLOC_ENABLE=1. The advice covers the whole huge pages inside the buffer, so
// no neighbouring memory is affected.
int64_t huge_page_size() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
  int64_t n = 0;
  return f >> n && n > 0 && (n & (n - 1)) == 0 ? n : 0;
}
const int64_t kHugePage = huge_page_size();  // 0: no THP here
std::atomic<bool> g_huge_pages{true};

void advise_huge_pages(uintptr_t p, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  if (!g_huge_pages || kHugePage == 0 || bytes < 2 * kHugePage) return;
  const uintptr_t mask = uintptr_t(kHugePage) - 1, a = (p + mask) & ~mask,
                  e = (p + uintptr_t(bytes)) & ~mask;
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)p, (void)bytes;
#endif
}

// The scratch blocks of this thread, grown as needed and freed when the thread ends.
struct ScratchBlocks {
  void* p[sepconv::kScratchSlots] = {};
  size_t cap[sepconv::kScratchSlots] = {};
  ~ScratchBlocks() {
    for (void* q : p) free(q);
  }
};
thread_local ScratchBlocks t_scratch;

int64_t get(const py::tuple& t, size_t i) { return t[i].cast<int64_t>(); }

int64_t checked_mul(std::initializer_list<int64_t> xs) {
  int64_t r = 1;
  for (int64_t x : xs)
    if (__builtin_mul_overflow(r, x, &r)) throw py::value_error("tensor sizes overflow int64");
  return r;
}

// geom = (N, C, H, W, m, Co, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw,
//         Ho, Wo, channels_last, act1, act2, threads)
Geometry parse(const py::tuple& t) {
  if (t.size() != 22) throw py::value_error("geometry must have 22 entries");
  Geometry g{};
  g.N = get(t, 0); g.C = get(t, 1); g.H = get(t, 2); g.W = get(t, 3);
  g.m = get(t, 4); g.Co = get(t, 5); g.kh = get(t, 6); g.kw = get(t, 7);
  g.groups = 1; g.shuffle = 1;
  g.sh = get(t, 8); g.sw = get(t, 9); g.pt = get(t, 10); int64_t pb = get(t, 11);
  g.pl = get(t, 12); int64_t pr = get(t, 13); g.dh = get(t, 14); g.dw = get(t, 15);
  g.Ho = get(t, 16); g.Wo = get(t, 17); g.channels_last = t[18].cast<bool>();
  g.y_channels_last = g.channels_last;
  g.act1 = (int)get(t, 19); g.act2 = (int)get(t, 20); g.threads = (int)get(t, 21);
  g.norm_eps = -1;
  g.y_is_z = false;
  g.tile_bytes = g_tile_bytes;
  g.l2_bytes = kCaches.l2;
  g.l3_bytes = kCaches.l3;
  g.stream_bytes = g_stream_bytes;
  g.flush_denormals = g_flush_denormals;
  g.backward_mode = g_backward_mode;
  auto need = [](bool ok, const char* what) {
    if (!ok) throw py::value_error(std::string("invalid geometry: ") + what);
  };
  need(g.N >= 0, "N >= 0");
  need(g.C >= 1 && g.H >= 1 && g.W >= 1, "C, H, W >= 1");
  need(g.m >= 1 && g.Co >= 1, "depth multiplier and out channels >= 1");
  need(g.kh >= 1 && g.kw >= 1, "kernel size >= 1");
  need(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1, "stride and dilation >= 1");
  need(g.pt >= 0 && pb >= 0 && g.pl >= 0 && pr >= 0, "padding >= 0");
  need(g.act1 >= 0 && g.act1 < sepconv::ACT_COUNT && g.act2 >= 0 &&
       g.act2 < sepconv::ACT_COUNT, "activation code");
  need(g.threads >= 1 && g.threads <= 4096, "1 <= threads <= 4096");
  g.Cm = checked_mul({g.C, g.m});
  int64_t eh = g.H + g.pt + pb - g.dh * (g.kh - 1), ew = g.W + g.pl + pr - g.dw * (g.kw - 1);
  need(eh >= 1 && ew >= 1, "kernel larger than the padded input");
  need(g.Ho == (eh - 1) / g.sh + 1 && g.Wo == (ew - 1) / g.sw + 1, "output size");
  checked_mul({g.N, g.Cm, g.H, g.W});
  checked_mul({g.N, g.Cm, g.Ho, g.Wo});
  checked_mul({g.N, g.Co, g.Ho, g.Wo});
  checked_mul({g.Co, g.Cm, g.kh, g.kw, g.threads});
  return g;
}

// Threads for a call of `passes` sweeps of the multiply-adds N * Ho * Wo * Cm * (kh * kw +
// Co) (the mean: no Co): each thread gets at least thread_macs() of them. Starting and
// joining an OpenMP team costs about 1.5 us, as long as a few hundred thousand
// multiply-adds on one core: a 16-channel 4x4 layer ran in 3.4 us on 2 threads and 1.9 on
// one. Measured on Zen 5 (AVX-512, 2 threads), forward, by multiply-adds per call: one
// thread took 0.5-0.85x the time of two up to 300 K, 0.74-1.00x at 450 K, 0.96-1.07x at
// 620 K and 1.01-1.71x from 930 K on. So 256 K a thread on AVX-512 and, with vectors half
// as wide, 128 K on AVX2 (64 K generic).
int64_t thread_macs() {
  int64_t n = g_thread_macs;
  return n >= 0 ? n : g_isa == AVX512 ? (256 << 10) : g_isa == AVX2 ? (128 << 10) : (64 << 10);
}

int team_size(const Geometry& g, bool mean_only, int64_t passes) {
  const double macs = double(g.N) * g.Ho * g.Wo * g.Cm *
                      (g.kh * g.kw + (mean_only ? 0 : g.Co / g.groups)) * passes;
  const double per_thread = double(std::max<int64_t>(thread_macs(), 1));
  return macs >= per_thread * g.threads ? g.threads : std::max(1, int(macs / per_thread));
}

// The pointwise groups of a forward or backward call (output channel block i reads mid
// channel block i only) and the channel shuffle of x before its depthwise stage.
void set_groups(Geometry& g, int64_t groups, int64_t shuffle, double norm_eps) {
  if (groups < 1 || g.Cm % groups || g.Co % groups)
    throw py::value_error("groups must be >= 1 and divide the mid and output channels");
  if (shuffle < 1 || g.C % shuffle)
    throw py::value_error("shuffle must be >= 1 and divide the input channels");
  if (shuffle > 1 && g.channels_last)  // (the caller shuffles a channels-last x: forward.h)
    throw py::value_error("shuffle: NCHW x only");
  // LayerNorm over the mid channels (norm_eps >= 0): not with groups or a shuffle (the
  // Python layer refuses those; here they are a clear error rather than a wrong answer)
  if (norm_eps >= 0 && (groups > 1 || shuffle > 1))
    throw py::value_error("norm_eps: not with groups or shuffle");
  if (!(norm_eps < 0 || norm_eps >= 0)) throw py::value_error("norm_eps must not be NaN");
  g.groups = groups;
  g.shuffle = shuffle;
  g.norm_eps = norm_eps;
}

// A backward call's geometry and team: three sweeps (the two GEMMs, the depthwise's and
// its recompute). backward_splits reports on the same team as the backward runs.
Geometry backward_geometry(const py::tuple& t, int64_t groups = 1, int64_t shuffle = 1,
                           double norm_eps = -1) {
  Geometry g = parse(t);
  set_groups(g, groups, shuffle, norm_eps);
  g.threads = team_size(g, false, 3);
  return g;
}

template <class T> const T* cp(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <class T> T* mp(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check(int status) {
  if (status == sepconv::OUT_OF_MEMORY) throw std::bad_alloc();  // -> MemoryError
}

// The entry point of the instruction set selected now.
template <class F> F pick(F generic, F avx2, F avx512) {
  return g_isa == AVX512 ? avx512 : g_isa == AVX2 ? avx2 : generic;
}
#define SEPCONV_PICK(fn) pick(sepconv::generic::fn, sepconv::avx2::fn, sepconv::avx512::fn)

template <class T>
int run_forward(const Geometry& g, uintptr_t x, uintptr_t dww, uintptr_t pww, uintptr_t dwb,
                uintptr_t pwb, uintptr_t scale, uintptr_t lnw, uintptr_t lnb, uintptr_t y) {
  advise_huge_pages(y, g.N * g.Co * g.Ho * g.Wo * int64_t(sizeof(T)));
  return SEPCONV_PICK(forward<T>)(g, cp<T>(x), cp<T>(dww), cp<T>(pww), cp<T>(dwb), cp<T>(pwb),
                                  cp<T>(scale), cp<T>(lnw), cp<T>(lnb), mp<T>(y));
}

template <class T>
int run_mean(const Geometry& g, uintptr_t x, uintptr_t dww, uintptr_t dwb, uintptr_t out,
             uintptr_t u) {
  return SEPCONV_PICK(mean<T>)(g, cp<T>(x), cp<T>(dww), cp<T>(dwb), mp<T>(out), mp<T>(u));
}

template <class T>
int run_backward(const Geometry& g, uintptr_t gy, uintptr_t y, uintptr_t x, uintptr_t dww,
                 uintptr_t pww, uintptr_t dwb, uintptr_t pwb, uintptr_t scale, uintptr_t mid_in,
                 uintptr_t lnw, uintptr_t lnb, uintptr_t gx, uintptr_t gdww, uintptr_t gpww,
                 uintptr_t gdwb, uintptr_t gpwb, uintptr_t gscale, uintptr_t gmid,
                 uintptr_t glnw, uintptr_t glnb) {
  if (gx) advise_huge_pages(gx, g.N * g.C * g.H * g.W * int64_t(sizeof(T)));
  Grads<T> out{mp<T>(gx),   mp<T>(gdww),   mp<T>(gpww), mp<T>(gdwb), mp<T>(gpwb),
               mp<T>(gscale), mp<T>(gmid), mp<T>(glnw), mp<T>(glnb)};
  return SEPCONV_PICK(backward<T>)(g, cp<T>(gy), cp<T>(y), cp<T>(x), cp<T>(dww), cp<T>(pww),
                                   cp<T>(dwb), cp<T>(pwb), cp<T>(scale), cp<T>(mid_in),
                                   cp<T>(lnw), cp<T>(lnb), out);
}

bool is_f64(const std::string& dtype) {
  if (dtype == "float32") return false;
  if (dtype == "float64") return true;
  throw py::type_error("sepconv._C supports float32 and float64, got " + dtype);
}

}  // namespace

void* sepconv::scratch(int slot, size_t bytes, bool* owned) {
  *owned = bytes > kScratchKeep || slot < 0 || slot >= kScratchSlots;
  if (*owned) return aligned_alloc(64, bytes);
  ScratchBlocks& s = t_scratch;
  if (s.cap[slot] < bytes) {
    free(s.p[slot]);
    s.p[slot] = aligned_alloc(64, bytes);
    s.cap[slot] = s.p[slot] ? bytes : 0;
  }
  return s.p[slot];
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "Fused depthwise-separable convolution CPU kernels (raw pointers; use sepconv).";

  // scale: (N, Cm) or 0, each image's factor for each mid channel, applied before the
  // pointwise GEMM (squeeze-and-excitation). y_layout: -1 (x's layout), 0 (NCHW) or 1
  // (channels-last): forward_from_mid's x (the intermediate) is always channels-last,
  // and its y is made in the caller's layout rather than transposed after. groups: the
  // pointwise weight is (Co, Cm / groups), output channel block i reading mid channel
  // block i only (a block-diagonal GEMM, no zero blocks). shuffle: x's channels go through
  // a channel shuffle of that many groups before the depthwise stage (read in its order).
  // norm_eps >= 0: LayerNorm over each pixel's mid channels after act1 (kernels/norm.h),
  // with the affine norm_weight / norm_bias ((Cm) or 0 each); < 0: none.
  m.def("forward", [](py::tuple geom, const std::string& dtype, uintptr_t x, uintptr_t dww,
                      uintptr_t pww, uintptr_t dwb, uintptr_t pwb, uintptr_t scale, uintptr_t y,
                      int y_layout, int64_t groups, int64_t shuffle, double norm_eps,
                      uintptr_t lnw, uintptr_t lnb) {
    Geometry g = parse(geom);
    set_groups(g, groups, shuffle, norm_eps);
    if (norm_eps >= 0 && scale) throw py::value_error("norm_eps: not with a scale");
    if (norm_eps < 0 && (lnw || lnb)) throw py::value_error("norm_weight / norm_bias without norm_eps");
    g.threads = team_size(g, false, 1);
    if (y_layout < -1 || y_layout > 1) throw py::value_error("y_layout must be -1, 0 or 1");
    if (y_layout >= 0) g.y_channels_last = y_layout == 1;
    bool f64 = is_f64(dtype);
    int status;
    {
      py::gil_scoped_release nogil;
      status = f64 ? run_forward<double>(g, x, dww, pww, dwb, pwb, scale, lnw, lnb, y)
                   : run_forward<float>(g, x, dww, pww, dwb, pwb, scale, lnw, lnb, y);
    }
    check(status);
  }, py::arg("geom"), py::arg("dtype"), py::arg("x"), py::arg("dww"), py::arg("pww"),
     py::arg("dwb"), py::arg("pwb"), py::arg("scale"), py::arg("y"), py::arg("y_layout") = -1,
     py::arg("groups") = 1, py::arg("shuffle") = 1, py::arg("norm_eps") = -1.0,
     py::arg("norm_weight") = 0, py::arg("norm_bias") = 0);

  // out (N, Cm): the channel means of act1(dw(x) + b_dw) per image; u: 0, or that
  // intermediate itself (N, Cm, Ho, Wo, channels-last). The geometry's Co and act2 are not read.
  m.def("mean", [](py::tuple geom, const std::string& dtype, uintptr_t x, uintptr_t dww,
                   uintptr_t dwb, uintptr_t out, uintptr_t u) {
    Geometry g = parse(geom);
    g.threads = team_size(g, true, 1);
    bool f64 = is_f64(dtype);
    int status;
    {
      py::gil_scoped_release nogil;
      status = f64 ? run_mean<double>(g, x, dww, dwb, out, u)
                   : run_mean<float>(g, x, dww, dwb, out, u);
    }
    check(status);
  });

  // y: the forward's output, or 0. Given for relu / relu6, whose derivative it determines,
  // it saves the backward recomputing the pointwise GEMM. scale: the forward's (N, Cm) or
  // 0; gscale its gradient (N, Cm), or 0 where not wanted (and always 0 without a scale).
  // gmid (N, Ho, Wo, Cm): d loss / d act1(U), for a later call to add as its mid_in (0:
  // neither). groups, shuffle, norm_eps, norm_weight, norm_bias: as forward's; gnorm_weight
  // / gnorm_bias: their gradients (0: not wanted). y_is_z: y holds the pointwise stage's
  // pre-activation z instead, from which every act2's derivative is read.
  m.def("backward", [](py::tuple geom, const std::string& dtype, uintptr_t gy, uintptr_t y,
                       uintptr_t x, uintptr_t dww, uintptr_t pww, uintptr_t dwb, uintptr_t pwb,
                       uintptr_t scale, uintptr_t mid_in, uintptr_t gx, uintptr_t gdww,
                       uintptr_t gpww, uintptr_t gdwb, uintptr_t gpwb, uintptr_t gscale,
                       uintptr_t gmid, int64_t groups, int64_t shuffle, double norm_eps,
                       bool y_is_z, uintptr_t lnw, uintptr_t lnb, uintptr_t glnw,
                       uintptr_t glnb) {
    if (gscale && !scale) throw py::value_error("backward: gscale asked for without a scale");
    if ((glnw && !lnw) || (glnb && !lnb) || (norm_eps < 0 && (lnw || lnb)))
      throw py::value_error("backward: a LayerNorm weight / bias (or its gradient) without "
                            "norm_eps, or a gradient without the tensor");
    if (norm_eps >= 0 && (scale || mid_in || gmid))
      throw py::value_error("backward: norm_eps not with a scale or the intermediate's gradient");
    Geometry g = backward_geometry(geom, groups, shuffle, norm_eps);
    g.y_is_z = y_is_z;
    bool f64 = is_f64(dtype);
    int status;
    {
      py::gil_scoped_release nogil;
      status = f64 ? run_backward<double>(g, gy, y, x, dww, pww, dwb, pwb, scale, mid_in, lnw,
                                          lnb, gx, gdww, gpww, gdwb, gpwb, gscale, gmid, glnw,
                                          glnb)
                   : run_backward<float>(g, gy, y, x, dww, pww, dwb, pwb, scale, mid_in, lnw, lnb,
                                         gx, gdww, gpww, gdwb, gpwb, gscale, gmid, glnw, glnb);
    }
    check(status);
  }, py::arg("geom"), py::arg("dtype"), py::arg("gy"), py::arg("y"), py::arg("x"),
     py::arg("dww"), py::arg("pww"), py::arg("dwb"), py::arg("pwb"), py::arg("scale"),
     py::arg("mid_in"), py::arg("gx"), py::arg("gdww"), py::arg("gpww"), py::arg("gdwb"),
     py::arg("gpwb"), py::arg("gscale"), py::arg("gmid"), py::arg("groups"), py::arg("shuffle"),
     py::arg("norm_eps"), py::arg("y_is_z"), py::arg("norm_weight") = 0,
     py::arg("norm_bias") = 0, py::arg("gnorm_weight") = 0, py::arg("gnorm_bias") = 0);

  m.def("isa", [] { return std::string(kIsaNames[g_isa.load()]); },
        "The instruction set the kernels run with now.");
  m.def("supported_isas", [] {
    std::vector<std::string> r;
    for (int i = 0; i <= kBestIsa; ++i) r.push_back(kIsaNames[i]);
    return r;
  }, "Instruction sets this CPU can run, slowest first.");
  m.def("set_isa", [](const std::string& name) {
    for (int i = 0; i <= kBestIsa; ++i)
      if (name == kIsaNames[i]) { g_isa = i; return; }
    throw py::value_error("instruction set '" + name + "' is not available on this CPU (best: " +
                          kIsaNames[kBestIsa] + ")");
  }, "Force the kernels onto an instruction set this CPU supports.");
  m.def("blocking", [] {
    py::dict d;
    d["l1d"] = kCaches.l1d;
    d["l2"] = kCaches.l2;
    d["l3"] = kCaches.l3;
    d["tile_bytes"] = g_tile_bytes.load();
    d["stream_bytes"] = g_stream_bytes.load();
    d["thread_macs"] = thread_macs();
    return d;
  }, "Cache sizes read at load (bytes, L2 per core), the tile budget derived from them and "
     "the output size from which the forward stores around the caches; the fewest "
     "multiply-adds a call gives each of its threads.");
  m.def("set_thread_macs", [](int64_t n) {
    if (n < -1) throw py::value_error("thread_macs must be >= 0, or -1 for the default");
    g_thread_macs = n;
  }, "Override the fewest multiply-adds a call gives each thread (0: every call takes all "
     "of torch's threads; -1: the default; for tests and tuning).");
  m.def("set_stream_bytes", [](int64_t n) {
    if (n < 0) throw py::value_error("stream_bytes must be >= 0");
    g_stream_bytes = n;
  }, "Override the output size from which the forward stores around the caches (0: always; "
     "for tests and tuning).");
  m.def("set_tile_bytes", [](int64_t n) {
    if (n < 4096 || n > (int64_t(1) << 30)) throw py::value_error("tile_bytes must be in [4096, 2**30]");
    g_tile_bytes = n;
  }, "Override the forward's depthwise tile budget (for tuning experiments).");
  m.def("backward_mode", [] {
    const char* names[] = {"auto", "bands", "split"};
    return std::string(names[g_backward_mode.load()]);
  }, "How the backward shares out its work: 'auto', or 'bands' / 'split' forced.");
  m.def("set_backward_mode", [](const std::string& name) {
    const char* names[] = {"auto", "bands", "split"};
    for (int i = 0; i < 3; ++i)
      if (name == names[i]) { g_backward_mode = i; return; }
    throw py::value_error("backward mode must be 'auto', 'bands' or 'split', got '" + name + "'");
  }, "Force the backward onto bands of pixels or onto split mid channels (tests and tuning; "
     "'split' applies where the shape allows it).");
  m.def("backward_splits", [](py::tuple geom, const std::string& dtype) {
    return SEPCONV_PICK(backward_splits)(backward_geometry(geom), is_f64(dtype));
  }, "Whether a backward call of this geometry splits the mid channels over the threads.");
  m.def("flush_denormal", [] { return g_flush_denormals.load(); },
        "Whether the kernels treat subnormal inputs and results as zero (FTZ + DAZ).");
  m.def("set_flush_denormal", [](bool on) { g_flush_denormals = on; },
        "Flush subnormals to zero inside the kernels (True, the default) or keep IEEE "
        "gradual underflow (False; subnormal data then runs 10-100x slower).");
  m.def("huge_pages", [] { return kHugePage > 0 && g_huge_pages.load(); },
        "Whether large outputs are advised onto transparent huge pages (MADV_HUGEPAGE).");
  m.def("huge_page_bytes", [] { return kHugePage; },
        "The transparent huge page size the kernel reports (0: none).");
  m.def("set_huge_pages", [](bool on) { g_huge_pages = on; },
        "Advise outputs of 2 huge pages and more onto transparent huge pages (True, the "
        "default) or leave the memory as allocated (False).");
  m.def("fma_peak", [](int threads, int64_t iters) {
    if (threads < 1 || iters < 1) throw py::value_error("threads and iters must be >= 1");
    py::gil_scoped_release nogil;
    return SEPCONV_PICK(fma_probe)(threads, iters);
  }, py::arg("threads"), py::arg("iters") = 20000000,
     "Measured fp32 FMA throughput (GFLOP/s) of the current instruction set.");
}
