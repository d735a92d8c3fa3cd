// Bench mode of the native test binary: the body-level 3LC codec and the bfloat16 cast on
// one core, timed exactly as benchmarks/compression.py reports them (median thread CPU
// time and wall time over REPEATS calls, the residual warm from one encode first).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "compression/payload.h"
#include "compression/threelc.h"

namespace {

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// (median thread CPU seconds, median wall seconds) of fn() over `repeats` calls.
std::pair<double, double> timed(const std::function<void()>& fn, int repeats) {
  std::vector<double> cpu, wall;
  for (int i = 0; i < repeats; ++i) {
    const double c0 = thread_seconds();
    const auto w0 = std::chrono::steady_clock::now();
    fn();
    cpu.push_back(thread_seconds() - c0);
    wall.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count());
  }
  return {median(cpu), median(wall)};
}

void field(const char* name, std::pair<double, double> t, bool last = false) {
  std::printf("\"%s\": [%.9g, %.9g]%s", name, t.first, t.second, last ? "" : ", ");
}

}  // namespace

int bench_main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: bench FILE COUNT REPEATS\n");
    return 2;
  }
  const size_t n = std::stoull(argv[2]);
  const int repeats = std::stoi(argv[3]);
  std::vector<float> grad(n);
  std::ifstream in(argv[1], std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(grad.data()), static_cast<std::streamsize>(n * sizeof(float)))) {
    std::fprintf(stderr, "bench: cannot read %zu float32 from %s\n", n, argv[1]);
    return 2;
  }
  std::vector<float> residual(n, 0.f), out(n, 0.f);
  std::vector<uint8_t> body(pbm::threelc_max_encoded_bytes(n));
  pbm::ThreeLCEncoded encoded;
  auto encode = [&] {
    encoded = pbm::threelc_encode({grad.data(), n, pbm::DType::kFloat32}, residual.data(), 1.f, body.data(), nullptr);
  };
  encode();  // warm the residual, as in training
  const auto encode_time = timed(encode, repeats);
  const auto decode_time = timed([&] {
    pbm::threelc_decode({body.data(), encoded.bytes, encoded.scale}, {out.data(), n, pbm::DType::kFloat32}, nullptr);
  }, repeats);
  const auto decode_add_time = timed([&] {
    pbm::threelc_decode_add({body.data(), encoded.bytes, encoded.scale}, {out.data(), n, pbm::DType::kFloat32}, nullptr);
  }, repeats);
  const size_t capacity = pbm::payload_max_bytes(pbm::PayloadCodec::kCast, n, pbm::DType::kFloat32, pbm::DType::kBFloat16);
  std::vector<uint64_t> cast_out(capacity / 8 + 1);
  const auto cast_time = timed([&] {
    pbm::cast_encode_payload({grad.data(), n, pbm::DType::kFloat32}, pbm::DType::kBFloat16,
                             reinterpret_cast<uint8_t*>(cast_out.data()), capacity, nullptr);
  }, repeats);
  std::printf("{\"body_bytes\": %zu, ", encoded.bytes);
  field("encode", encode_time);
  field("decode", decode_time);
  field("decode_add", decode_add_time);
  field("cast_bf16", cast_time, true);
  std::printf("}\n");
  return 0;
}
