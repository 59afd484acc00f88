// Fused flow-GRPO primitives for CPU (OpenMP through at::parallel_for), the C++ backend of
// tempflow_fast.ops. The math is the backend contract of design.md §1 / tempflow_fast/ops/reference.py:
//
//   logp(x | μ, σ) = mean_d[-(x_d-μ_d)² / (2σ²)] - log σ - ½log 2π          (MEAN over D)
//
// Shapes: N rows (one mean each), K samples sharing a mean, D flattened latent elements.
//
// Layout of the work. Every latent-sized loop is split into fixed chunks of kChunk elements of D,
// and the parallel loop runs over (row, chunk) pairs, so N=4 rows still fill every core and a
// chunk of the mean stays in L1 while the K samples that share it stream past it once. Per-chunk
// partial sums go to a small (N, chunks, K) buffer and are added in double afterwards in a fixed
// order: results do not depend on the thread count.
//
// Precision. Inputs may be fp16/bf16/fp32 (math and accumulation in fp32) or fp64 (math in fp64,
// so that torch.autograd.gradcheck can check the backward). Log-probs, ratios and statistics come
// out in that accumulation type (fp32, or fp64 for fp64 inputs); latent-shaped outputs in the
// input dtype. Per-row scalars (a, b, std, weights, kl_std) may be any floating dtype.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// 2048 fp32 = 8 KB: a mean chunk, a reference-mean chunk and an accumulator fit in L1 beside the
// streaming sample chunk, and FLUX-1024 (D = 4096·64) still gives 128 chunks per row to share out.
constexpr int64_t kChunk = 2048;
constexpr double kHalfLog2Pi = 0.91893853320467274178;  // ½·log(2π)

inline int64_t num_chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }

// Work items (chunks) per thread, at least: a parallel region costs a wake-up and a barrier, which
// on a busy machine can mean waiting out another process's time slice, so a thread is only woken
// for a few hundred thousand elements of work. `streams` = latent arrays touched per item.
inline int64_t grain_items(int64_t streams) {
  constexpr int64_t kMinElementsPerThread = int64_t(1) << 18;
  return std::max<int64_t>(1, kMinElementsPerThread / (kChunk * streams));
}

// Function multi-versioning: AVX-512, AVX2 and baseline copies of a hot loop, chosen at load time
// for the CPU it runs on, so the build cache stays portable (no -march=native).
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define TEMPFLOW_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TEMPFLOW_MULTIVERSION
#endif

// IEEE fp16 bits -> fp32 with integer and float arithmetic only, so that the loop vectorises (the
// scalar c10::Half conversion does not, and made fp16 inputs ~8x slower than fp32). The exponent
// and mantissa are moved into fp32 position and rescaled by 2^112, which also handles subnormals;
// Inf/NaN get the all-ones exponent.
TEMPFLOW_MULTIVERSION
void half_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t h = src[i];
    const uint32_t em = h & 0x7fffu;
    float f;
    uint32_t bits = em << 13;
    std::memcpy(&f, &bits, 4);
    f *= 0x1p112f;
    std::memcpy(&bits, &f, 4);
    bits |= (em >= 0x7c00u ? 0x7f800000u : 0u) | ((h & 0x8000u) << 16);
    std::memcpy(&dst[i], &bits, 4);
  }
}

// fp32 -> IEEE fp16 bits, round to nearest even, branch-free for the same reason (after F. Giesen's
// float_to_half_fast3_rtne): normal results round with an integer bias, subnormal ones by adding a
// magic float whose addition rounds the mantissa into place, overflow gives Inf, NaN stays NaN.
TEMPFLOW_MULTIVERSION
void float_to_half(const float* __restrict src, uint16_t* __restrict dst, int64_t len) {
  constexpr uint32_t kF32Inf = 255u << 23, kF16Max = (127u + 16u) << 23, kMinNormal = 113u << 23;
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  float denorm_magic;
  std::memcpy(&denorm_magic, &kDenormMagic, 4);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], 4);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    float fa;
    std::memcpy(&fa, &u, 4);
    fa += denorm_magic;
    uint32_t ua;
    std::memcpy(&ua, &fa, 4);
    const uint32_t subnormal = ua - kDenormMagic;
    const uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    const uint32_t special = u > kF32Inf ? 0x7e00u : 0x7c00u;
    const uint32_t o = u >= kF16Max ? special : (u < kMinNormal ? subnormal : normal);
    dst[i] = static_cast<uint16_t>(o | (sign >> 16));
  }
}

// Chunk of the input as acc_t. Same type: the input itself (no copy); fp16/bf16: converted once
// into `buf`, so the arithmetic loops below see plain float arrays and vectorise.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_chunk(const scalar_t* src, int64_t len, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_to_float(reinterpret_cast<const uint16_t*>(src), buf, len);
    return buf;
  } else {
    for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Where to compute an output chunk: straight into the output when types agree, else into `buf`
// followed by store_chunk.
template <typename scalar_t, typename acc_t>
inline acc_t* out_chunk(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_chunk(scalar_t* dst, const acc_t* buf, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    float_to_half(buf, reinterpret_cast<uint16_t*>(dst), len);
  } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
  }
}

