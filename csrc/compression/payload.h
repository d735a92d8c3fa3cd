// Self-describing payloads of the compression codecs: a 32-byte header, then the body.
//
// The Python API (pybrain_mpi.compression) hands these out; the engine's compressed
// allreduce sends bare bodies (threelc.h) because both sides already know count and dtype.
//
// Header, little-endian:
//   offset  size  field
//        0     4  magic "PBMC"
//        4     1  version (kPayloadVersion)
//        5     1  codec (PayloadCodec)
//        6     1  dtype code of the tensor that was encoded (common/dtype.h)
//        7     1  wire dtype code of the body elements (raw and cast), 0 for 3LC
//        8     8  element count
//       16     4  scale M (float32; ThreeLC only, else 0), or for ThreeLCBlock the block
//                 size B (uint32; the body starts with the ceil(count / B) scales)
//       20     4  checksum of the header (with this field zeroed) and the body
//       24     8  body length in bytes
// Decoding validates every field and the checksum, so a truncated, corrupted or
// mismatched payload raises PbmError instead of producing a wrong gradient.
// Version 2 added the ThreeLCBlock codec; a version-1 reader refuses version-2 payloads
// (and this build refuses version 1) with a message naming both versions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"

namespace pbm {

constexpr size_t kPayloadHeaderBytes = 32;
constexpr uint8_t kPayloadVersion = 2;

// kThreeLCBlock: 3LC with one scale per block of B elements (threelc.h, block scaling).
enum class PayloadCodec : uint8_t { kRaw = 0, kThreeLC = 1, kCast = 2, kThreeLCBlock = 3 };

struct PayloadHeader {
  PayloadCodec codec = PayloadCodec::kRaw;
  DType dtype = DType::kFloat32;
  DType wire_dtype = DType::kFloat32;
  uint64_t count = 0;
  float scale = 0.f;
  uint32_t block = 0;  // ThreeLCBlock: B
  uint64_t body_bytes = 0;
};

// Largest payload (header included) that encoding `count` elements of `dtype` can produce
// (`block`: B of ThreeLCBlock).
size_t payload_max_bytes(PayloadCodec codec, size_t count, DType dtype, DType wire_dtype, uint32_t block = 0);

// Each writes a complete payload into `out` (capacity bytes) and returns its length.
// threelc_encode_payload writes ThreeLC (block == 0) or ThreeLCBlock (block = B > 0).
size_t threelc_encode_payload(const Elements& grad, float* residual, float sparsity, uint8_t* out,
                              size_t capacity, const char* name, uint32_t block = 0);
size_t cast_encode_payload(const Elements& in, DType wire_dtype, uint8_t* out, size_t capacity,
                           const char* name);
size_t raw_encode_payload(const Elements& in, uint8_t* out, size_t capacity, const char* name);

// Parses and validates a payload of `bytes` bytes (header, length, checksum).
PayloadHeader read_payload_header(const uint8_t* in, size_t bytes, const char* name);

// Decodes a payload of `bytes` bytes into `out`, overwriting it or, with `add`, adding to
// it. The element count must match the payload's.
void decode_payload(const uint8_t* in, size_t bytes, const MutableElements& out, bool add, const char* name);

}  // namespace pbm
