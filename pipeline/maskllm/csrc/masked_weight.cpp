// MaskLLM's per-weight work in one pass per layer (CPU): Gumbel noise -> soft candidate mix ->
// W * soft_mask (+ ||W * soft_mask||^2), and its backward to the logits.
//
// The same math as pipeline/maskllm/kernel.py's torch reference (the test oracle, and the path on
// CUDA): per group g of M weights, candidates c (C of them, 0/1 rows s_c),
//   u_gc  = counter-based uniform of (key, g*C + c)       (see `uniform` below)
//   z_gc  = (kappa * pi_gc - log(-log u_gc)) / tau
//   y_gc  = softmax_c(z_gc), flushed to 0 below FLT_MIN   (no subnormals reach the GEMMs)
//   m_gk  = sum_c y_gc s_ck,   out_gk = W_gk m_gk,   sq = sum out_gk^2 (double)
// backward, from g_out and g_sq:
//   dm_gk = g_out_gk W_gk + 2 g_sq W_gk^2 m_gk;  dy_gc = sum_k s_ck dm_gk
//   dpi_gc = kappa / tau * y_gc (dy_gc - sum_c' y_gc' dy_gc')
// The noise is a pure function of (key, index): nothing is stored for backward, every rank and a
// resumed run draw the same noise, and the result does not depend on the thread count (groups
// are processed in fixed tiles; the squared norm is summed tile by tile in order).
// Each tile gathers its weights (and gradients) into [k][t] columns, so that every loop over the
// tile's groups vectorises; only the moves between layouts are scalar.
// Minimal headers (not torch/extension.h): the first-use build takes seconds, not minutes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kTile = 64;       // groups per tile: loops over a tile vectorise
constexpr float kLogFltMin = -87.33654f;  // log(FLT_MIN), libmvec expf's fast-path bound
constexpr int64_t kMaxCands = 128;  // C(M, N) handled here (2:4 -> 6, 4:8 -> 70); larger: torch path

inline uint32_t lowbias32(uint32_t x) {  // C. Wellons' 32-bit integer hash (a bijection)
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Subnormal results are flushed to zero, as FTZ would (whatever the process's FTZ setting): late in
// the schedule most soft-mask entries underflow, and subnormals slow every CPU op that reads them.
inline float flush(float v) {  // branch-free: late in the schedule half the entries flush, unpredictably
  uint32_t bits = std::bit_cast<uint32_t>(v);
  return std::bit_cast<float>(bits & (0U - static_cast<uint32_t>((bits & 0x7f800000U) != 0)));
}

// u = (2j + 1) / 2^24 with j the top 23 bits of the hash: exactly representable, in (0, 1).
inline float uniform(uint32_t index, uint32_t key0, uint32_t key1) {  // index = g * C + c < 2^32
  uint32_t h = lowbias32(lowbias32(index ^ key0) ^ key1);
  return static_cast<float>(((h >> 9) << 1) | 1U) * 5.9604644775390625e-08f;  // 2^-24
}

struct Layout {  // the weight as a logical [B, R, K] view; groups of M run along K
  int64_t R, K, sB, sR, sK;
  bool dense;  // row-major contiguous: group g starts at g * M
  explicit Layout(const at::Tensor& t)
      : R(t.size(1)), K(t.size(2)), sB(t.stride(0)), sR(t.stride(1)), sK(t.stride(2)),
        dense(sK == 1 && sR == K && (t.size(0) == 1 || sB == R * K)) {}
  // offsets of element 0 of the n groups from g0 on (g = (b * R + r) * K/M + j), one division per tile
  void bases(int64_t g0, int64_t n, int64_t M, int64_t* out) const {
    int64_t per_row = K / M, row = g0 / per_row, j = g0 % per_row, b = row / R, r = row % R;
    for (int64_t t = 0; t < n; ++t) {
      out[t] = b * sB + r * sR + j * M * sK;
      if (++j == per_row) {
        j = 0;
        if (++r == R) r = 0, ++b;
      }
    }
  }
};

// buf[k * kTile + t] = float(src[group t's element k]) for the n groups of a tile; lanes t >= n: 0
template <typename scalar_t, int64_t MT>
inline void gather(const Layout& l, const scalar_t* __restrict src, int64_t g0, int64_t n, int64_t M,
                   const int64_t* bases, float* __restrict buf) {
  if (l.dense && MT) {
    const scalar_t* __restrict s = src + g0 * MT;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < MT; ++k) buf[k * kTile + t] = static_cast<float>(s[t * MT + k]);
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < M; ++k) buf[k * kTile + t] = static_cast<float>(src[bases[t] + k * l.sK]);
  }
  for (int64_t k = 0; k < M; ++k)
    for (int64_t t = n; t < kTile; ++t) buf[k * kTile + t] = 0.f;
}

