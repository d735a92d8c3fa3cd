// Loops of kernels/optimizers.h. Each public kernel switches on its flags once, outside the
// loop, so every loop body is branch-free and vectorizes; the chunk functions are compiled
// for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC target_clones), since
// the package is built without -march=native by default.
#include "kernels/optimizers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/parallel.h"

// No fused multiply-add contraction: the vector body and the scalar tail of a loop (and
// builds with and without AVX2) must round identically, so that a buffer updated in buckets
// gives bit-identical results to one update of the whole, on every rank and every machine.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PBM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PBM_CLONES
#endif
#define PBM_INLINE inline __attribute__((always_inline))

namespace pbm {
namespace detail {

// ---- gradient statistics -----------------------------------------------------------------

// Exact path: float64 squares cannot overflow for finite float32 inputs, so the sum is
// Inf/NaN exactly when some grad*scale is. Used only when the fast path overflows.
PBM_CLONES double sq_norm_chunk_f64(const float* __restrict grad, size_t count, float scale) {
  constexpr int kLanes = 32;
  double partial[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double x = static_cast<double>(grad[i + k] * scale);
      partial[k] += x * x;
    }
  }
  for (; i < count; ++i) {
    const double x = static_cast<double>(grad[i] * scale);
    partial[0] += x * x;
  }
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// Fast path: float32 partial sums over blocks of 4096 elements (128 terms per lane, relative
// error about 1e-5 at worst, ample for a clipping norm), each block's sum added in float64.
// Float32 arithmetic keeps this pass at memory speed (the float64 version is about 25% slower
// from a cold cache); 32 independent lanes vectorize without -ffast-math. A float32 square
// overflows for |x| > 1.8e19, so a non-finite result is re-checked on the exact path.
PBM_CLONES double sq_norm_chunk(const float* __restrict grad, size_t count, float scale) {
  constexpr size_t kLanes = 32, kBlock = 4096;
  double total = 0;
  size_t i = 0;
  while (i + kLanes <= count) {
    const size_t block_end = std::min(count, i + kBlock);
    float partial[kLanes] = {};
    for (; i + kLanes <= block_end; i += kLanes) {
      for (size_t k = 0; k < kLanes; ++k) {
        const float x = grad[i + k] * scale;
        partial[k] += x * x;
      }
    }
    float block = 0;
    for (float p : partial) block += p;
    total += block;
  }
  for (; i < count; ++i) {
    const double x = static_cast<double>(grad[i] * scale);
    total += x * x;
  }
  return std::isfinite(total) ? total : sq_norm_chunk_f64(grad, count, scale);
}

// Non-finite test on the exponent bits (all ones = Inf or NaN): an integer OR-reduction
// vectorizes without fast-math, unlike a floating-point isfinite fold.
PBM_CLONES unsigned unscale_chunk(float* __restrict grad, size_t count, float scale) {
  unsigned bad = 0;
  for (size_t i = 0; i < count; ++i) {
    const float x = grad[i] * scale;
    grad[i] = x;
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bad |= static_cast<unsigned>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad;
}

PBM_CLONES unsigned unscale_chunk_f64(double* __restrict grad, size_t count, double scale) {
  unsigned bad = 0;
  for (size_t i = 0; i < count; ++i) {
    const double x = grad[i] * scale;
    grad[i] = x;
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bad |= static_cast<unsigned>((bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
  }
  return bad;
}

// ---- SGD ---------------------------------------------------------------------------------

struct SgdScalars {
  float lr, momentum, one_minus_dampening, weight_decay, grad_scale;
  bool with_momentum, first, nesterov;  // which sgd_loop runs
};

// torch.optim.SGD, single-tensor path:
//   g = grad (negated for maximize); g = g + wd * p
//   buf = g (first step) | buf * momentum + (1 - dampening) * g
//   g = g + momentum * buf (nesterov) | buf;  p = p - lr * g
template <bool kMomentum, bool kFirst, bool kNesterov>
PBM_INLINE void sgd_loop(float* __restrict param, const float* __restrict grad,
                         float* __restrict buffer, size_t count, const SgdScalars& s) {
  for (size_t i = 0; i < count; ++i) {
    const float p = param[i];
    float g = grad[i] * s.grad_scale;
    g = g + s.weight_decay * p;
    if constexpr (kMomentum) {
      const float b = kFirst ? g : buffer[i] * s.momentum + s.one_minus_dampening * g;
      buffer[i] = b;
      g = kNesterov ? g + s.momentum * b : b;
    }
    param[i] = p + (-s.lr) * g;
  }
}

PBM_CLONES void sgd_chunk(float* param, const float* grad, float* buffer, size_t count, const SgdScalars& s) {
  const bool first = s.first;
  const bool nesterov = s.nesterov;
  if (!s.with_momentum) return sgd_loop<false, false, false>(param, grad, buffer, count, s);
  if (first) {
    if (nesterov) return sgd_loop<true, true, true>(param, grad, buffer, count, s);
    return sgd_loop<true, true, false>(param, grad, buffer, count, s);
  }
  if (nesterov) return sgd_loop<true, false, true>(param, grad, buffer, count, s);
  return sgd_loop<true, false, false>(param, grad, buffer, count, s);
}

// ---- Adam / AdamW ------------------------------------------------------------------------

struct AdamScalars {
  float lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size,
      bias_correction2_sqrt, grad_scale;
  bool amsgrad, decoupled;  // which adam_loop runs
};

// torch.optim.Adam/AdamW, single-tensor path:
//   AdamW: p = p * (1 - lr * wd)          Adam: g = g + wd * p
//   m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g
//   vmax = max(vmax, v) (amsgrad);  denom = sqrt(v or vmax) / sqrt(bc2) + eps
//   p = p - (lr / bc1) * m / denom
// lerp is written the way torch evaluates it, which depends on whether the weight is < 0.5.
template <bool kAmsgrad, bool kDecoupled, bool kLowWeight>
PBM_INLINE void adam_loop(float* __restrict param, const float* __restrict grad,
                          float* __restrict exp_avg, float* __restrict exp_avg_sq,
                          float* __restrict max_exp_avg_sq, size_t count, const AdamScalars& s) {
  for (size_t i = 0; i < count; ++i) {
    float p = param[i];
    float g = grad[i] * s.grad_scale;
    if constexpr (kDecoupled) {
      p = p * s.decay_factor;
    } else {
      g = g + s.weight_decay * p;
    }
    const float m_old = exp_avg[i];
    const float m = kLowWeight ? m_old + s.lerp_weight * (g - m_old)
                               : g - (g - m_old) * (1.0f - s.lerp_weight);
    const float v = exp_avg_sq[i] * s.beta2 + s.one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    float second = v;
    if constexpr (kAmsgrad) {
      const float vmax = max_exp_avg_sq[i] > v ? max_exp_avg_sq[i] : v;
      max_exp_avg_sq[i] = vmax;
      second = vmax;
    }
    const float denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
    param[i] = p + (-s.step_size) * (m / denom);
  }
}

PBM_CLONES void adam_chunk(float* param, const float* grad, const AdamMoments& m, size_t count,
                           const AdamScalars& s) {
  float* exp_avg = m.exp_avg;
  float* exp_avg_sq = m.exp_avg_sq;
  float* max_exp_avg_sq = m.max_exp_avg_sq;
  const bool amsgrad = s.amsgrad;
  const bool decoupled = s.decoupled;
  const bool low = s.lerp_weight < 0.5f;
#define PBM_ADAM(A, D, L) \
  if (amsgrad == A && decoupled == D && low == L) \
    return adam_loop<A, D, L>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, count, s);
  PBM_ADAM(false, false, true) PBM_ADAM(false, true, true) PBM_ADAM(true, false, true)
  PBM_ADAM(true, true, true) PBM_ADAM(false, false, false) PBM_ADAM(false, true, false)
  PBM_ADAM(true, false, false) PBM_ADAM(true, true, false)
#undef PBM_ADAM
}

// ---- Adagrad -----------------------------------------------------------------------------

struct AdagradScalars {
  float clr, weight_decay, eps, grad_scale;
};

// torch.optim.Adagrad, single-tensor path:
//   g = g + wd * p;  sum = sum + g * g;  p = p - clr * g / (sqrt(sum) + eps)
//   with clr = lr / (1 + (step - 1) * lr_decay)
PBM_CLONES void adagrad_chunk(float* __restrict param, const float* __restrict grad,
                              float* __restrict state_sum, size_t count, const AdagradScalars& s) {
  for (size_t i = 0; i < count; ++i) {
    const float p = param[i];
    float g = grad[i] * s.grad_scale;
    g = g + s.weight_decay * p;
    const float sum = state_sum[i] + g * g;
    state_sum[i] = sum;
    const float std_dev = std::sqrt(sum) + s.eps;
    param[i] = p + (-s.clr) * (g / std_dev);
  }
}

}  // namespace detail

// ---- entry points: split across threads --------------------------------------------------

GradStats grad_sq_norm_and_finite(const float* grad, size_t count, float scale, int num_threads) {
  std::vector<double> partial(static_cast<size_t>(std::max(num_threads, 1)), 0.0);
  const int parts = parallel_for(count, num_threads, [&](size_t begin, size_t end, int part) {
    partial[part] = detail::sq_norm_chunk(grad + begin, end - begin, scale);
  });
  double total = 0;  // summed in part order: deterministic for a given thread count
  for (int part = 0; part < parts; ++part) total += partial[part];
  return GradStats{total, std::isfinite(total)};
}

bool unscale_and_check(float* grad, size_t count, float scale, int num_threads) {
  std::vector<unsigned> bad(static_cast<size_t>(std::max(num_threads, 1)), 0u);
  const int parts = parallel_for(count, num_threads, [&](size_t begin, size_t end, int part) {
    bad[part] = detail::unscale_chunk(grad + begin, end - begin, scale);
  });
  for (int part = 0; part < parts; ++part)
    if (bad[part]) return false;
  return true;
}

bool unscale_and_check(double* grad, size_t count, double scale, int num_threads) {
  std::vector<unsigned> bad(static_cast<size_t>(std::max(num_threads, 1)), 0u);
  const int parts = parallel_for(count, num_threads, [&](size_t begin, size_t end, int part) {
    bad[part] = detail::unscale_chunk_f64(grad + begin, end - begin, scale);
  });
  for (int part = 0; part < parts; ++part)
    if (bad[part]) return false;
  return true;
}

void sgd_step(float* param, const float* grad, float* momentum_buffer, size_t count,
              const SgdParams& p, int num_threads) {
  const detail::SgdScalars s{static_cast<float>(p.lr), static_cast<float>(p.momentum),
                             static_cast<float>(1.0 - p.dampening),
                             static_cast<float>(p.weight_decay), p.grad_scale,
                             p.momentum != 0.0, !p.momentum_initialized, p.nesterov};
  parallel_for(count, num_threads, [&](size_t begin, size_t end, int) {
    detail::sgd_chunk(param + begin, grad + begin, s.with_momentum ? momentum_buffer + begin : nullptr,
                      end - begin, s);
  });
}

void adam_step(float* param, const float* grad, const AdamMoments& moments, size_t count, const AdamParams& p,
               int num_threads) {
  const double bias_correction1 = 1.0 - std::pow(p.beta1, p.step);
  const double bias_correction2 = 1.0 - std::pow(p.beta2, p.step);
  const detail::AdamScalars s{
      static_cast<float>(1.0 - p.beta1),        static_cast<float>(p.beta2),
      static_cast<float>(1.0 - p.beta2),        static_cast<float>(p.eps),
      static_cast<float>(p.weight_decay),       static_cast<float>(1.0 - p.lr * p.weight_decay),
      static_cast<float>(p.lr / bias_correction1), static_cast<float>(std::sqrt(bias_correction2)),
      p.grad_scale,
      p.amsgrad,
      p.decoupled_weight_decay};
  parallel_for(count, num_threads, [&](size_t begin, size_t end, int) {
    const AdamMoments chunk{moments.exp_avg + begin, moments.exp_avg_sq + begin,
                            p.amsgrad ? moments.max_exp_avg_sq + begin : nullptr};
    detail::adam_chunk(param + begin, grad + begin, chunk, end - begin, s);
  });
}

void adagrad_step(float* param, const float* grad, float* state_sum, size_t count,
                  const AdagradParams& p, int num_threads) {
  const detail::AdagradScalars s{
      static_cast<float>(p.lr / (1.0 + (p.step - 1.0) * p.lr_decay)),
      static_cast<float>(p.weight_decay), static_cast<float>(p.eps), p.grad_scale};
  parallel_for(count, num_threads, [&](size_t begin, size_t end, int) {
    detail::adagrad_chunk(param + begin, grad + begin, state_sum + begin, end - begin, s);
  });
}

}  // namespace pbm
