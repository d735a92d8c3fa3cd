// Branch-free element loads and stores shared by the codecs (csrc/compression/*).
//
// The codecs compute in float32. These adapters widen float32/bfloat16/float16 inputs and
// narrow into the output dtype with common/dtype.h's converters (branch-free on the widening
// side, so the loops vectorize).
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/dtype.h"
#include "../common/errors.h"

#if defined(__GNUC__)
#define PBM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PBM_ALWAYS_INLINE inline
#endif

// Hot loops are compiled twice (AVX2 and baseline x86-64) and picked at load time, so a
// default build (no -march=native) still uses the wide vectors of the machine it runs on.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define PBM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PBM_MULTIVERSION
#endif

namespace pbm {
namespace element_io {

struct Float32 {
  using T = float;
  static constexpr DType kDType = DType::kFloat32;
  static PBM_ALWAYS_INLINE float load(float v) { return v; }
  static PBM_ALWAYS_INLINE float store(float v) { return v; }
};

struct BFloat16 {
  using T = uint16_t;
  static constexpr DType kDType = DType::kBFloat16;
  static PBM_ALWAYS_INLINE float load(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  static inline uint16_t store(float v) { return float_to_bf16(v); }
};

struct Float16 {
  using T = uint16_t;
  static constexpr DType kDType = DType::kFloat16;
  static PBM_ALWAYS_INLINE float load(uint16_t v) { return half_to_float(v); }
  static inline uint16_t store(float v) { return float_to_half(v); }
};

// Calls fn(Float32{} | BFloat16{} | Float16{}) for the dtype; other dtypes throw PbmError
// with `what` in the message.
template <typename Fn>
decltype(auto) dispatch_float_io(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(Float32{});
    case DType::kBFloat16: return fn(BFloat16{});
    case DType::kFloat16: return fn(Float16{});
    default: break;
  }
  throw PbmError(std::string(what) + " supports float32, bfloat16 and float16, not " + dtype_name(dtype));
}

}  // namespace element_io
}  // namespace pbm