struct Problem {
  int64_t G, C, M;
  float kappa, inv_tau;
  uint32_t key0, key1;
  std::vector<std::vector<int>> cands_of;  // cands_of[k]: candidates that keep position k
  std::vector<std::vector<int>> pos_of;    // pos_of[c]: positions candidate c keeps
};

Problem make_problem(const at::Tensor& logits, const at::Tensor& candidates, int64_t key0, int64_t key1,
                     double kappa, double tau) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "masked_weight: logits must be a contiguous float32 [G, C] tensor");
  TORCH_CHECK(logits.size(1) <= kMaxCands, "masked_weight: more than ", kMaxCands, " candidates");
  auto cand = candidates.to(at::kFloat).contiguous();
  Problem p{logits.size(0), cand.size(0), cand.size(1), static_cast<float>(kappa), static_cast<float>(1.0 / tau),
            static_cast<uint32_t>(key0), static_cast<uint32_t>(key1), {}, {}};
  TORCH_CHECK(logits.size(1) == p.C, "masked_weight: logits have ", logits.size(1), " columns, not C = ", p.C);
  TORCH_CHECK(p.G * p.C < (int64_t(1) << 32), "masked_weight: more than 2^32 noise values in one layer");
  p.cands_of.resize(p.M);
  p.pos_of.resize(p.C);
  auto a = cand.accessor<float, 2>();
  for (int64_t c = 0; c < p.C; ++c)
    for (int64_t k = 0; k < p.M; ++k)
      if (a[c][k] != 0.f) {
        p.cands_of[k].push_back(static_cast<int>(c));
        p.pos_of[c].push_back(static_cast<int>(k));
      }
  return p;
}

// The per-tile work, for a compile-time candidate count CT and group size MT (0: read them from p).
// Fixed trip counts (kTile, CT, MT) let the compiler vectorise every loop across the tile's groups.
template <int64_t CT, int64_t MT>
struct Tile {
  static int64_t C(const Problem& p) { return CT ? CT : p.C; }
  static int64_t M(const Problem& p) { return MT ? MT : p.M; }