// The two hot loops: Σ_i (x_i - m_i)² and o_i += c·(x_i - m_i). They are arithmetic-bound, not
// memory-bound, once the data sits in cache (a 25 MB sample tensor is read at ~25 GB/s by one core
// here), so two things matter: independent partial sums (one accumulator is a chain of dependent
// adds, one vector per add latency) and vector width. The width comes from function multi-versioning:
// the compiler emits AVX-512, AVX2 and baseline copies (TEMPFLOW_MULTIVERSION) and the loader picks
// one for the CPU it runs on, so the build cache stays portable (no -march=native).

constexpr int64_t kLanes = 32;  // independent partial sums: 2 AVX-512, 4 AVX2 or 8 SSE registers

template <typename acc_t>
inline acc_t sum_sq_diff_generic(const acc_t* __restrict x, const acc_t* __restrict m, int64_t len) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t diff = x[i + j] - m[i + j];
      lanes[j] += diff * diff;
    }
  }
  acc_t s = 0;
  for (; i < len; ++i) {
    const acc_t diff = x[i] - m[i];
    s += diff * diff;
  }
  for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
}

TEMPFLOW_MULTIVERSION
float sum_sq_diff_f32(const float* __restrict x, const float* __restrict m, int64_t len) {
  return sum_sq_diff_generic<float>(x, m, len);
}

template <typename acc_t>
inline acc_t sum_sq_diff(const acc_t* __restrict x, const acc_t* __restrict m, int64_t len) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return sum_sq_diff_f32(x, m, len);
  } else {
    return sum_sq_diff_generic<acc_t>(x, m, len);
  }
}

// o_i += c·(x_i - m_i)
template <typename acc_t>
inline void add_scaled_diff_generic(acc_t* __restrict o, const acc_t* __restrict x, const acc_t* __restrict m,
                                    acc_t c, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) o[i] += c * (x[i] - m[i]);
}

TEMPFLOW_MULTIVERSION
void add_scaled_diff_f32(float* __restrict o, const float* __restrict x, const float* __restrict m, float c,
                         int64_t len) {
  add_scaled_diff_generic<float>(o, x, m, c, len);
}

template <typename acc_t>
inline void add_scaled_diff(acc_t* __restrict o, const acc_t* __restrict x, const acc_t* __restrict m, acc_t c,
                            int64_t len) {
  if constexpr (std::is_same_v<acc_t, float>) {
    add_scaled_diff_f32(o, x, m, c, len);
  } else {
    add_scaled_diff_generic<acc_t>(o, x, m, c, len);
  }
}

// o_i += Σ_{j<4} c_j·(x_j,i - m_i): four samples per pass over the accumulator chunk, which then
// is loaded and stored once per four samples instead of once per sample.
template <typename acc_t>
inline void add_scaled_diff4_generic(acc_t* __restrict o, const acc_t* __restrict const* x, const acc_t* __restrict m,
                                     const acc_t* c, int64_t len) {
  const acc_t* __restrict x0 = x[0];
  const acc_t* __restrict x1 = x[1];
  const acc_t* __restrict x2 = x[2];
  const acc_t* __restrict x3 = x[3];
  const acc_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t mi = m[i];
    o[i] += c0 * (x0[i] - mi) + c1 * (x1[i] - mi) + c2 * (x2[i] - mi) + c3 * (x3[i] - mi);
  }
}

TEMPFLOW_MULTIVERSION
void add_scaled_diff4_f32(float* __restrict o, const float* __restrict const* x, const float* __restrict m,
                          const float* c, int64_t len) {
  add_scaled_diff4_generic<float>(o, x, m, c, len);
}

template <typename acc_t>
inline void add_scaled_diff4(acc_t* __restrict o, const acc_t* __restrict const* x, const acc_t* __restrict m,
                             const acc_t* c, int64_t len) {
  if constexpr (std::is_same_v<acc_t, float>) {
    add_scaled_diff4_f32(o, x, m, c, len);
  } else {
    add_scaled_diff4_generic<acc_t>(o, x, m, c, len);
  }
}

// ---- input checks (the public layer validates; these keep a bad direct call from reading out of
// bounds, and raise ValueError in Python) -----------------------------------------------------

void check_latent(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
                    t.scalar_type());
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name,
                    " (", like.scalar_type(), "), got ", t.scalar_type());
}

// Per-row / per-sample scalars as a host vector in the accumulation type.
template <typename acc_t>
std::vector<acc_t> host_values(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.numel() == numel, name, " must have ", numel, " elements, got shape ", t.sizes());
  // fp32 / fp64 (what the public layer passes) are read in place: an aten .to() per scalar tensor
  // costs more than the small-shape kernels themselves.
  if (t.is_contiguous() && t.scalar_type() == at::kFloat) {
    const float* p = t.data_ptr<float>();
    return std::vector<acc_t>(p, p + numel);
  }
  if (t.is_contiguous() && t.scalar_type() == at::kDouble) {
    const double* p = t.data_ptr<double>();
    return std::vector<acc_t>(p, p + numel);
  }
  const at::Tensor c = t.detach().to(at::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  return std::vector<acc_t>(p, p + numel);
}

