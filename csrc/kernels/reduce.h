// Element-wise reduction and widening loops used by every collective.
//
// The op is switched outside the loops so each loop body is a plain, branch-free
// expression the compiler vectorizes (checked with -fopt-info-vec at -O3).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/dtype.h"

namespace pbm {

// Integer sums wrap around like MPI's and torch's do; doing the add in the unsigned
// type keeps that defined behaviour in C++.
template <typename T>
inline T wrapping_add(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}

// dst[i] = op(dst[i], src[i]). kAvg reduces as a sum; the caller divides once at the end.
template <typename T>
void reduce_into(T* __restrict dst, const T* __restrict src, size_t count, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      for (size_t i = 0; i < count; ++i) dst[i] = wrapping_add(dst[i], src[i]);
      break;
    case ReduceOp::kMin:
      for (size_t i = 0; i < count; ++i) dst[i] = src[i] < dst[i] ? src[i] : dst[i];
      break;
    case ReduceOp::kMax:
      for (size_t i = 0; i < count; ++i) dst[i] = src[i] > dst[i] ? src[i] : dst[i];
      break;
  }
}

// 16-bit floats reduced in their own format (16-bit wire): each element is widened, combined
// in float32 and rounded once.
inline void reduce_half_into(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t count,
                             DType dtype, ReduceOp op) {
  const bool bf16 = dtype == DType::kBFloat16;
  for (size_t i = 0; i < count; ++i) {
    const float a = bf16 ? bf16_to_float(dst[i]) : half_to_float(dst[i]);
    const float b = bf16 ? bf16_to_float(src[i]) : half_to_float(src[i]);
    float r;
    switch (op) {
      case ReduceOp::kMin: r = b < a ? b : a; break;
      case ReduceOp::kMax: r = b > a ? b : a; break;
      default: r = a + b; break;
    }
    dst[i] = bf16 ? float_to_bf16(r) : float_to_half(r);
  }
}

inline void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op) {
  if (is_half_precision(dtype)) {
    reduce_half_into(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), count, dtype, op);
    return;
  }
  dispatch_wide_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    reduce_into(static_cast<T*>(dst), static_cast<const T*>(src), count, op);
  });
}

// Whether m floats are all finite: Inf and NaN have every exponent bit set. Integer compare
// and OR vectorize without -ffast-math (a float accumulation would not).
template <typename T>
inline bool block_finite(const T* x, size_t m) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U mask = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bad = 0;
  for (size_t i = 0; i < m; ++i) {
    U bits;
    std::memcpy(&bits, x + i, sizeof(U));
    bad |= U((bits & mask) == mask);
  }
  return bad == 0;
}

// Whether every element of a buffer is finite (integers always are): one read pass, for
// check_finite collectives whose algorithm cannot check inside its own reduce.
inline bool all_finite(const void* data, size_t count, DType dtype) {
  if (dtype == DType::kFloat32 || dtype == DType::kFloat64) {
    bool ok = true;
    dispatch_wide_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_floating_point_v<T>) {
        const T* x = static_cast<const T*>(data);
        constexpr size_t kBlock = 4096;
        for (size_t b = 0; b < count && ok; b += kBlock) ok = block_finite(x + b, std::min(kBlock, count - b));
      }
    });
    return ok;
  }
  if (is_half_precision(dtype)) {
    // Inf/NaN in binary16 and bfloat16: all exponent bits set.
    const uint16_t mask = dtype == DType::kBFloat16 ? 0x7f80 : 0x7c00;
    const uint16_t* x = static_cast<const uint16_t*>(data);
    for (size_t i = 0; i < count; ++i)
      if ((x[i] & mask) == mask) return false;
    return true;
  }
  return true;
}