  // y[c * kTile + t]: the soft sample of the n <= kTile groups from g0 (lanes t >= n hold junk)
  static void sample(const Problem& p, const float* __restrict pi, int64_t g0, int64_t n, float* __restrict y) {
    const int64_t nc = C(p);
    alignas(32) float mx[kTile], sum[kTile], scaled[kTile];
    for (int64_t t = 0; t < kTile; ++t) mx[t] = -FLT_MAX, sum[t] = 0.f;
    for (int64_t c = 0; c < nc; ++c) {
      float* __restrict yc = y + c * kTile;
      const uint32_t base = static_cast<uint32_t>(g0 * nc + c), stride = static_cast<uint32_t>(nc);
      for (int64_t t = 0; t < kTile; ++t) yc[t] = uniform(base + static_cast<uint32_t>(t) * stride, p.key0, p.key1);
      for (int64_t t = 0; t < kTile; ++t) yc[t] = -std::log(-std::log(yc[t]));  // Gumbel(0, 1)
      const float* src = pi + g0 * nc + c;
      for (int64_t t = 0; t < n; ++t) scaled[t] = p.kappa * src[t * nc];
      for (int64_t t = n; t < kTile; ++t) scaled[t] = 0.f;
      for (int64_t t = 0; t < kTile; ++t) {
        yc[t] = (scaled[t] + yc[t]) * p.inv_tau;
        mx[t] = std::fmax(mx[t], yc[t]);
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      float* __restrict yc = y + c * kTile;
      for (int64_t t = 0; t < kTile; ++t) {
        // exp(x) for x < log(FLT_MIN) is a subnormal that flushes to 0 in y and leaves the sum (>= 1,
        // the maximum's exp(0)) unchanged: 0 gives the same bits, without libmvec's scalar fallback
        // for such lanes, which late in the schedule (tau -> 0.05) is most of them
        const float x = yc[t] - mx[t];
        const float e = std::exp(std::fmax(x, kLogFltMin));
        yc[t] = x < kLogFltMin ? 0.f : e;
        sum[t] += yc[t];
      }
    }
    for (int64_t t = 0; t < kTile; ++t) sum[t] = 1.f / sum[t];
    for (int64_t c = 0; c < nc; ++c) {
      float* __restrict yc = y + c * kTile;
      for (int64_t t = 0; t < kTile; ++t) yc[t] = flush(yc[t] * sum[t]);
    }
  }

  // mask[k * kTile + t] = sum_c y_c s_ck
  static void mix(const Problem& p, const float* __restrict y, float* __restrict mask) {
    for (int64_t k = 0; k < M(p); ++k) {
      float* __restrict mk = mask + k * kTile;
      for (int64_t t = 0; t < kTile; ++t) mk[t] = 0.f;
      for (int c : p.cands_of[k]) {
        const float* __restrict yc = y + c * kTile;
        for (int64_t t = 0; t < kTile; ++t) mk[t] += yc[t];
      }
    }
  }
};

// run fn(tile_begin, tile_end) over [0, tiles) on at most `threads` threads, contiguous ranges, on torch's
// own (OpenMP) intra-op pool: threads of our own would share the cores with that pool's workers, which
// spin for a while after every torch op, and would run ~1.8x slower inside a training step than alone
template <typename F>
void parallel_tiles(int64_t tiles, int64_t threads, const F& fn) {
  threads = std::max<int64_t>(1, std::min(threads, tiles));
  if (threads == 1) {
    fn(0, tiles);
    return;
  }
  at::parallel_for(0, tiles, (tiles + threads - 1) / threads, fn);  // the grain caps the threads used
}

template <typename scalar_t, int64_t CT, int64_t MT>
std::pair<double, double> forward_impl(const Problem& p, const float* pi, const at::Tensor& w, at::Tensor& out,
                                       float* yout, int64_t threads) {
  using T = Tile<CT, MT>;
  const int64_t M = T::M(p), C = T::C(p);
  Layout lw(w), lo(out);
  const scalar_t* W = w.data_ptr<scalar_t>();
  scalar_t* O = out.data_ptr<scalar_t>();
  int64_t tiles = (p.G + kTile - 1) / kTile;
  std::vector<double> partial(tiles, 0.0), confidence(tiles, 0.0);
  parallel_tiles(tiles, threads, [&](int64_t t0, int64_t t1) {
    std::vector<float> y(C * kTile), mask(M * kTile), wb(M * kTile), sv(M * kTile);
    alignas(32) float top[kTile];
    int64_t bw[kTile], bo[kTile];
    for (int64_t tile = t0; tile < t1; ++tile) {
      int64_t g0 = tile * kTile, n = std::min(kTile, p.G - g0);
      T::sample(p, pi, g0, n, y.data());
      if (yout)  // the sample, as the tile holds it, for a backward that reads it instead of drawing it again
        std::copy(y.begin(), y.end(), yout + tile * C * kTile);
      T::mix(p, y.data(), mask.data());
      // the offsets of the tile's groups, unless gather and the store use the fixed-M contiguous path
      if (!(lw.dense && MT)) lw.bases(g0, n, M, bw);
      if (!(lo.dense && MT)) lo.bases(g0, n, M, bo);
      gather<scalar_t, MT>(lw, W, g0, n, M, bw, wb.data());
      for (int64_t i = 0; i < M * kTile; ++i)  // the product as stored (scalar_t), read back as float
        sv[i] = static_cast<float>(static_cast<scalar_t>(flush(wb[i] * mask[i])));
      if (lo.dense && MT) {
        scalar_t* __restrict o = O + g0 * MT;
        for (int64_t t = 0; t < n; ++t)
          for (int64_t k = 0; k < MT; ++k) o[t * MT + k] = static_cast<scalar_t>(sv[k * kTile + t]);
      } else {
        for (int64_t t = 0; t < n; ++t)
          for (int64_t k = 0; k < M; ++k) O[bo[t] + k * lo.sK] = static_cast<scalar_t>(sv[k * kTile + t]);
      }
      if (yout) continue;  // a recomputation for backward: the sums are the first forward's
      // ||out||^2 of the tile (lanes t >= n are 0), in whatever order the compiler vectorises: only the
      // loss's value reads it (its gradient is the constant g_sq), and tiles are summed in order below
      double sq = 0.0;
      for (int64_t i = 0; i < M * kTile; ++i) sq += static_cast<double>(sv[i]) * sv[i];
      partial[tile] = sq;
      std::fill(top, top + kTile, 0.f);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < kTile; ++t) top[t] = std::fmax(top[t], y[c * kTile + t]);
      double conf = 0.0;
      for (int64_t t = 0; t < n; ++t) conf += top[t];
      confidence[tile] = conf;
    }
  });
  double total = 0.0, conf = 0.0;  // summed in tile order: the same for any thread count
  for (int64_t i = 0; i < tiles; ++i) total += partial[i], conf += confidence[i];
  return {total, conf};
}