template <typename acc_t>
at::Tensor scalar_out(double v, const at::Tensor& like) {
  return at::scalar_tensor(v, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// ---- NaN-propagating min / max / clamp -------------------------------------------------------
// std::min/max return their first argument when a comparison involves NaN, so a NaN advantage
// would come out of a clamp as ±adv_clip and the loss would stay finite. These return NaN.

template <typename T>
inline T max_nan(T a, T b) {
  return (std::isnan(a) || std::isnan(b)) ? a + b : std::max(a, b);
}

template <typename T>
inline T min_nan(T a, T b) {
  return (std::isnan(a) || std::isnan(b)) ? a + b : std::min(a, b);
}

template <typename T>
inline T clamp_nan(T x, T lo, T hi) {
  return min_nan(max_nan(x, lo), hi);
}

// 0 for finite x, NaN for NaN or ±inf (IEEE: 0·inf = NaN; no -ffast-math in this build).
template <typename T>
inline T nonfinite_to_nan(T x) {
  return x * T(0);
}

// ---- the PPO clipped surrogate of one sample -------------------------------------------------

template <typename acc_t>
struct PpoTerm {
  acc_t ratio;     // r = exp(logp - old)
  acc_t per;       // w·max(-A·r, -A·clip(r, 1-ε, 1+ε))
  acc_t dper;      // ∂per/∂logp: -w·A·r where the unclipped term is active, 0 where clipped strictly wins
  bool clipped;    // |r - 1| > ε
};

template <typename acc_t>
inline PpoTerm<acc_t> ppo_term(acc_t logp, acc_t old, acc_t adv, acc_t w, double clip_range, double adv_clip) {
  const acc_t r = std::exp(logp - old);
  const acc_t A = clamp_nan(adv, static_cast<acc_t>(-adv_clip), static_cast<acc_t>(adv_clip));
  const acc_t lo = static_cast<acc_t>(1.0 - clip_range), hi = static_cast<acc_t>(1.0 + clip_range);
  const acc_t unclipped = -A * r;
  const acc_t clipped = -A * clamp_nan(r, lo, hi);
  // Non-finite inputs poison the sample's loss and gradient (reference.py's contract): an infinitely
  // far sample has logp = -inf and r = 0, which alone would leave both finite. A NaN gradient
  // coefficient also keeps weighted_residual_sum from skipping the sample as "clipped".
  const acc_t poison = nonfinite_to_nan(logp) + nonfinite_to_nan(old) + nonfinite_to_nan(adv) + nonfinite_to_nan(w);
  PpoTerm<acc_t> t;
  t.ratio = r;
  t.per = w * max_nan(unclipped, clipped) + poison;
  t.dper = (clipped > unclipped ? acc_t(0) : -w * A * r) + poison;
  t.clipped = std::abs(r - acc_t(1)) > static_cast<acc_t>(clip_range);
  return t;
}

// ---- 1. Gaussian log-prob --------------------------------------------------------------------

// Σ_d (x[n,k,d] - μ[n,d])² per (n, k), and optionally Σ_d (μ - μ_ref)² per n, in one pass over the
// mean, the K samples sharing it and ref_mean. Returns double sums: ssq[n*K+k], ref_ssq[n].
template <typename scalar_t>
void row_sums(const at::Tensor& samples, const at::Tensor& mean, const at::Tensor* ref_mean,
              std::vector<double>& ssq, std::vector<double>& ref_ssq) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = samples.size(0), K = samples.size(1), D = samples.size(2);
  const int64_t nch = num_chunks(D);
  const int64_t slots = K + 1;  // K sample sums + the reference-mean sum
  std::vector<acc_t> part(N * nch * slots, acc_t(0));
  const scalar_t* xp = samples.data_ptr<scalar_t>();
  const scalar_t* mp = mean.data_ptr<scalar_t>();
  const scalar_t* rp = ref_mean ? ref_mean->data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, N * nch, grain_items(slots + 1), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t mbuf[kChunk], xbuf[kChunk], rbuf[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / nch, c = item % nch;
      const int64_t d0 = c * kChunk, len = std::min(kChunk, D - d0);
      const acc_t* m = load_chunk(mp + n * D + d0, len, mbuf);
      acc_t* out = part.data() + item * slots;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* x = load_chunk(xp + (n * K + k) * D + d0, len, xbuf);
        out[k] = sum_sq_diff(x, m, len);
      }
      if (rp) {
        const acc_t* r = load_chunk(rp + n * D + d0, len, rbuf);
        out[K] = sum_sq_diff(m, r, len);
      }
    }
  });

  ssq.assign(N * K, 0.0);
  ref_ssq.assign(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < nch; ++c) {
      const acc_t* p = part.data() + (n * nch + c) * slots;
      for (int64_t k = 0; k < K; ++k) ssq[n * K + k] += static_cast<double>(p[k]);
      ref_ssq[n] += static_cast<double>(p[K]);
    }
  }
}

template <typename acc_t>
inline acc_t logp_from_ssq(double ssq, acc_t sigma, int64_t D) {
  const acc_t msq = static_cast<acc_t>(ssq / static_cast<double>(D));
  return -msq / (acc_t(2) * sigma * sigma) - std::log(sigma) - static_cast<acc_t>(kHalfLog2Pi);
}

