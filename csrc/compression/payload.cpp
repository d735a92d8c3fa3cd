// Payload header, checksum and per-codec dispatch (payload.h).
#include "payload.h"

#include <cfloat>
#include <cstring>
#include <string>

#include "../common/errors.h"
#include "cast.h"
#include "element_io.h"
#include "threelc.h"

namespace pbm {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the payload header is little-endian");

constexpr char kMagic[4] = {'P', 'B', 'M', 'C'};
constexpr size_t kChecksumOffset = 20;

std::string label(const char* name) {
  return name && *name ? std::string("tensor '") + name + "'" : std::string("tensor");
}

const char* codec_name(PayloadCodec codec) {
  switch (codec) {
    case PayloadCodec::kRaw: return "NoCompression";
    case PayloadCodec::kThreeLC: return "ThreeLC";
    case PayloadCodec::kCast: return "Cast";
    case PayloadCodec::kThreeLCBlock: return "ThreeLCBlock";
  }
  return "unknown";
}

// 64-bit multiply-xorshift over 8-byte words. Every step is a bijection of the state, so
// changing any single word (a flipped bit, a truncated or overwritten region) always
// changes the result; not cryptographic, only a guard against accidents.
uint64_t mix(uint64_t h, uint64_t word) {
  h = (h ^ word) * 0x9e3779b97f4a7c15ull;
  return h ^ (h >> 31);
}

uint64_t hash_bytes(uint64_t h, const uint8_t* data, size_t bytes) {
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, data + i, 8);
    h = mix(h, word);
  }
  uint64_t tail = 0;
  std::memcpy(&tail, data + i, bytes - i);
  return mix(mix(h, tail), bytes);
}

uint32_t payload_checksum(const uint8_t* header, const uint8_t* body, size_t body_bytes) {
  uint8_t zeroed[kPayloadHeaderBytes];
  std::memcpy(zeroed, header, kPayloadHeaderBytes);
  std::memset(zeroed + kChecksumOffset, 0, 4);
  const uint64_t h = hash_bytes(hash_bytes(0x243f6a8885a308d3ull, zeroed, kPayloadHeaderBytes),
                                body, body_bytes);
  return static_cast<uint32_t>(h ^ (h >> 32));
}

template <typename T>
void put(uint8_t* at, T value) {
  std::memcpy(at, &value, sizeof(T));
}

template <typename T>
T get(const uint8_t* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}

// Fills in the header in front of a body already written at out + kPayloadHeaderBytes.
size_t finish_payload(uint8_t* out, const PayloadHeader& header) {
  std::memcpy(out, kMagic, 4);
  out[4] = kPayloadVersion;
  out[5] = static_cast<uint8_t>(header.codec);
  out[6] = static_cast<uint8_t>(header.dtype);
  out[7] = static_cast<uint8_t>(header.wire_dtype);
  put<uint64_t>(out + 8, header.count);
  if (header.codec == PayloadCodec::kThreeLCBlock) {
    put<uint32_t>(out + 16, header.block);
  } else {
    put<float>(out + 16, header.scale);
  }
  put<uint32_t>(out + 20, 0);
  put<uint64_t>(out + 24, header.body_bytes);
  put<uint32_t>(out + 20, payload_checksum(out, out + kPayloadHeaderBytes, header.body_bytes));
  return kPayloadHeaderBytes + header.body_bytes;
}

void check_capacity(PayloadCodec codec, size_t count, DType dtype, DType wire, size_t capacity,
                    const char* name, uint32_t block = 0) {
  const size_t need = payload_max_bytes(codec, count, dtype, wire, block);
  if (capacity < need) {
    throw PbmError(std::string(codec_name(codec)) + " encode of " + label(name) + ": output buffer has " +
                   std::to_string(capacity) + " bytes, " + std::to_string(need) + " needed");
  }
}

bool is_float_dtype(int code) {
  return code == static_cast<int>(DType::kFloat32) || code == static_cast<int>(DType::kFloat64) ||
         code == static_cast<int>(DType::kFloat16) || code == static_cast<int>(DType::kBFloat16);
}

[[noreturn]] void bad_payload(const char* name, const std::string& what) {
  throw PbmError("cannot decode the payload for " + label(name) + ": " + what);
}

// Loads element i of a raw body as double (exact for every float dtype).
double load_raw(const uint8_t* body, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kFloat32: return get<float>(body + 4 * i);
    case DType::kFloat64: return get<double>(body + 8 * i);
    case DType::kFloat16: return half_to_float(get<uint16_t>(body + 2 * i));
    case DType::kBFloat16: return element_io::BFloat16::load(get<uint16_t>(body + 2 * i));
    default: return 0.0;
  }
}

