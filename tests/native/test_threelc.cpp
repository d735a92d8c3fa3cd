// 3LC bodies (csrc/compression/threelc.h): round trips of every trit pattern across the
// sizes where the decoder changes path (the blind fast path, the short last group, the
// windowed streaming decode from 64 Ki float32 on, with one or two outputs), and the
// decoder's refusal of malformed bodies.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "compression/threelc.h"

namespace {

using pbm::DType;

// Trits of a pattern; the last element is +1, so M = 1 for an input of the trits themselves.
std::vector<float> trits(const std::string& pattern, size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> q(count, 0.f);
  if (pattern == "dense") {
    for (auto& v : q) v = static_cast<float>(static_cast<int>(rng() % 3) - 1);
  } else if (pattern == "sparse") {
    for (auto& v : q) v = rng() % 50 == 0 ? (rng() % 2 ? 1.f : -1.f) : 0.f;
  } else if (pattern == "runs") {  // zero runs of random lengths (up to ~3 windows) between bursts
    for (size_t at = 0; at < count;) {
      at += rng() % 16000;
      for (size_t burst = 1 + rng() % 400; burst > 0 && at < count; --burst, ++at) q[at] = rng() % 2 ? 1.f : -1.f;
    }
  }
  if (count) q[count - 1] = 1.f;
  return q;
}

struct Body {
  std::vector<uint8_t> bytes;
  float scale;
};

Body encode(const std::vector<float>& grad, float sparsity = 1.f) {
  std::vector<float> residual(grad.size(), 0.f);
  Body body{std::vector<uint8_t>(pbm::threelc_max_encoded_bytes(grad.size()) + 1), 0.f};
  const pbm::ThreeLCEncoded e = pbm::threelc_encode({grad.data(), grad.size(), DType::kFloat32}, residual.data(),
                                                    sparsity, body.bytes.data(), "g");
  body.bytes.resize(e.bytes);
  body.scale = e.scale;
  return body;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

pbm::ThreeLCBody view(const Body& body, size_t bytes) { return {body.bytes.data(), bytes, body.scale}; }
pbm::ThreeLCBody view(const Body& body) { return view(body, body.bytes.size()); }

const size_t kSizes[] = {0, 1, 4, 5, 6, 69, 70, 71, 4099, 65535, 65536, 65537, 300007};
const char* kPatterns[] = {"dense", "sparse", "runs", "zeros"};

}  // namespace

CHECK_CASE(threelc, every_pattern_round_trips_at_every_decoder_path) {
  for (size_t count : kSizes) {
    for (const char* pattern : kPatterns) {
      const std::vector<float> q = trits(pattern, count, static_cast<uint32_t>(count));
      const Body body = encode(q);
      CHECK(count == 0 || body.scale == 1.f);
      CHECK(body.bytes.size() <= pbm::threelc_max_encoded_bytes(count));
      // aligned, then misaligned by one float (the streamed decode stores its head plainly)
      std::vector<float> buffer(count + 8, NAN);
      for (size_t shift : {size_t{0}, size_t{1}}) {
        std::fill(buffer.begin(), buffer.end(), NAN);
        float* out = buffer.data() + shift;
        pbm::threelc_decode(view(body), {out, count, DType::kFloat32}, "g");
        for (size_t i = 0; i < count; ++i)
          CHECK_THAT(out[i] == q[i], pattern << " x" << count << " shift " << shift << " element " << i);
        for (size_t i = count + shift; i < buffer.size(); ++i) CHECK(std::isnan(buffer[i]));
        if (shift) CHECK(std::isnan(buffer[0]));
      }
    }
  }
}

CHECK_CASE(threelc, two_outputs_get_the_same_values_streamed_or_copied) {
  // below 64 Ki float32: decoded then copied while cached; from 64 Ki on: both streamed
  for (size_t count : {size_t{4099}, size_t{65536}, size_t{300007}}) {
    const std::vector<float> q = trits("runs", count, 7);
    const Body body = encode(q);
    std::vector<float> out(count, NAN), also(count + 1, NAN);
    pbm::threelc_decode(view(body), {out.data(), count, DType::kFloat32}, "g", also.data() + 1);
    for (size_t i = 0; i < count; ++i) CHECK_THAT(out[i] == q[i] && also[i + 1] == q[i], "x" << count << " element " << i);
    CHECK(std::isnan(also[0]));
  }
}

CHECK_CASE(threelc, decode_add_leaves_zero_trit_elements_bit_identical) {
  for (size_t count : {size_t{5000}, size_t{300007}}) {
    const std::vector<float> q = trits("sparse", count, 3);
    const Body body = encode(q);
    std::vector<float> out(count, -0.0f);
    pbm::threelc_decode_add(view(body), {out.data(), count, DType::kFloat32}, "g");
    for (size_t i = 0; i < count; ++i)
      CHECK_THAT(q[i] == 0 ? same_bits(out[i], -0.0f) : out[i] == q[i], "element " << i);
  }
}

CHECK_CASE(threelc, sixteen_bit_outputs_hold_the_rounded_values) {
  const std::vector<float> q = trits("dense", 70001, 5);
  const Body body = encode(q);
  std::vector<uint16_t> out(q.size());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    pbm::threelc_decode(view(body), {out.data(), q.size(), dtype}, "g");
    for (size_t i = 0; i < q.size(); ++i) {
      const float value = dtype == DType::kBFloat16 ? pbm::bf16_to_float(out[i]) : pbm::half_to_float(out[i]);
      CHECK_THAT(value == q[i], "element " << i);
    }
  }
}