at::Tensor gaussian_log_prob_fwd(const at::Tensor& samples, const at::Tensor& mean, const at::Tensor& std_) {
  check_latent(samples, "samples", 3);
  check_latent(mean, "mean", 2);
  TORCH_CHECK_VALUE(mean.size(0) == samples.size(0) && mean.size(1) == samples.size(2),
                    "mean must be (N, D) for samples (N, K, D) = ", samples.sizes(), ", got ", mean.sizes());
  TORCH_CHECK_VALUE(mean.scalar_type() == samples.scalar_type(), "mean dtype ", mean.scalar_type(),
                    " differs from samples dtype ", samples.scalar_type());
  TORCH_CHECK_VALUE(samples.size(2) > 0 && samples.size(1) > 0, "samples must have K > 0 and D > 0, got ",
                    samples.sizes());
  const int64_t N = samples.size(0), K = samples.size(1), D = samples.size(2);
  at::Tensor logp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, samples.scalar_type(), "gaussian_log_prob_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sigma = host_values<acc_t>(std_, "std", N);
    std::vector<double> ssq, ref_ssq;
    row_sums<scalar_t>(samples, mean, nullptr, ssq, ref_ssq);
    logp = at::empty({N, K}, samples.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* lp = logp.data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) lp[n * K + k] = logp_from_ssq(ssq[n * K + k], sigma[n], D);
  });
  return logp;
}

// dmean[n,d] = Σ_k coef[n,k]·(x[n,k,d] - μ[n,d]) + kl_coef[n]·(μ[n,d] - μ_ref[n,d]).
// Samples whose coefficient is exactly zero (clipped by the PPO rule) are not read at all.
template <typename scalar_t>
at::Tensor weighted_residual_sum(const at::Tensor& samples, const at::Tensor& mean, const at::Tensor* ref_mean,
                                 const std::vector<at::opmath_type<scalar_t>>& coef,
                                 const std::vector<at::opmath_type<scalar_t>>& kl_coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = samples.size(0), K = samples.size(1), D = samples.size(2);
  const int64_t nch = num_chunks(D);
  at::Tensor dmean = at::empty({N, D}, mean.options());
  const scalar_t* xp = samples.data_ptr<scalar_t>();
  const scalar_t* mp = mean.data_ptr<scalar_t>();
  const scalar_t* rp = ref_mean ? ref_mean->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = dmean.data_ptr<scalar_t>();

  at::parallel_for(0, N * nch, grain_items(K + 2), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t mbuf[kChunk], xbuf[kChunk], rbuf[kChunk], obuf[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / nch, c = item % nch;
      const int64_t d0 = c * kChunk, len = std::min(kChunk, D - d0);
      const acc_t* __restrict m = load_chunk(mp + n * D + d0, len, mbuf);
      acc_t* __restrict o = out_chunk(op + n * D + d0, obuf);
      const acc_t kc = kl_coef[n];
      if (rp && kc != acc_t(0)) {
        const acc_t* __restrict r = load_chunk(rp + n * D + d0, len, rbuf);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] = kc * (m[i] - r[i]);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] = acc_t(0);
      }
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        // Samples straight from the input (no conversion buffer): four at a time.
        const acc_t* xs[4];
        acc_t cs[4];
        int64_t q = 0;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t ck = coef[n * K + k];
          if (ck == acc_t(0)) continue;
          xs[q] = xp + (n * K + k) * D + d0;
          cs[q++] = ck;
          if (q == 4) {
            add_scaled_diff4(o, xs, m, cs, len);
            q = 0;
          }
        }
        for (int64_t j = 0; j < q; ++j) add_scaled_diff(o, xs[j], m, cs[j], len);
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const acc_t ck = coef[n * K + k];
          if (ck == acc_t(0)) continue;
          add_scaled_diff(o, load_chunk(xp + (n * K + k) * D + d0, len, xbuf), m, ck, len);
        }
      }
      store_chunk(op + n * D + d0, o, len);
    }
  });
  return dmean;
}

at::Tensor gaussian_log_prob_bwd(const at::Tensor& grad_logp, const at::Tensor& samples, const at::Tensor& mean,
                                 const at::Tensor& std_) {
  check_latent(samples, "samples", 3);
  check_latent(mean, "mean", 2);
  TORCH_CHECK_VALUE(mean.size(0) == samples.size(0) && mean.size(1) == samples.size(2),
                    "mean must be (N, D) for samples (N, K, D) = ", samples.sizes(), ", got ", mean.sizes());
  TORCH_CHECK_VALUE(mean.scalar_type() == samples.scalar_type(), "mean dtype ", mean.scalar_type(),
                    " differs from samples dtype ", samples.scalar_type());
  const int64_t N = samples.size(0), K = samples.size(1), D = samples.size(2);
  at::Tensor dmean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, samples.scalar_type(), "gaussian_log_prob_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sigma = host_values<acc_t>(std_, "std", N);
    const auto g = host_values<acc_t>(grad_logp, "grad_logp", N * K);
    std::vector<acc_t> coef(N * K), kl_coef(N, acc_t(0));
    // A non-finite σ makes the row's gradient NaN (σ = inf alone would give 0), as in the reference:
    // the NaN coefficient also keeps the sample from being skipped as zero-weight.
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        coef[n * K + k] = g[n * K + k] / (sigma[n] * sigma[n] * static_cast<acc_t>(D)) + nonfinite_to_nan(sigma[n]);
    dmean = weighted_residual_sum<scalar_t>(samples, mean, nullptr, coef, kl_coef);
  });
  return dmean;
}

// ---- 2. One SDE step: μ = a·x + b·v, prev = μ + std·noise (or given), logp of prev ------------

