// Precision casting codec (cast.h).
#include "cast.h"

#include <cmath>
#include <string>

#include "../common/errors.h"
#include "element_io.h"

namespace pbm {
namespace {

std::string label(const char* name) {
  return name && *name ? std::string("tensor '") + name + "'" : std::string("tensor");
}

// The all-ones exponent of the wire type marks Inf/NaN.
uint16_t special_exponent(DType wire) { return wire == DType::kBFloat16 ? 0x7f80u : 0x7c00u; }

template <class In, class Wire>
size_t cast_loop(const typename In::T* __restrict in, size_t count, uint16_t* __restrict out,
                 uint16_t special) {
  // Remember only whether something went wrong; the slow search for where runs after.
  uint16_t bad = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint16_t value = Wire::store(In::load(in[i]));
    out[i] = value;
    bad |= static_cast<uint16_t>((value & special) == special);
  }
  if (!bad) return count;
  for (size_t i = 0; i < count; ++i) {
    if ((out[i] & special) == special) return i;
  }
  return count;
}

}  // namespace

void cast_encode(const Elements& elements, DType wire_dtype, uint16_t* out, const char* name) {
  const void* in = elements.data;
  const DType in_dtype = elements.dtype;
  const size_t count = elements.count;
  if (!is_half_precision(wire_dtype)) {
    throw PbmError("cast encode of " + label(name) + ": wire dtype " + dtype_name(wire_dtype) +
                   " is not bfloat16 or float16");
  }
  if (count == 0) return;
  const uint16_t special = special_exponent(wire_dtype);
  const size_t bad = element_io::dispatch_float_io(in_dtype, "cast encode", [&](auto in_io) {
    using In = decltype(in_io);
    const auto* src = static_cast<const typename In::T*>(in);
    if (wire_dtype == DType::kBFloat16) return cast_loop<In, element_io::BFloat16>(src, count, out, special);
    return cast_loop<In, element_io::Float16>(src, count, out, special);
  });
  if (bad == count) return;
  const float value = element_io::dispatch_float_io(in_dtype, "cast encode", [&](auto in_io) {
    using In = decltype(in_io);
    return In::load(static_cast<const typename In::T*>(in)[bad]);
  });
  throw PbmError("cast encode of " + label(name) + " to " + dtype_name(wire_dtype) + ": element " +
                 std::to_string(bad) + " is " + std::to_string(value) +
                 (std::isfinite(value) ? std::string(", which overflows ") + dtype_name(wire_dtype) +
                                             " (use Cast('bf16'), whose range is float32's, or "
                                             "scale the gradients down)"
                                       : std::string(" (a NaN/Inf gradient usually means the "
                                                     "loss diverged)")));
}

void cast_decode(const uint16_t* in, DType wire_dtype, const MutableElements& elements, bool add,
                 const char* name) {
  void* out = elements.data;
  const DType out_dtype = elements.dtype;
  const size_t count = elements.count;
  if (!is_half_precision(wire_dtype)) {
    throw PbmError("cast decode of " + label(name) + ": wire dtype " + dtype_name(wire_dtype) +
                   " is not bfloat16 or float16");
  }
  element_io::dispatch_float_io(wire_dtype, "cast decode", [&](auto wire_io) {
    using Wire = decltype(wire_io);
    element_io::dispatch_float_io(out_dtype, "cast decode", [&](auto out_io) {
      using Out = decltype(out_io);
      auto* dst = static_cast<typename Out::T*>(out);
      if (add) {
        for (size_t i = 0; i < count; ++i) dst[i] = Out::store(Out::load(dst[i]) + Wire::load(in[i]));
      } else {
        for (size_t i = 0; i < count; ++i) dst[i] = Out::store(Wire::load(in[i]));
      }
    });
  });
}

}  // namespace pbm