CHECK_CASE(threelc, known_max_encode_and_node_sums_match_the_plain_encode) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const size_t count = 10007;
  std::vector<float> a(count), b(count), sum(count), residual(count), residual2(count);
  for (size_t i = 0; i < count; ++i) {
    a[i] = normal(rng);
    b[i] = normal(rng);
    residual[i] = residual2[i] = 0.1f * normal(rng);
  }
  const float* inputs[2] = {a.data(), b.data()};
  const uint32_t largest = pbm::threelc_reduce_max(sum.data(), inputs, 2, count, residual.data());
  for (size_t i = 0; i < count; ++i) CHECK(sum[i] == a[i] + b[i]);
  std::vector<uint8_t> one(pbm::threelc_max_encoded_bytes(count)), two(one.size());
  const pbm::Elements input{sum.data(), count, DType::kFloat32};
  const auto e1 = pbm::threelc_encode(input, residual.data(), 1.5f, one.data(), "g");
  const auto e2 = pbm::threelc_encode_known_max(input, residual2.data(), 1.5f, two.data(), largest, "g");
  CHECK(e1.bytes == e2.bytes && e1.scale == e2.scale && std::memcmp(one.data(), two.data(), e1.bytes) == 0);
  CHECK(std::memcmp(residual.data(), residual2.data(), count * 4) == 0);
  std::vector<float> acc(count);
  const bool nonzero = pbm::threelc_accumulate_n(inputs, 2, count, residual.data(), acc.data(), "g");
  CHECK(nonzero);
  for (size_t i = 0; i < count; ++i) CHECK(acc[i] == residual[i] + (a[i] + b[i]));
}

CHECK_CASE(threelc, decoder_accepts_any_split_of_a_zero_run) {
  const size_t count = 5 * 6 + 2;  // 7 groups, the last one short
  // 6 zero groups as 243 + 121 + 244, then a last group whose two trits are (+1, -1)
  const uint8_t last = (2 + 0 * 3) + 1 * 9 + 1 * 27 + 1 * 81;
  const uint8_t body[] = {243, 121, 244, last};
  std::vector<float> out(count, NAN);
  pbm::threelc_decode({body, sizeof body, 2.0f}, {out.data(), count, DType::kFloat32}, "g");
  for (size_t i = 0; i + 2 < count; ++i) CHECK(out[i] == 0.f);
  CHECK(out[count - 2] == 2.0f && out[count - 1] == -2.0f);
}

CHECK_CASE(threelc, malformed_bodies_raise_clear_errors) {
  std::vector<float> out(5 * 14);
  auto decode = [&](std::vector<uint8_t> body, size_t count, float scale) {
    pbm::threelc_decode({body.data(), body.size(), scale}, {out.data(), count, DType::kFloat32}, "g");
  };
  EXPECT_ERROR(decode({255}, 5 * 13, 1.f), "run of 14 zero groups but only 13");
  EXPECT_ERROR(decode({121, 121}, 5, 1.f), "remain after all 1 groups");
  EXPECT_ERROR(decode({121}, 10, 1.f), "holds 1 groups, 2 expected");
  EXPECT_ERROR(decode({242}, 3, 1.f), "nonzero padding");
  EXPECT_ERROR(decode({}, 1, 1.f), "holds 0 groups, 1 expected");
  EXPECT_ERROR(decode({121}, 5, NAN), "scale");
  EXPECT_ERROR(decode({121}, 5, INFINITY), "scale");
}