// Writes mean (and prev when from noise) and returns Σ_d (prev - μ)² per row.
template <typename scalar_t>
std::vector<double> sde_step_fwd_impl(const at::Tensor& sample, const at::Tensor& velocity, const at::Tensor& given,
                                      bool from_noise, const std::vector<at::opmath_type<scalar_t>>& av,
                                      const std::vector<at::opmath_type<scalar_t>>& bv,
                                      const std::vector<at::opmath_type<scalar_t>>& sv, at::Tensor& prev,
                                      at::Tensor& mu_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = sample.size(0), D = sample.size(1);
  const int64_t nch = num_chunks(D);
  std::vector<acc_t> part(N * nch);
  const scalar_t* xp = sample.data_ptr<scalar_t>();
  const scalar_t* vp = velocity.data_ptr<scalar_t>();
  const scalar_t* gp = given.data_ptr<scalar_t>();
  scalar_t* pp = prev.data_ptr<scalar_t>();
  scalar_t* mo = mu_out.data_ptr<scalar_t>();
  at::parallel_for(0, N * nch, grain_items(5), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t xbuf[kChunk], vbuf[kChunk], gbuf[kChunk], mubuf[kChunk], pbuf[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / nch, c = item % nch;
      const int64_t off = n * D + c * kChunk, len = std::min(kChunk, D - c * kChunk);
      const acc_t ai = av[n], bi = bv[n], si = sv[n];
      const acc_t* __restrict x = load_chunk(xp + off, len, xbuf);
      const acc_t* __restrict v = load_chunk(vp + off, len, vbuf);
      const acc_t* __restrict g = load_chunk(gp + off, len, gbuf);
      acc_t* __restrict mu = out_chunk(mo + off, mubuf);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) mu[i] = ai * x[i] + bi * v[i];
      const acc_t* p = g;  // the sample that is scored
      if (from_noise) {
        acc_t* __restrict po = out_chunk(pp + off, pbuf);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) po[i] = mu[i] + si * g[i];
        store_chunk(pp + off, po, len);
        // Score the prev_sample as returned, i.e. rounded to the input dtype (the reference's
        // choice): the trainer later re-scores exactly that stored tensor.
        p = load_chunk(pp + off, len, pbuf);
      }
      part[item] = sum_sq_diff(p, mu, len);
      store_chunk(mo + off, mu, len);
    }
  });
  std::vector<double> ssq(N, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < nch; ++c) ssq[n] += static_cast<double>(part[n * nch + c]);
  return ssq;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sde_step_fwd(const at::Tensor& sample, const at::Tensor& velocity,
                                                            const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& std_,
                                                            const std::optional<at::Tensor>& noise,
                                                            const std::optional<at::Tensor>& prev_sample) {
  check_latent(sample, "sample", 2);
  check_latent(velocity, "velocity", 2);
  check_same(velocity, "velocity", sample, "sample");
  TORCH_CHECK_VALUE(noise.has_value() != prev_sample.has_value(),
                    "sde_step_fwd: pass exactly one of noise / prev_sample");
  const at::Tensor& given = noise.has_value() ? *noise : *prev_sample;
  const char* given_name = noise.has_value() ? "noise" : "prev_sample";
  check_latent(given, given_name, 2);
  check_same(given, given_name, sample, "sample");
  TORCH_CHECK_VALUE(sample.size(1) > 0, "sample must have D > 0, got shape ", sample.sizes());
  const bool from_noise = noise.has_value();
  const int64_t N = sample.size(0), D = sample.size(1);
  at::Tensor prev = from_noise ? at::empty_like(sample) : prev_sample->clone();
  at::Tensor mu_out = at::empty_like(sample);
  at::Tensor logp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "sde_step_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto av = host_values<acc_t>(a, "a", N);
    const auto bv = host_values<acc_t>(b, "b", N);
    const auto sv = host_values<acc_t>(std_, "std", N);
    const auto ssq = sde_step_fwd_impl<scalar_t>(sample, velocity, given, from_noise, av, bv, sv, prev, mu_out);
    logp = at::empty({N}, sample.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* lp = logp.data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n) lp[n] = logp_from_ssq(ssq[n], sv[n], D);
  });
  return {prev, mu_out, logp};
}

