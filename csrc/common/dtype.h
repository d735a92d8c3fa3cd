// Element types the native core understands, and the one dtype dispatch of the project.
//
// The core never sees framework types: Python maps torch/numpy dtypes to DType once
// (pybrain_mpi/core/buffers.py, with the enum bindings.cpp exports) and hands over
// pointer + count + DType.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "errors.h"

namespace pbm {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt32 = 4,
  kInt64 = 5,
};

enum class ReduceOp : int32_t { kSum = 0, kAvg = 1, kMin = 2, kMax = 3 };

// `count` elements of `dtype` at `data`: how a buffer crosses the core's own interfaces
// (read, or written in place).
struct Elements {
  const void* data = nullptr;
  size_t count = 0;
  DType dtype = DType::kFloat32;
};
struct MutableElements {
  void* data = nullptr;
  size_t count = 0;
  DType dtype = DType::kFloat32;
};

inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  throw PbmError("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

inline const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kMax: return "max";
  }
  return "unknown";
}

inline bool is_half_precision(DType dtype) {
  return dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

inline bool is_integer(DType dtype) { return dtype == DType::kInt32 || dtype == DType::kInt64; }

// Calls fn(T{}) with the C++ type of a dtype that the reduction loops handle directly.
// 16-bit floats are widened to float32 by the caller first (they accumulate in float32).
template <typename Fn>
decltype(auto) dispatch_wide_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kInt32: return fn(int32_t{});
    case DType::kInt64: return fn(int64_t{});
    default: break;
  }
  throw PbmError(std::string("dtype ") + dtype_name(dtype) + " must be widened to float32 before reduction");
}

// Bit casts between float32 and its IEEE bits (memcpy: the defined way in C++17).
inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

// IEEE binary16 <-> binary32, round to nearest even, subnormals and Inf/NaN preserved.
//
// half -> float without branches, so loops over it vectorize: shift exponent and mantissa
// into place and rebias; Inf/NaN get a second rebias to the all-ones exponent, and
// zero/subnormal halves are renormalised by one float subtraction
// (2^-14 * (1 + m/1024) - 2^-14 = m * 2^-24).
inline float half_to_float(uint16_t h) {
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exponent = shifted & 0x0f800000u;
  const uint32_t rebased = shifted + (112u << 23);
  const uint32_t special = exponent == 0x0f800000u ? rebased + (112u << 23) : rebased;
  const float subnormal = bits_to_float(rebased + (1u << 23)) - bits_to_float(113u << 23);
  const uint32_t magnitude = exponent == 0 ? float_to_bits(subnormal) : special;
  return bits_to_float(magnitude | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

inline uint16_t float_to_half(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // Inf or NaN (keep NaN quiet)
    return sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504: overflow to Inf
  if (abs_bits < 0x38800000u) {                        // result is subnormal or zero
    if (abs_bits < 0x33000000u) return sign;            // below half of the smallest subnormal
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    // value = mantissa * 2^(exponent-150); in half-subnormal units of 2^-24 that is
    // mantissa >> (126 - exponent), a shift of 14..24 bits here.
    const uint32_t total_shift = 126 - exponent;
    uint32_t half_mantissa = mantissa >> total_shift;
    const uint32_t remainder = mantissa & ((1u << total_shift) - 1);
    const uint32_t halfway = 1u << (total_shift - 1);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return sign | static_cast<uint16_t>(half_mantissa);
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even)
  uint32_t rebased = abs_bits - (112u << 23);
  const uint32_t remainder = rebased & 0x1fffu;
  rebased >>= 13;
  if (remainder > 0x1000u || (remainder == 0x1000u && (rebased & 1u))) ++rebased;
  return sign | static_cast<uint16_t>(rebased);
}

inline float bf16_to_float(uint16_t b) {
  return bits_to_float(static_cast<uint32_t>(b) << 16);
}

inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

}  // namespace pbm