CHECK_CASE(threelc, a_truncated_body_is_refused_with_totals_of_the_whole_tensor) {
  for (size_t count : {size_t{65536}, size_t{300007}}) {
    for (const char* pattern : kPatterns) {
      const Body body = encode(trits(pattern, count, 1));
      std::vector<float> out(count);
      const size_t half = body.bytes.size() / 2;
      EXPECT_ERROR(pbm::threelc_decode(view(body, half), {out.data(), count, DType::kFloat32}, "g"),
                   "expected for " + std::to_string(count) + " elements");
    }
  }
}

CHECK_CASE(threelc, non_finite_input_is_refused_and_the_residual_kept) {
  std::vector<float> grad(1000, 1.f), residual(1000, 0.25f);
  grad[417] = NAN;
  std::vector<uint8_t> out(pbm::threelc_max_encoded_bytes(grad.size()));
  EXPECT_ERROR(pbm::threelc_encode({grad.data(), grad.size(), DType::kFloat32}, residual.data(), 1.f, out.data(), "w"),
               "element 417");
  for (float r : residual) CHECK(r == 0.25f);
  EXPECT_ERROR(pbm::threelc_encode({grad.data(), grad.size(), DType::kFloat32}, residual.data(), 2.f, out.data(), "w"),
               "outside [1, 2)");
  EXPECT_ERROR(pbm::threelc_encode({grad.data(), grad.size(), DType::kInt32}, residual.data(), 1.f, out.data(), "w"),
               "not supported");
}

// --- block scaling (one scale per block of B elements) ------------------------------------

namespace {

// Input whose block b holds the trits q times (b + 1), so block b's scale is b + 1 (each
// block's last element is +-1 times that, hence nonzero) and its trits are q's.
std::vector<float> block_input(const std::vector<float>& q, uint32_t block) {
  std::vector<float> grad(q);
  for (size_t i = 0; i < grad.size(); ++i) {
    const size_t b = i / block;
    if (i + 1 == std::min(grad.size(), (b + 1) * block) && grad[i] == 0.f) grad[i] = 1.f;
    grad[i] *= static_cast<float>(b + 1);
  }
  return grad;
}

pbm::ThreeLCBody block_view(const std::vector<uint8_t>& bytes, uint32_t block) {
  return {bytes.data(), bytes.size(), 0.f, block};
}

}  // namespace

CHECK_CASE(threelc, block_scaled_bodies_round_trip_at_every_decoder_path) {
  for (uint32_t block : {1u, 5u, 64u, 1000u}) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{63}, size_t{64}, size_t{65}, size_t{4099}, size_t{65537}}) {
      const std::vector<float> grad = block_input(trits("dense", count, 9), block);
      std::vector<float> residual(count, 0.f);
      std::vector<uint8_t> bytes(pbm::threelc_max_encoded_bytes(count, block));
      const auto e = pbm::threelc_encode({grad.data(), count, DType::kFloat32}, residual.data(), 1.f, bytes.data(), "g",
                                         block);
      CHECK(e.scale == 0.f && e.bytes <= bytes.size() && e.bytes >= 4 * pbm::threelc_blocks(count, block));
      bytes.resize(e.bytes);
      for (size_t b = 0; b < pbm::threelc_blocks(count, block); ++b) {
        float scale;
        std::memcpy(&scale, bytes.data() + 4 * b, 4);
        CHECK_THAT(scale == static_cast<float>(b + 1), "block " << b << " of B=" << block << " x" << count);
      }
      for (float r : residual) CHECK(r == 0.f);
      std::vector<float> out(count, NAN), also(count, NAN), sum(count, -0.0f);
      pbm::threelc_decode(block_view(bytes, block), {out.data(), count, DType::kFloat32}, "g", also.data());
      pbm::threelc_decode_add(block_view(bytes, block), {sum.data(), count, DType::kFloat32}, "g");
      for (size_t i = 0; i < count; ++i) {
        CHECK_THAT(out[i] == grad[i] && also[i] == grad[i], "B=" << block << " x" << count << " element " << i);
        CHECK_THAT(grad[i] == 0.f ? same_bits(sum[i], -0.0f) : sum[i] == grad[i], "add, element " << i);
      }
      std::vector<uint16_t> half(count);
      pbm::threelc_decode(block_view(bytes, block), {half.data(), count, DType::kBFloat16}, "g");
      for (size_t i = 0; i < count; ++i)
        CHECK_THAT(pbm::bf16_to_float(half[i]) == pbm::bf16_to_float(pbm::float_to_bf16(grad[i])), "bf16 " << i);
    }
  }
}