// dsample = a·dμ, dvelocity = b·dμ with dμ = grad_mean + grad_prev + lcoef·(prev - μ); grad_mean /
// grad_prev (already in acc_t, or null when absent) and lcoef = grad_logp/(std²·D) per row.
template <typename scalar_t>
void sde_step_bwd_impl(const at::opmath_type<scalar_t>* gmp, const at::opmath_type<scalar_t>* gpp,
                       const std::vector<at::opmath_type<scalar_t>>& lcoef, const at::Tensor& sample,
                       const at::Tensor& velocity, const at::Tensor& prev_sample,
                       const std::vector<at::opmath_type<scalar_t>>& av,
                       const std::vector<at::opmath_type<scalar_t>>& bv, at::Tensor& dsample, at::Tensor& dvelocity) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = sample.size(0), D = sample.size(1);
  const int64_t nch = num_chunks(D);
  const scalar_t* xp = sample.data_ptr<scalar_t>();
  const scalar_t* vp = velocity.data_ptr<scalar_t>();
  const scalar_t* pp = prev_sample.data_ptr<scalar_t>();
  scalar_t* dxp = dsample.data_ptr<scalar_t>();
  scalar_t* dvp = dvelocity.data_ptr<scalar_t>();
  at::parallel_for(0, N * nch, grain_items(6), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t xbuf[kChunk], vbuf[kChunk], pbuf[kChunk], dmu[kChunk], dxbuf[kChunk], dvbuf[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / nch, c = item % nch;
      const int64_t off = n * D + c * kChunk, len = std::min(kChunk, D - c * kChunk);
      const acc_t ai = av[n], bi = bv[n], lc = lcoef[n];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dmu[i] = acc_t(0);
      if (gmp) {
        const acc_t* __restrict gm = gmp + off;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) dmu[i] += gm[i];
      }
      if (gpp) {
        const acc_t* __restrict gpr = gpp + off;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) dmu[i] += gpr[i];
      }
      if (lc != acc_t(0)) {
        const acc_t* __restrict x = load_chunk(xp + off, len, xbuf);
        const acc_t* __restrict v = load_chunk(vp + off, len, vbuf);
        const acc_t* __restrict p = load_chunk(pp + off, len, pbuf);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) dmu[i] += lc * (p[i] - (ai * x[i] + bi * v[i]));
      }
      acc_t* __restrict dx = out_chunk(dxp + off, dxbuf);
      acc_t* __restrict dv = out_chunk(dvp + off, dvbuf);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        dx[i] = ai * dmu[i];
        dv[i] = bi * dmu[i];
      }
      store_chunk(dxp + off, dx, len);
      store_chunk(dvp + off, dv, len);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sde_step_bwd(const std::optional<at::Tensor>& grad_prev,
                                                const std::optional<at::Tensor>& grad_mean,
                                                const std::optional<at::Tensor>& grad_logp,
                                                const at::Tensor& sample, const at::Tensor& velocity,
                                                const at::Tensor& prev_sample, const at::Tensor& a,
                                                const at::Tensor& b, const at::Tensor& std_, bool prev_given) {
  check_latent(sample, "sample", 2);
  check_latent(velocity, "velocity", 2);
  check_same(velocity, "velocity", sample, "sample");
  check_latent(prev_sample, "prev_sample", 2);
  check_same(prev_sample, "prev_sample", sample, "sample");
  // A given prev_sample is data: its incoming gradient does not reach μ.
  const bool use_gp = grad_prev.has_value() && !prev_given;
  const bool use_gm = grad_mean.has_value();
  if (use_gp) {
    check_latent(*grad_prev, "grad_prev", 2);
    TORCH_CHECK_VALUE(grad_prev->sizes() == sample.sizes(), "grad_prev must have shape ", sample.sizes(),
                      ", got ", grad_prev->sizes());
  }
  if (use_gm) {
    check_latent(*grad_mean, "grad_mean", 2);
    TORCH_CHECK_VALUE(grad_mean->sizes() == sample.sizes(), "grad_mean must have shape ", sample.sizes(),
                      ", got ", grad_mean->sizes());
  }
  const int64_t N = sample.size(0), D = sample.size(1);
  at::Tensor dsample = at::empty_like(sample), dvelocity = at::empty_like(velocity);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "sde_step_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto av = host_values<acc_t>(a, "a", N);
    const auto bv = host_values<acc_t>(b, "b", N);
    const auto sv = host_values<acc_t>(std_, "std", N);
    std::vector<acc_t> lcoef(N, acc_t(0));
    if (grad_logp.has_value()) {
      const auto gl = host_values<acc_t>(*grad_logp, "grad_logp", N);
      for (int64_t n = 0; n < N; ++n) lcoef[n] = gl[n] / (sv[n] * sv[n] * static_cast<acc_t>(D));
    }
    // Incoming latent gradients may arrive in another dtype than the inputs; reading them in the
    // accumulation type (no copy when it already is) avoids dispatching on two dtypes.
    const at::Tensor gp_acc = use_gp ? grad_prev->to(acc_dtype).contiguous() : at::Tensor();
    const at::Tensor gm_acc = use_gm ? grad_mean->to(acc_dtype).contiguous() : at::Tensor();
    sde_step_bwd_impl<scalar_t>(use_gm ? gm_acc.data_ptr<acc_t>() : nullptr,
                                use_gp ? gp_acc.data_ptr<acc_t>() : nullptr, lcoef, sample, velocity, prev_sample,
                                av, bv, dsample, dvelocity);
  });
  return {dsample, dvelocity};
}

// ---- 3. GRPO clipped surrogate ---------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_clip_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv, const at::Tensor& weights,
    double clip_range, double adv_clip) {
  TORCH_CHECK_VALUE(logp.device().is_cpu() && logp.dim() == 1, "logp must be a 1-D CPU tensor, got shape ",
                    logp.sizes(), " on ", logp.device());
  const int64_t M = logp.numel();
  TORCH_CHECK_VALUE(M > 0, "logp must not be empty");
  at::Tensor loss, ratio, clip_frac, approx_kl;
  // fp64 log-probs keep fp64 (gradcheck); anything else is scored in fp32.
  const auto acc_type = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "grpo_clip_loss_fwd", [&] {
    using acc_t = scalar_t;
    const auto lp = host_values<acc_t>(logp, "logp", M);
    const auto old = host_values<acc_t>(old_logp, "old_logp", M);
    const auto A = host_values<acc_t>(adv, "adv", M);
    const auto w = host_values<acc_t>(weights, "weights", M);
    ratio = at::empty({M}, logp.options().dtype(acc_type));
    acc_t* rp = ratio.data_ptr<acc_t>();
    double sum_per = 0.0, n_clipped = 0.0, sum_kl = 0.0;
    for (int64_t j = 0; j < M; ++j) {
      const auto t = ppo_term<acc_t>(lp[j], old[j], A[j], w[j], clip_range, adv_clip);
      rp[j] = t.ratio;
      sum_per += t.per;
      n_clipped += t.clipped ? 1.0 : 0.0;
      const acc_t dl = lp[j] - old[j];
      sum_kl += acc_t(0.5) * dl * dl;
    }
    loss = scalar_out<acc_t>(sum_per / M, logp);
    clip_frac = scalar_out<acc_t>(n_clipped / M, logp);
    approx_kl = scalar_out<acc_t>(sum_kl / M, logp);
  });
  return {loss, ratio, clip_frac, approx_kl};
}

