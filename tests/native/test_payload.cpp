// Self-describing payloads (csrc/compression/payload.h): header fields, and the checks that
// turn a truncated, corrupted or mismatched payload into an error instead of a gradient.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "compression/payload.h"

namespace {

using pbm::DType;
using pbm::PayloadCodec;

std::vector<float> gradient(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::student_t_distribution<float> t(3.f);
  std::vector<float> g(count);
  for (auto& v : g) v = 1e-3f * t(rng);
  return g;
}

// A payload in 8-byte-aligned memory (as pybrain_mpi.compression.Payload holds it).
struct Encoded {
  std::vector<uint64_t> storage;
  size_t bytes = 0;
  uint8_t* data() { return reinterpret_cast<uint8_t*>(storage.data()); }
};

Encoded encode(PayloadCodec codec, const std::vector<float>& grad) {
  Encoded e;
  const DType wire = codec == PayloadCodec::kCast ? DType::kBFloat16 : DType::kFloat32;
  const size_t capacity = pbm::payload_max_bytes(codec, grad.size(), DType::kFloat32, wire);
  e.storage.assign(capacity / 8 + 2, 0);
  std::vector<float> residual(grad.size(), 0.f);
  const pbm::Elements input{grad.data(), grad.size(), DType::kFloat32};
  switch (codec) {
    case PayloadCodec::kThreeLC:
      e.bytes = pbm::threelc_encode_payload(input, residual.data(), 1.f, e.data(), capacity, "fc.bias");
      break;
    case PayloadCodec::kCast:
      e.bytes = pbm::cast_encode_payload(input, wire, e.data(), capacity, "fc.bias");
      break;
    case PayloadCodec::kRaw:
      e.bytes = pbm::raw_encode_payload(input, e.data(), capacity, "fc.bias");
      break;
  }
  return e;
}

const PayloadCodec kCodecs[] = {PayloadCodec::kRaw, PayloadCodec::kThreeLC, PayloadCodec::kCast};

}  // namespace

CHECK_CASE(payload, header_fields_describe_the_body) {
  const std::vector<float> grad = gradient(1000, 1);
  for (PayloadCodec codec : kCodecs) {
    Encoded e = encode(codec, grad);
    const pbm::PayloadHeader header = pbm::read_payload_header(e.data(), e.bytes, "fc.bias");
    CHECK(header.codec == codec && header.dtype == DType::kFloat32 && header.count == grad.size());
    CHECK(header.body_bytes + pbm::kPayloadHeaderBytes == e.bytes);
    CHECK(e.bytes <= pbm::payload_max_bytes(codec, grad.size(), DType::kFloat32, header.wire_dtype));
    CHECK((codec == PayloadCodec::kThreeLC) == (header.scale > 0));
    std::vector<float> out(grad.size());
    pbm::decode_payload(e.data(), e.bytes, {out.data(), out.size(), DType::kFloat32}, false, "fc.bias");
    if (codec == PayloadCodec::kRaw) CHECK(std::memcmp(out.data(), grad.data(), 4 * grad.size()) == 0);
  }
}

CHECK_CASE(payload, every_single_byte_corruption_is_detected) {
  const std::vector<float> grad = gradient(300, 2);
  for (PayloadCodec codec : kCodecs) {
    Encoded e = encode(codec, grad);
    std::vector<float> out(grad.size());
    for (size_t at = 0; at < e.bytes; ++at) {
      for (uint8_t flip : {uint8_t{0x01}, uint8_t{0x80}}) {
        e.data()[at] ^= flip;
        bool refused = false;
        try {
          pbm::decode_payload(e.data(), e.bytes, {out.data(), out.size(), DType::kFloat32}, false, "fc.bias");
        } catch (const pbm::PbmError&) {
          refused = true;
        }
        e.data()[at] ^= flip;
        CHECK_THAT(refused, "codec " << static_cast<int>(codec) << ", byte " << at << " ^ " << int(flip));
      }
    }
  }
}

CHECK_CASE(payload, truncated_padded_and_foreign_payloads_raise_clear_errors) {
  Encoded e = encode(PayloadCodec::kThreeLC, gradient(1000, 3));
  std::vector<float> out(1000);
  auto decode = [&](size_t bytes, size_t count) {
    pbm::decode_payload(e.data(), bytes, {out.data(), count, DType::kFloat32}, false, "fc.bias");
  };
  EXPECT_ERROR(decode(e.bytes - 1, 1000), "announces");
  EXPECT_ERROR(decode(e.bytes + 1, 1000), "announces");
  EXPECT_ERROR(decode(20, 1000), "fewer than the 32-byte header");
  EXPECT_ERROR(decode(e.bytes, 999), "1000 elements but the output has 999");
  e.data()[4] = 9;  // another format version
  EXPECT_ERROR(decode(e.bytes, 1000), "version");
  std::memcpy(e.data(), "XXXX", 4);
  EXPECT_ERROR(decode(e.bytes, 1000), "magic");
}

CHECK_CASE(payload, encoders_refuse_a_short_output_buffer) {
  const std::vector<float> grad = gradient(100, 4);
  std::vector<uint8_t> out(pbm::kPayloadHeaderBytes + 10);
  std::vector<float> residual(grad.size());
  const pbm::Elements input{grad.data(), grad.size(), DType::kFloat32};
  EXPECT_ERROR(pbm::threelc_encode_payload(input, residual.data(), 1.f, out.data(), out.size(), "w"),
               "needed");
  EXPECT_ERROR(pbm::raw_encode_payload(input, out.data(), out.size(), "w"), "needed");
}

CHECK_CASE(payload, cast_refuses_values_the_wire_type_cannot_hold) {
  std::vector<float> x(100, 1.f);
  x[50] = 1e5f;
  std::vector<uint64_t> storage(64);
  auto* out = reinterpret_cast<uint8_t*>(storage.data());
  const pbm::Elements input{x.data(), x.size(), DType::kFloat32};
  EXPECT_ERROR(pbm::cast_encode_payload(input, DType::kFloat16, out, 512, "head"),
               "element 50");
  pbm::cast_encode_payload(input, DType::kBFloat16, out, 512, "head");
}