template <typename scalar_t, int64_t CT, int64_t MT>
void backward_impl(const Problem& p, const float* pi, const float* yin, const at::Tensor& w, const at::Tensor& gout,
                   float gsq, float* gpi, int64_t threads) {
  using T = Tile<CT, MT>;
  const int64_t M = T::M(p), C = T::C(p);
  Layout lw(w), lg(gout);
  const scalar_t* W = w.data_ptr<scalar_t>();
  const scalar_t* GO = gout.data_ptr<scalar_t>();
  int64_t tiles = (p.G + kTile - 1) / kTile;
  float scale = p.kappa * p.inv_tau;
  parallel_tiles(tiles, threads, [&](int64_t t0, int64_t t1) {
    std::vector<float> y(C * kTile), dy(C * kTile), mask(M * kTile), dm(M * kTile), wb(M * kTile), gb(M * kTile),
        dot(kTile);
    int64_t bw[kTile], bg[kTile];
    for (int64_t tile = t0; tile < t1; ++tile) {
      int64_t g0 = tile * kTile, n = std::min(kTile, p.G - g0);
      if (yin)  // the tile's sample as a forward drew it: the same bits as drawing it again
        std::copy(yin + tile * C * kTile, yin + (tile + 1) * C * kTile, y.begin());
      else
        T::sample(p, pi, g0, n, y.data());
      T::mix(p, y.data(), mask.data());
      if (!(lw.dense && MT)) lw.bases(g0, n, M, bw);
      if (!(lg.dense && MT)) lg.bases(g0, n, M, bg);
      gather<scalar_t, MT>(lw, W, g0, n, M, bw, wb.data());
      gather<scalar_t, MT>(lg, GO, g0, n, M, bg, gb.data());
      for (int64_t i = 0; i < M * kTile; ++i) dm[i] = gb[i] * wb[i] + 2.f * gsq * wb[i] * wb[i] * mask[i];
      std::fill(dot.begin(), dot.end(), 0.f);
      for (int64_t c = 0; c < C; ++c) {
        float* __restrict dyc = dy.data() + c * kTile;
        const float* __restrict yc = y.data() + c * kTile;
        std::fill(dyc, dyc + kTile, 0.f);
        for (int k : p.pos_of[c])
          for (int64_t t = 0; t < kTile; ++t) dyc[t] += dm[k * kTile + t];
        for (int64_t t = 0; t < kTile; ++t) dot[t] += yc[t] * dyc[t];
      }
      for (int64_t c = 0; c < C; ++c) {  // the gradient in [c][t], then written out as [t][c]
        float* __restrict dyc = dy.data() + c * kTile;
        const float* __restrict yc = y.data() + c * kTile;
        for (int64_t t = 0; t < kTile; ++t) dyc[t] = flush(scale * yc[t] * (dyc[t] - dot[t]));
      }
      float* __restrict g = gpi + g0 * C;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t c = 0; c < C; ++c) g[t * C + c] = dy[c * kTile + t];
    }
  });
}

// calls fn.template operator()<CT, MT>() with the compile-time pattern of p (0, 0: any other)
template <typename F>
void dispatch_pattern(const Problem& p, const F& fn) {
  if (p.C == 6 && p.M == 4) return fn.template operator()<6, 4>();      // 2:4
  if (p.C == 4 && p.M == 4) return fn.template operator()<4, 4>();      // 1:4, 3:4
  if (p.C == 70 && p.M == 8) return fn.template operator()<70, 8>();    // 4:8
  if (p.C == 2 && p.M == 2) return fn.template operator()<2, 2>();      // 1:2
  fn.template operator()<0, 0>();
}

at::Tensor logical(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, "masked_weight: expected a logical [B, R, K] view of the weight");
  return t;
}

// a layer's sample y as the tiles hold it: [tiles, C, kTile] float32, lanes past the last group junk
int64_t sample_numel(const Problem& p) { return (p.G + kTile - 1) / kTile * p.C * kTile; }