at::Tensor grpo_clip_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                              const at::Tensor& adv, const at::Tensor& weights, double clip_range,
                              double adv_clip) {
  TORCH_CHECK_VALUE(logp.device().is_cpu() && logp.dim() == 1, "logp must be a 1-D CPU tensor, got shape ",
                    logp.sizes(), " on ", logp.device());
  const int64_t M = logp.numel();
  const auto acc_type = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dlogp = at::empty({M}, logp.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "grpo_clip_loss_bwd", [&] {
    using acc_t = scalar_t;
    const acc_t gl = host_values<acc_t>(grad_loss, "grad_loss", 1)[0];
    const auto lp = host_values<acc_t>(logp, "logp", M);
    const auto old = host_values<acc_t>(old_logp, "old_logp", M);
    const auto A = host_values<acc_t>(adv, "adv", M);
    const auto w = host_values<acc_t>(weights, "weights", M);
    acc_t* out = dlogp.data_ptr<acc_t>();
    for (int64_t j = 0; j < M; ++j)
      out[j] = gl * ppo_term<acc_t>(lp[j], old[j], A[j], w[j], clip_range, adv_clip).dper / static_cast<acc_t>(M);
  });
  return dlogp;
}

// ---- 4. Fused Flow-GRPO loss -----------------------------------------------------------------

// kl_std is only needed (and only read) when ref_mean is given.
void check_fused(const at::Tensor& mean, const at::Tensor& samples, const std::optional<at::Tensor>& ref_mean,
                 const std::optional<at::Tensor>& kl_std) {
  check_latent(samples, "samples", 3);
  check_latent(mean, "mean", 2);
  TORCH_CHECK_VALUE(mean.size(0) == samples.size(0) && mean.size(1) == samples.size(2),
                    "mean must be (N, D) for samples (N, K, D) = ", samples.sizes(), ", got ", mean.sizes());
  TORCH_CHECK_VALUE(mean.scalar_type() == samples.scalar_type(), "mean dtype ", mean.scalar_type(),
                    " differs from samples dtype ", samples.scalar_type());
  TORCH_CHECK_VALUE(samples.size(1) > 0 && samples.size(2) > 0, "samples must have K > 0 and D > 0, got ",
                    samples.sizes());
  if (ref_mean.has_value()) {
    check_latent(*ref_mean, "ref_mean", 2);
    check_same(*ref_mean, "ref_mean", mean, "mean");
    TORCH_CHECK_VALUE(kl_std.has_value(), "kl_std is required when ref_mean is given");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_grpo_loss_fwd(
    const at::Tensor& mean, const at::Tensor& samples, const at::Tensor& std_, const at::Tensor& old_logp,
    const at::Tensor& adv, const at::Tensor& weights, const std::optional<at::Tensor>& ref_mean,
    const std::optional<at::Tensor>& kl_std, double clip_range, double adv_clip, double beta) {
  check_fused(mean, samples, ref_mean, kl_std);
  const int64_t N = samples.size(0), K = samples.size(1), D = samples.size(2);
  at::Tensor loss, logp, ratio, clip_frac, approx_kl, kl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, samples.scalar_type(), "flow_grpo_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sigma = host_values<acc_t>(std_, "std", N);
    const auto old = host_values<acc_t>(old_logp, "old_logp", N * K);
    const auto A = host_values<acc_t>(adv, "adv", N * K);
    const auto w = host_values<acc_t>(weights, "weights", N);
    const auto ks = ref_mean.has_value() ? host_values<acc_t>(*kl_std, "kl_std", N) : std::vector<acc_t>();
    std::vector<double> ssq, ref_ssq;
    row_sums<scalar_t>(samples, mean, ref_mean.has_value() ? &*ref_mean : nullptr, ssq, ref_ssq);

    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    logp = at::empty({N, K}, samples.options().dtype(acc_dtype));
    ratio = at::empty({N, K}, samples.options().dtype(acc_dtype));
    acc_t* lp = logp.data_ptr<acc_t>();
    acc_t* rp = ratio.data_ptr<acc_t>();
    double sum_per = 0.0, n_clipped = 0.0, sum_akl = 0.0, sum_kl = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = n * K + k;
        lp[j] = logp_from_ssq(ssq[j], sigma[n], D);
        const auto t = ppo_term<acc_t>(lp[j], old[j], A[j], w[n], clip_range, adv_clip);
        rp[j] = t.ratio;
        sum_per += t.per;
        n_clipped += t.clipped ? 1.0 : 0.0;
        const acc_t dl = lp[j] - old[j];
        sum_akl += acc_t(0.5) * dl * dl;
      }
      if (ref_mean.has_value()) {
        const acc_t msq = static_cast<acc_t>(ref_ssq[n] / static_cast<double>(D));
        sum_kl += msq / (acc_t(2) * ks[n] * ks[n]) + nonfinite_to_nan(ks[n]);
      }
    }
    const double NK = static_cast<double>(N * K);
    const double policy = static_cast<acc_t>(sum_per / NK);
    const double kl_v = static_cast<acc_t>(sum_kl / static_cast<double>(N));
    loss = scalar_out<acc_t>(static_cast<acc_t>(policy + beta * kl_v), mean);
    clip_frac = scalar_out<acc_t>(n_clipped / NK, mean);
    approx_kl = scalar_out<acc_t>(sum_akl / NK, mean);
    kl = scalar_out<acc_t>(kl_v, mean);
  });
  return {loss, logp, ratio, clip_frac, approx_kl, kl};
}