void decode_raw(const uint8_t* body, DType body_dtype, const MutableElements& elements, bool add) {
  void* out = elements.data;
  const DType out_dtype = elements.dtype;
  const size_t count = elements.count;
  if (!add && body_dtype == out_dtype) {
    std::memcpy(out, body, count * dtype_size(out_dtype));
    return;
  }
  if (out_dtype == DType::kFloat64) {
    auto* dst = static_cast<double*>(out);
    for (size_t i = 0; i < count; ++i) dst[i] = (add ? dst[i] : 0.0) + load_raw(body, body_dtype, i);
    return;
  }
  element_io::dispatch_float_io(out_dtype, "NoCompression decode", [&](auto io) {
    using Out = decltype(io);
    auto* dst = static_cast<typename Out::T*>(out);
    for (size_t i = 0; i < count; ++i) {
      const float value = static_cast<float>(load_raw(body, body_dtype, i));
      dst[i] = Out::store(add ? Out::load(dst[i]) + value : value);
    }
  });
}

}  // namespace

size_t payload_max_bytes(PayloadCodec codec, size_t count, DType dtype, DType wire_dtype, uint32_t block) {
  switch (codec) {
    case PayloadCodec::kRaw: return kPayloadHeaderBytes + count * dtype_size(dtype);
    case PayloadCodec::kThreeLC: return kPayloadHeaderBytes + threelc_max_encoded_bytes(count);
    case PayloadCodec::kThreeLCBlock:
      if (block == 0) throw PbmError("ThreeLCBlock payload: the block size must be > 0");
      return kPayloadHeaderBytes + threelc_max_encoded_bytes(count, block);
    case PayloadCodec::kCast: return kPayloadHeaderBytes + count * 2;
  }
  throw PbmError("unknown payload codec " + std::to_string(static_cast<int>(codec)));
}

size_t threelc_encode_payload(const Elements& grad, float* residual, float sparsity, uint8_t* out,
                              size_t capacity, const char* name, uint32_t block) {
  const PayloadCodec codec = block ? PayloadCodec::kThreeLCBlock : PayloadCodec::kThreeLC;
  check_capacity(codec, grad.count, grad.dtype, DType::kFloat32, capacity, name, block);
  const ThreeLCEncoded body = threelc_encode(grad, residual, sparsity, out + kPayloadHeaderBytes, name, block);
  PayloadHeader header;
  header.codec = codec;
  header.block = block;
  header.dtype = grad.dtype;
  header.wire_dtype = static_cast<DType>(0);
  header.count = grad.count;
  header.scale = body.scale;
  header.body_bytes = body.bytes;
  return finish_payload(out, header);
}

size_t cast_encode_payload(const Elements& in, DType wire_dtype, uint8_t* out, size_t capacity,
                           const char* name) {
  check_capacity(PayloadCodec::kCast, in.count, in.dtype, wire_dtype, capacity, name);
  // The body starts at offset 32, so its uint16 elements are aligned like `out`.
  cast_encode(in, wire_dtype, reinterpret_cast<uint16_t*>(out + kPayloadHeaderBytes), name);
  PayloadHeader header;
  header.codec = PayloadCodec::kCast;
  header.dtype = in.dtype;
  header.wire_dtype = wire_dtype;
  header.count = in.count;
  header.body_bytes = 2 * in.count;
  return finish_payload(out, header);
}

size_t raw_encode_payload(const Elements& in, uint8_t* out, size_t capacity, const char* name) {
  check_capacity(PayloadCodec::kRaw, in.count, in.dtype, in.dtype, capacity, name);
  PayloadHeader header;
  header.codec = PayloadCodec::kRaw;
  header.dtype = in.dtype;
  header.wire_dtype = in.dtype;
  header.count = in.count;
  header.body_bytes = in.count * dtype_size(in.dtype);
  if (header.body_bytes) std::memcpy(out + kPayloadHeaderBytes, in.data, header.body_bytes);
  return finish_payload(out, header);
}