CHECK_CASE(threelc, block_scaled_known_max_encode_matches_the_plain_encode) {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal;
  const size_t count = 10007;
  std::vector<float> a(count), b(count), sum(count), residual(count), residual2(count);
  for (size_t i = 0; i < count; ++i) {
    a[i] = normal(rng);
    b[i] = normal(rng) * (i < 5000 ? 1e-3f : 1.f);
    residual[i] = residual2[i] = 0.1f * normal(rng);
  }
  const float* inputs[2] = {a.data(), b.data()};
  const uint32_t largest = pbm::threelc_reduce_max(sum.data(), inputs, 2, count, residual.data());
  std::vector<uint8_t> one(pbm::threelc_max_encoded_bytes(count, 64)), two(one.size());
  const pbm::Elements input{sum.data(), count, DType::kFloat32};
  const auto e1 = pbm::threelc_encode(input, residual.data(), 1.f, one.data(), "g", 64);
  const auto e2 = pbm::threelc_encode_known_max(input, residual2.data(), 1.f, two.data(), largest, "g", 64);
  CHECK(e1.bytes == e2.bytes && std::memcmp(one.data(), two.data(), e1.bytes) == 0);
  CHECK(std::memcmp(residual.data(), residual2.data(), count * 4) == 0);
  const uint32_t inf_bits = 0x7f800000u;
  EXPECT_ERROR(pbm::threelc_encode_known_max(input, residual2.data(), 1.f, two.data(), inf_bits, "g", 64),
               "not finite");
}

CHECK_CASE(threelc, malformed_block_scaled_bodies_raise_clear_errors) {
  std::vector<float> out(200);
  auto decode = [&](std::vector<uint8_t> body, size_t count, uint32_t block) {
    pbm::threelc_decode({body.data(), body.size(), 0.f, block}, {out.data(), count, DType::kFloat32}, "g");
  };
  auto with_scales = [](std::vector<float> scales, std::vector<uint8_t> stream) {
    std::vector<uint8_t> body(4 * scales.size());
    std::memcpy(body.data(), scales.data(), body.size());
    body.insert(body.end(), stream.begin(), stream.end());
    return body;
  };
  // 130 elements in blocks of 64: 3 scales, then 26 groups (255, 253 = 14 + 12 zero groups)
  decode(with_scales({1.f, 2.f, 0.f}, {255, 253}), 130, 64);
  EXPECT_ERROR(decode(with_scales({1.f, 2.f}, {}), 130, 64), "fewer than the 12 of its 3 block scales");
  EXPECT_ERROR(decode(with_scales({1.f, 2.f, NAN}, {255, 253}), 130, 64), "scale of block 2 (elements 128..129)");
  EXPECT_ERROR(decode(with_scales({INFINITY, 2.f, 1.f}, {255, 253}), 130, 64), "scale of block 0");
  EXPECT_ERROR(decode(with_scales({-1.f, 2.f, 1.f}, {255, 253}), 130, 64), "not a finite number >= 0");
  EXPECT_ERROR(decode(with_scales({1.f, 2.f, 0.f}, {255}), 130, 64), "holds 14 groups, 26 expected");
}

CHECK_CASE(threelc, block_scaled_non_finite_input_is_refused_and_the_residual_kept) {
  std::vector<float> grad(1000, 1.f), residual(1000, 0.25f);
  grad[417] = INFINITY;
  std::vector<uint8_t> out(pbm::threelc_max_encoded_bytes(grad.size(), 64));
  EXPECT_ERROR(pbm::threelc_encode({grad.data(), grad.size(), DType::kFloat32}, residual.data(), 1.f, out.data(), "w",
                                   64),
               "element 417");
  for (float r : residual) CHECK(r == 0.25f);
}