at::Tensor flow_grpo_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& mean, const at::Tensor& samples,
                              const at::Tensor& std_, const at::Tensor& logp, const at::Tensor& old_logp,
                              const at::Tensor& adv, const at::Tensor& weights,
                              const std::optional<at::Tensor>& ref_mean, const std::optional<at::Tensor>& kl_std,
                              double clip_range, double adv_clip, double beta) {
  check_fused(mean, samples, ref_mean, kl_std);
  const int64_t N = samples.size(0), K = samples.size(1), D = samples.size(2);
  at::Tensor dmean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, samples.scalar_type(), "flow_grpo_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t gl = host_values<acc_t>(grad_loss, "grad_loss", 1)[0];
    const auto sigma = host_values<acc_t>(std_, "std", N);
    const auto lp = host_values<acc_t>(logp, "logp", N * K);
    const auto old = host_values<acc_t>(old_logp, "old_logp", N * K);
    const auto A = host_values<acc_t>(adv, "adv", N * K);
    const auto w = host_values<acc_t>(weights, "weights", N);
    const bool with_kl = ref_mean.has_value() && beta != 0.0;
    const auto ks = with_kl ? host_values<acc_t>(*kl_std, "kl_std", N) : std::vector<acc_t>();
    const acc_t NK = static_cast<acc_t>(N * K), Df = static_cast<acc_t>(D);
    std::vector<acc_t> coef(N * K), kl_coef(N, acc_t(0));
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = n * K + k;
        const acc_t g = ppo_term<acc_t>(lp[j], old[j], A[j], w[n], clip_range, adv_clip).dper / NK;
        coef[j] = gl * g / (sigma[n] * sigma[n] * Df);
      }
      if (with_kl)
        kl_coef[n] = gl * static_cast<acc_t>(beta) / (static_cast<acc_t>(N) * ks[n] * ks[n] * Df) +
                     nonfinite_to_nan(ks[n]);
    }
    dmean = weighted_residual_sum<scalar_t>(samples, mean, with_kl ? &*ref_mean : nullptr, coef, kl_coef);
  });
  return dmean;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tempflow_fast fused flow-GRPO primitives, CPU (OpenMP)";
  m.def("gaussian_log_prob_fwd", &gaussian_log_prob_fwd, py::arg("samples"), py::arg("mean"), py::arg("std"));
  m.def("gaussian_log_prob_bwd", &gaussian_log_prob_bwd, py::arg("grad_logp"), py::arg("samples"),
        py::arg("mean"), py::arg("std"));
  m.def("sde_step_fwd", &sde_step_fwd, py::arg("sample"), py::arg("velocity"), py::arg("a"), py::arg("b"),
        py::arg("std"), py::arg("noise"), py::arg("prev_sample"));
  m.def("sde_step_bwd", &sde_step_bwd, py::arg("grad_prev"), py::arg("grad_mean"), py::arg("grad_logp"),
        py::arg("sample"), py::arg("velocity"), py::arg("prev_sample"), py::arg("a"), py::arg("b"),
        py::arg("std"), py::arg("prev_given"));
  m.def("grpo_clip_loss_fwd", &grpo_clip_loss_fwd, py::arg("logp"), py::arg("old_logp"), py::arg("adv"),
        py::arg("weights"), py::arg("clip_range"), py::arg("adv_clip"));
  m.def("grpo_clip_loss_bwd", &grpo_clip_loss_bwd, py::arg("grad_loss"), py::arg("logp"), py::arg("old_logp"),
        py::arg("adv"), py::arg("weights"), py::arg("clip_range"), py::arg("adv_clip"));
  m.def("flow_grpo_loss_fwd", &flow_grpo_loss_fwd, py::arg("mean"), py::arg("samples"), py::arg("std"),
        py::arg("old_logp"), py::arg("adv"), py::arg("weights"), py::arg("ref_mean"), py::arg("kl_std"),
        py::arg("clip_range"), py::arg("adv_clip"), py::arg("beta"));
  m.def("flow_grpo_loss_bwd", &flow_grpo_loss_bwd, py::arg("grad_loss"), py::arg("mean"), py::arg("samples"),
        py::arg("std"), py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("weights"),
        py::arg("ref_mean"), py::arg("kl_std"), py::arg("clip_range"), py::arg("adv_clip"), py::arg("beta"));
}
