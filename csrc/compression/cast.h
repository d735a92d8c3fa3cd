// Precision casting codec: the plain baseline next to 3LC (float32 -> bfloat16 or float16
// on the wire, 2x smaller, no error feedback).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"

namespace pbm {

// Writes the elements of `in` (float32, bfloat16 or float16) as `wire_dtype` (bfloat16 or
// float16, round to nearest even) into `out`. Throws PbmError naming `name` if an input is
// NaN/Inf or a value overflows the wire type (float16 above 65504), so a cast never
// silently poisons a model.
void cast_encode(const Elements& in, DType wire_dtype, uint16_t* out, const char* name = nullptr);

// out[i] = in[i] (or out[i] += in[i] with `add`) converting out.count `wire_dtype` elements
// to out.dtype (float32, bfloat16 or float16; 16-bit outputs add in float32).
void cast_decode(const uint16_t* in, DType wire_dtype, const MutableElements& out, bool add,
                 const char* name = nullptr);

}  // namespace pbm