PayloadHeader read_payload_header(const uint8_t* in, size_t bytes, const char* name) {
  if (bytes < kPayloadHeaderBytes) {
    bad_payload(name, "it has " + std::to_string(bytes) + " bytes, fewer than the " +
                          std::to_string(kPayloadHeaderBytes) + "-byte header (truncated?)");
  }
  if (std::memcmp(in, kMagic, 4) != 0) {
    bad_payload(name, "it does not start with the pybrain-mpi magic 'PBMC' (not a payload made by "
                      "pybrain_mpi.compression, or corrupted)");
  }
  if (in[4] != kPayloadVersion) {
    bad_payload(name, "payload format version " + std::to_string(in[4]) + ", this build reads " +
                          std::to_string(kPayloadVersion) + " (mixed pybrain-mpi versions?)");
  }
  PayloadHeader header;
  if (in[5] > static_cast<uint8_t>(PayloadCodec::kThreeLCBlock)) {
    bad_payload(name, "unknown codec id " + std::to_string(in[5]) + " (corrupted header)");
  }
  header.codec = static_cast<PayloadCodec>(in[5]);
  if (!is_float_dtype(in[6])) bad_payload(name, "bad dtype code " + std::to_string(in[6]) + " (corrupted header)");
  header.dtype = static_cast<DType>(in[6]);
  header.wire_dtype = static_cast<DType>(in[7]);
  header.count = get<uint64_t>(in + 8);
  if (header.codec == PayloadCodec::kThreeLCBlock) {
    header.block = get<uint32_t>(in + 16);
  } else {
    header.scale = get<float>(in + 16);
  }
  header.body_bytes = get<uint64_t>(in + 24);
  if (header.body_bytes != bytes - kPayloadHeaderBytes) {
    bad_payload(name, "the header announces a " + std::to_string(header.body_bytes) +
                          "-byte body but " + std::to_string(bytes - kPayloadHeaderBytes) +
                          " bytes follow it (truncated or padded)");
  }
  const uint32_t stored = get<uint32_t>(in + kChecksumOffset);
  if (payload_checksum(in, in + kPayloadHeaderBytes, header.body_bytes) != stored) {
    bad_payload(name, "checksum mismatch: the payload was corrupted in transit or in memory");
  }
  // A valid checksum makes these consistency checks guards against encoder bugs.
  size_t expected_max = 0;
  switch (header.codec) {
    case PayloadCodec::kRaw:
      if (header.wire_dtype != header.dtype) bad_payload(name, "raw body dtype differs from the tensor dtype");
      expected_max = header.count * dtype_size(header.dtype);
      if (header.body_bytes != expected_max) bad_payload(name, "raw body length does not match the element count");
      break;
    case PayloadCodec::kCast:
      if (!is_half_precision(header.wire_dtype)) bad_payload(name, "cast wire dtype is not 16-bit");
      if (header.body_bytes != 2 * header.count) bad_payload(name, "cast body length does not match the element count");
      break;
    case PayloadCodec::kThreeLC:
      if (!(header.scale >= 0.f && header.scale <= FLT_MAX)) bad_payload(name, "3LC scale is not finite");
      if (header.body_bytes > threelc_max_encoded_bytes(header.count)) {
        bad_payload(name, "3LC body is longer than any encoding of " + std::to_string(header.count) + " elements");
      }
      break;
    case PayloadCodec::kThreeLCBlock:
      if (header.block == 0) bad_payload(name, "block-scaled 3LC payload with block size 0");
      if (header.body_bytes > threelc_max_encoded_bytes(header.count, header.block) ||
          header.body_bytes < 4 * threelc_blocks(header.count, header.block)) {
        bad_payload(name, "block-scaled 3LC body of " + std::to_string(header.body_bytes) +
                              " bytes cannot encode " + std::to_string(header.count) + " elements in blocks of " +
                              std::to_string(header.block));
      }
      break;
  }
  return header;
}

void decode_payload(const uint8_t* in, size_t bytes, const MutableElements& out, bool add, const char* name) {
  const PayloadHeader header = read_payload_header(in, bytes, name);
  if (header.count != out.count) {
    bad_payload(name, "it holds " + std::to_string(header.count) + " elements but the output has " +
                          std::to_string(out.count));
  }
  const uint8_t* body = in + kPayloadHeaderBytes;
  switch (header.codec) {
    case PayloadCodec::kThreeLC:
      if (add) {
        threelc_decode_add(ThreeLCBody{body, header.body_bytes, header.scale}, out, name);
      } else {
        threelc_decode(ThreeLCBody{body, header.body_bytes, header.scale}, out, name);
      }
      return;
    case PayloadCodec::kThreeLCBlock: {
      const ThreeLCBody blocks{body, header.body_bytes, 0.f, header.block};
      if (add) {
        threelc_decode_add(blocks, out, name);
      } else {
        threelc_decode(blocks, out, name);
      }
      return;
    }
    case PayloadCodec::kCast: {
      // Bodies from Python bytes objects need not be 2-byte aligned.
      if (reinterpret_cast<uintptr_t>(body) % 2 != 0) {
        bad_payload(name, "the cast body is not 2-byte aligned in memory (copy the payload into an aligned buffer)");
      }
      cast_decode(reinterpret_cast<const uint16_t*>(body), header.wire_dtype, out, add, name);
      return;
    }
    case PayloadCodec::kRaw:
      decode_raw(body, header.dtype, out, add);
      return;
  }
}

}  // namespace pbm