// dst[i] = (acc[i] + last[i]) / div (kDivide) for one L1 block; with kCheck also whether every
// result is finite (Inf and NaN have every exponent bit set; an integer compare and OR
// vectorize without -ffast-math, a float accumulation would not).
template <bool kDivide, bool kCheck, typename T>
inline bool add_store(T* __restrict dst, const T* __restrict acc, const T* __restrict last, size_t m,
                      T div) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U mask = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bad = 0;
  for (size_t i = 0; i < m; ++i) {
    T v = acc[i] + last[i];
    if constexpr (kDivide) v /= div;
    if constexpr (kCheck) {
      U bits;
      std::memcpy(&bits, &v, sizeof(U));
      bad |= U((bits & mask) == mask);
    }
    dst[i] = v;
  }
  return bad == 0;
}

// What reduce_n combines: out[i] = op(in[0][i], in[1][i], ..., in[n-1][i]), in input order,
// then divided by `divisor` (kAvg; 1 leaves it). `extra_out[0..n_extra)` receive further
// copies of the result (the shared arena, or peers' buffers in the zero-copy node stage),
// stored from the same L1 block.
struct ReduceInputs {
  const void* const* in = nullptr;
  int n = 0;
  ReduceOp op = ReduceOp::kSum;
  double divisor = 1.0;
  void* const* extra_out = nullptr;
  int n_extra = 0;
};

// One pass over the n inputs and the output: blocks are accumulated in an L1-resident
// buffer, so `out` may be one of the inputs (the shared-memory node stage reduces in
// place). Integers wrap like reduce_into. `finite`, when not null, is cleared if any float
// result is Inf/NaN (checked on the L1 block, so it costs no memory traffic).
template <typename T>
void reduce_n_wide(T* out, size_t count, const ReduceInputs& r, bool* finite) {
  constexpr size_t kBlock = 2048;
  alignas(64) T acc[kBlock];
  const T* const* in = reinterpret_cast<const T* const*>(r.in);
  T* const* extra_out = reinterpret_cast<T* const*>(r.extra_out);
  const int n = r.n;
  const int n_extra = r.n_extra;
  const ReduceOp op = r.op;
  const double divisor = r.divisor;
  for (size_t b = 0; b < count; b += kBlock) {
    const size_t m = std::min(kBlock, count - b);
    const T* first = in[0] + b;
    T* dst = out + b;
    if constexpr (std::is_floating_point_v<T>) {
      if (n > 1 && (op == ReduceOp::kSum || op == ReduceOp::kAvg)) {
        // Float sums: the last input's pass adds, divides, checks (when asked) and stores
        // straight into `out`. That loop waits on memory for its input, so the exponent
        // compare rides along instead of costing a pass of its own over the block.
        for (size_t i = 0; i < m; ++i) acc[i] = first[i];
        for (int q = 1; q + 1 < n; ++q) reduce_into(acc, in[q] + b, m, op);
        const T* last = in[n - 1] + b;
        const bool ok = divisor != 1.0
            ? (finite ? add_store<true, true>(dst, acc, last, m, static_cast<T>(divisor))
                      : add_store<true, false>(dst, acc, last, m, static_cast<T>(divisor)))
            : (finite ? add_store<false, true>(dst, acc, last, m, T(1))
                      : add_store<false, false>(dst, acc, last, m, T(1)));
        if (!ok) *finite = false;
        for (int e = 0; e < n_extra; ++e) std::memcpy(extra_out[e] + b, dst, m * sizeof(T));
        continue;
      }
    }
    for (size_t i = 0; i < m; ++i) acc[i] = first[i];
    for (int q = 1; q < n; ++q) reduce_into(acc, in[q] + b, m, op);
    if (divisor != 1.0) {
      if constexpr (std::is_same_v<T, float>) {
        const float div = static_cast<float>(divisor);
        for (size_t i = 0; i < m; ++i) acc[i] /= div;
      } else if constexpr (std::is_same_v<T, double>) {
        for (size_t i = 0; i < m; ++i) acc[i] /= divisor;
      }
    }
    if constexpr (std::is_floating_point_v<T>) {
      if (finite && !block_finite(acc, m)) *finite = false;
    }
    for (size_t i = 0; i < m; ++i) dst[i] = acc[i];
    for (int e = 0; e < n_extra; ++e) std::memcpy(extra_out[e] + b, acc, m * sizeof(T));
  }
}