const float* sample_data(const std::optional<at::Tensor>& y, const Problem& p) {
  if (!y.has_value()) return nullptr;
  TORCH_CHECK(y->numel() == sample_numel(p) && y->scalar_type() == at::kFloat && y->is_contiguous(),
              "masked_weight: the sample must be the one masked_weight_forward kept for this layer");
  return y->data_ptr<float>();
}

}  // namespace

// -> (sum(out^2), sum_g max_c y_gc, sample): the sums as float64 scalars, out written in place. keep_sample:
// a recomputation for backward: the sample y (for masked_weight_backward) instead of the sums (0)
std::vector<at::Tensor> masked_weight_forward(const at::Tensor& w, const at::Tensor& out_like, const at::Tensor& logits,
                                              const at::Tensor& candidates, int64_t key0, int64_t key1, double kappa,
                                              double tau, int64_t threads, bool keep_sample) {
  auto p = make_problem(logits, candidates, key0, key1, kappa, tau);
  logical(w);
  TORCH_CHECK(w.size(0) * w.size(1) * w.size(2) == p.G * p.M, "masked_weight: weight has ", w.numel(),
              " elements, logits describe ", p.G * p.M);
  at::Tensor out = out_like;
  TORCH_CHECK(out.sizes() == w.sizes() && out.scalar_type() == w.scalar_type(), "masked_weight: out must be like w");
  std::pair<double, double> sums;
  at::Tensor y = at::empty({keep_sample ? sample_numel(p) : 0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "masked_weight_forward", [&] {
    dispatch_pattern(p, [&]<int64_t CT, int64_t MT>() {
      sums = forward_impl<scalar_t, CT, MT>(p, logits.data_ptr<float>(), w, out,
                                            keep_sample ? y.data_ptr<float>() : nullptr, threads);
    });
  });
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  return {at::scalar_tensor(sums.first, f64), at::scalar_tensor(sums.second, f64), y};
}

// y (optional): the sample masked_weight_forward kept for this layer and step, read instead of drawn again
at::Tensor masked_weight_backward(const at::Tensor& gout, double gsq, const at::Tensor& w, const at::Tensor& logits,
                                  const at::Tensor& candidates, int64_t key0, int64_t key1, double kappa, double tau,
                                  int64_t threads, const std::optional<at::Tensor>& y) {
  auto p = make_problem(logits, candidates, key0, key1, kappa, tau);
  logical(w);
  logical(gout);
  TORCH_CHECK(gout.scalar_type() == w.scalar_type(), "masked_weight: grad dtype differs from the weight's");
  auto gpi = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "masked_weight_backward", [&] {
    dispatch_pattern(p, [&]<int64_t CT, int64_t MT>() {
      backward_impl<scalar_t, CT, MT>(p, logits.data_ptr<float>(), sample_data(y, p), w, gout,
                                      static_cast<float>(gsq), gpi.data_ptr<float>(), threads);
    });
  });
  return gpi;
}

std::vector<at::Tensor> sample(const at::Tensor& logits, const at::Tensor& candidates, int64_t key0, int64_t key1,
                               double kappa, double tau) {
  // the soft sample y [G, C] and the soft mask [G, M] (for tests and diagnostics)
  auto p = make_problem(logits, candidates, key0, key1, kappa, tau);
  auto y = at::empty({p.G, p.C}, logits.options());
  auto m = at::empty({p.G, p.M}, logits.options());
  std::vector<float> yt(p.C * kTile), mt(p.M * kTile);
  for (int64_t g0 = 0; g0 < p.G; g0 += kTile) {
    int64_t n = std::min(kTile, p.G - g0);
    Tile<0, 0>::sample(p, logits.data_ptr<float>(), g0, n, yt.data());
    Tile<0, 0>::mix(p, yt.data(), mt.data());
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t c = 0; c < p.C; ++c) y.data_ptr<float>()[(g0 + t) * p.C + c] = yt[c * kTile + t];
      for (int64_t k = 0; k < p.M; ++k) m.data_ptr<float>()[(g0 + t) * p.M + k] = mt[k * kTile + t];
    }
  }
  return {y, m};
}

// torch.ops.maskllm.* (a torch library, not a Python module: no pybind11 headers to compile)
TORCH_LIBRARY(maskllm, m) {
  m.def("masked_weight_forward", &masked_weight_forward);
  m.def("masked_weight_backward", &masked_weight_backward);
  m.def("masked_weight_sample", &sample);
}