// The 16-bit float version: widened, combined in float32 and rounded once per element.
inline void reduce_n_half(uint16_t* out, size_t count, DType dtype, const ReduceInputs& r) {
  constexpr size_t kBlock = 2048;
  alignas(64) float acc[kBlock];
  alignas(64) float wide[kBlock];
  const uint16_t* const* in = reinterpret_cast<const uint16_t* const*>(r.in);
  uint16_t* const* extra_out = reinterpret_cast<uint16_t* const*>(r.extra_out);
  const bool bf16 = dtype == DType::kBFloat16;
  auto widen = [bf16](const uint16_t* src, float* dst, size_t m) {
    if (bf16) {
      for (size_t i = 0; i < m; ++i) dst[i] = bf16_to_float(src[i]);
    } else {
      for (size_t i = 0; i < m; ++i) dst[i] = half_to_float(src[i]);
    }
  };
  for (size_t b = 0; b < count; b += kBlock) {
    const size_t m = std::min(kBlock, count - b);
    widen(in[0] + b, acc, m);
    for (int q = 1; q < r.n; ++q) {
      widen(in[q] + b, wide, m);
      reduce_into(acc, wide, m, r.op);
    }
    if (r.divisor != 1.0) {
      const float div = static_cast<float>(r.divisor);
      for (size_t i = 0; i < m; ++i) acc[i] /= div;
    }
    uint16_t* dst = out + b;
    if (bf16) {
      for (size_t i = 0; i < m; ++i) dst[i] = float_to_bf16(acc[i]);
    } else {
      for (size_t i = 0; i < m; ++i) dst[i] = float_to_half(acc[i]);
    }
    for (int e = 0; e < r.n_extra; ++e) std::memcpy(extra_out[e] + b, dst, m * sizeof(uint16_t));
  }
}

// `finite` is honoured for float32/float64 only; callers scan 16-bit results (all_finite).
inline void reduce_n(void* out, size_t count, DType dtype, const ReduceInputs& r, bool* finite = nullptr) {
  if (is_half_precision(dtype)) {
    reduce_n_half(static_cast<uint16_t*>(out), count, dtype, r);
    return;
  }
  dispatch_wide_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    reduce_n_wide(static_cast<T*>(out), count, r, finite);
  });
}

// data[i] /= divisor for floating types (the kAvg finish). Integers are rejected earlier.
inline void divide_in_place(void* data, size_t count, DType dtype, double divisor) {
  if (dtype == DType::kFloat64) {
    auto* d = static_cast<double*>(data);
    for (size_t i = 0; i < count; ++i) d[i] /= divisor;
  } else if (dtype == DType::kFloat32) {
    auto* f = static_cast<float*>(data);
    const float div = static_cast<float>(divisor);
    for (size_t i = 0; i < count; ++i) f[i] /= div;
  } else if (is_half_precision(dtype)) {
    auto* h = static_cast<uint16_t*>(data);
    const float div = static_cast<float>(divisor);
    const bool bf16 = dtype == DType::kBFloat16;
    for (size_t i = 0; i < count; ++i) {
      const float v = (bf16 ? bf16_to_float(h[i]) : half_to_float(h[i])) / div;
      h[i] = bf16 ? float_to_bf16(v) : float_to_half(v);
    }
  }
}

// 16-bit floats accumulate in float32: widen before the collective, narrow after.
inline void widen_to_float32(const uint16_t* src, float* dst, size_t count, DType dtype) {
  if (dtype == DType::kBFloat16) {
    for (size_t i = 0; i < count; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
    for (size_t i = 0; i < count; ++i) dst[i] = half_to_float(src[i]);
  }
}

inline void narrow_from_float32(const float* src, uint16_t* dst, size_t count, DType dtype) {
  if (dtype == DType::kBFloat16) {
    for (size_t i = 0; i < count; ++i) dst[i] = float_to_bf16(src[i]);
  } else {
    for (size_t i = 0; i < count; ++i) dst[i] = float_to_half(src[i]);
  }
}

}  // namespace pbm
