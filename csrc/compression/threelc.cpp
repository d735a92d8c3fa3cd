// 3LC codec: see threelc.h for the format and the passes.
#include "threelc.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#include "../common/errors.h"
#include "element_io.h"

namespace pbm {
namespace {

using element_io::BFloat16;
using element_io::Float16;
using element_io::Float32;

constexpr uint8_t kZeroGroup = 121;      // five zero trits: 1 + 3 + 9 + 27 + 81
constexpr uint8_t kMaxGroupByte = 242;   // five +1 trits
constexpr uint8_t kRunBase = 241;        // byte 241 + k is a run of k zero groups
constexpr size_t kMaxRun = 14;
constexpr uint32_t kInfBits = 0x7f800000u;

// Pass 2 works on blocks of this many groups: 2560 float32 residuals (10 KiB), their trits
// (2.5 KiB) and quartic bytes (512 B) stay in L1 between the sub-steps.
constexpr size_t kBlockGroups = 512;
constexpr size_t kBlockElements = kBlockGroups * 5;

std::string label(const char* name) {
  return name && *name ? std::string("tensor '") + name + "'" : std::string("tensor");
}

// --- encode ------------------------------------------------------------------------------

// Pass 1: the largest |residual + grad| as float32 bits. Comparing the bits of |x| as
// unsigned integers orders finite values, puts Inf above them and NaN above Inf, so one
// integer max both finds M and detects non-finite values.
template <class In>
PBM_ALWAYS_INLINE uint32_t max_abs_bits(const typename In::T* __restrict grad,
                                        const float* __restrict residual, size_t count) {
  uint32_t largest = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint32_t bits = float_to_bits(residual[i] + In::load(grad[i])) & 0x7fffffffu;
    largest = bits > largest ? bits : largest;
  }
  return largest;
}

PBM_MULTIVERSION uint32_t max_abs_bits_f32(const float* g, const float* r, size_t n) {
  return max_abs_bits<Float32>(g, r, n);
}
PBM_MULTIVERSION uint32_t max_abs_bits_bf16(const uint16_t* g, const float* r, size_t n) {
  return max_abs_bits<BFloat16>(g, r, n);
}
PBM_MULTIVERSION uint32_t max_abs_bits_f16(const uint16_t* g, const float* r, size_t n) {
  return max_abs_bits<Float16>(g, r, n);
}

// Pass 2, step a: acc = residual + grad; q = round(acc / M) as trits t = q + 1;
// residual = acc - q * M (exact, see threelc.h). Branch-free so it vectorizes.
template <class In>
PBM_ALWAYS_INLINE void quantize_block(const typename In::T* __restrict grad,
                                      float* __restrict residual, size_t count, float scale,
                                      float threshold, uint8_t* __restrict trits) {
  for (size_t i = 0; i < count; ++i) {
    const float acc = residual[i] + In::load(grad[i]);
    const int up = acc >= threshold;
    const int down = acc <= -threshold;
    residual[i] = acc - static_cast<float>(up - down) * scale;
    trits[i] = static_cast<uint8_t>(1 + up - down);
  }
}

PBM_MULTIVERSION void quantize_block_f32(const float* g, float* r, size_t n, float m, float t,
                                         uint8_t* trits) {
  quantize_block<Float32>(g, r, n, m, t, trits);
}
PBM_MULTIVERSION void quantize_block_bf16(const uint16_t* g, float* r, size_t n, float m, float t,
                                          uint8_t* trits) {
  quantize_block<BFloat16>(g, r, n, m, t, trits);
}
PBM_MULTIVERSION void quantize_block_f16(const uint16_t* g, float* r, size_t n, float m, float t,
                                         uint8_t* trits) {
  quantize_block<Float16>(g, r, n, m, t, trits);
}

// Step b: five trits per byte, least significant trit first. One 64-bit multiply packs a
// group: with the trits t0..t4 in bytes 0..4 of a little-endian word w, byte 4 of
// w * (81 + 27<<8 + 9<<16 + 3<<24 + 1<<32) is t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4. The lower
// bytes of the product never exceed 240, so no carry reaches byte 4, and the bytes of w
// above byte 4 only reach bytes 5 and up. `trits` needs 3 readable bytes past the group.
PBM_ALWAYS_INLINE uint8_t pack_group(const uint8_t* trits) {
  constexpr uint64_t kWeights = 81ull | 27ull << 8 | 9ull << 16 | 3ull << 24 | 1ull << 32;
  uint64_t word;
  std::memcpy(&word, trits, 8);
  return static_cast<uint8_t>((word * kWeights) >> 32);
}

PBM_MULTIVERSION void pack_quartic(const uint8_t* __restrict trits, size_t groups,
                                   uint8_t* __restrict quartic) {
  for (size_t j = 0; j < groups; ++j) quartic[j] = pack_group(trits + 5 * j);
}

// Step c: zero-run encoding of the quartic bytes of the whole stream, fed block by block.
// Zero groups (121) are found 64 at a time with a SIMD compare, and only the nonzero
// groups are visited (count-trailing-zeros over the bit mask): each emits the code of the
// zero run before it, then itself. The run ends where the previous nonzero group was, so
// runs span blocks for free, and sparse gradients cost little more than the compare.
class ZeroRunWriter {
 public:
  ZeroRunWriter(uint8_t* out, size_t total_groups) : out_(out), begin_(out), total_(total_groups) {}

  // Appends the quartic bytes of groups [first, first + count) of the stream.
  void push(const uint8_t* __restrict quartic, size_t first, size_t count) {
    size_t j = 0;
    for (; j + 64 <= count; j += 64) {
      uint64_t nonzero = ~zero_mask64(quartic + j);
      // The stream's last group takes the careful path in finish(): emit_fast writes one
      // byte ahead of what it keeps, and a stream of only nonzero groups fills `out`.
      if (first + j + 64 == total_) nonzero &= ~(1ull << 63);
      while (nonzero) {
        const unsigned bit = static_cast<unsigned>(__builtin_ctzll(nonzero));
        nonzero &= nonzero - 1;
        emit_fast(first + j + bit, quartic[j + bit]);
      }
    }
    for (; j < count; ++j) {
      const size_t group = first + j;
      if (quartic[j] == kZeroGroup || group + 1 == total_) continue;
      emit_fast(group, quartic[j]);
    }
    if (first + count == total_ && count > 0) last_byte_ = quartic[count - 1];
  }

  // Emits the final group and the zero run before it; returns the body length.
  size_t finish() {
    if (total_ == 0) return 0;
    if (last_byte_ == kZeroGroup) {
      emit_run(total_ - run_start_);
    } else {
      emit_run(total_ - 1 - run_start_);
      *out_++ = last_byte_;
    }
    return static_cast<size_t>(out_ - begin_);
  }

 private:
  static uint64_t zero_mask64(const uint8_t* bytes) {
#if defined(__SSE2__)
    const __m128i zero_group = _mm_set1_epi8(static_cast<char>(kZeroGroup));
    uint64_t mask = 0;
    for (int k = 0; k < 4; ++k) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * k));
      mask |= static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero_group))))
              << (16 * k);
    }
    return mask;
#else
    uint64_t mask = 0;
    for (int k = 0; k < 64; ++k) mask |= static_cast<uint64_t>(bytes[k] == kZeroGroup) << k;
    return mask;
#endif
  }

  // Greedy run codes: 255 per 14 groups, then 241 + r (r >= 2) or a lone 121.
  void emit_run(size_t run) {
    const size_t full = run / kMaxRun;
    std::memset(out_, kRunBase + kMaxRun, full);
    out_ += full;
    const size_t rest = run - full * kMaxRun;
    if (rest == 1) *out_++ = kZeroGroup;
    if (rest >= 2) *out_++ = static_cast<uint8_t>(kRunBase + rest);
  }

  // Nonzero group `group` with byte `byte`: branch-free for runs shorter than 14 (dense
  // gradients mix zero and nonzero groups unpredictably).
  PBM_ALWAYS_INLINE void emit_fast(size_t group, uint8_t byte) {
    size_t run = group - run_start_;
    run_start_ = group + 1;
    if (run >= kMaxRun) {
      const size_t full = run / kMaxRun;
      std::memset(out_, kRunBase + kMaxRun, full);
      out_ += full;
      run -= full * kMaxRun;
    }
    // Table lookups instead of selects, which the compiler turns back into branches.
    // Run r in 1..13 writes (code of r, byte); r == 0 writes (byte, byte) and keeps one.
    struct RunCodes {
      uint8_t code[kMaxRun];
      uint8_t keep_byte[kMaxRun];
      uint8_t advance[kMaxRun];
      constexpr RunCodes() : code(), keep_byte(), advance() {
        for (size_t r = 0; r < kMaxRun; ++r) {
          code[r] = r == 0 ? 0 : r == 1 ? kZeroGroup : static_cast<uint8_t>(kRunBase + r);
          keep_byte[r] = r == 0 ? 0xff : 0;
          advance[r] = r == 0 ? 1 : 2;
        }
      }
    };
    static constexpr RunCodes kCodes{};
    const uint16_t pair = static_cast<uint16_t>(kCodes.code[run] | (byte & kCodes.keep_byte[run]) |
                                                static_cast<uint16_t>(byte) << 8);
    std::memcpy(out_, &pair, 2);
    out_ += kCodes.advance[run];
  }

  uint8_t* out_;
  uint8_t* begin_;
  size_t total_;
  size_t run_start_ = 0;  // first group of the current zero run
  uint8_t last_byte_ = kZeroGroup;
};

// Finds the first element whose grad or grad + residual is not finite, for the error.
template <class In>
std::string describe_non_finite(const typename In::T* grad, const float* residual, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    const float g = In::load(grad[i]);
    if (!std::isfinite(g)) {
      return "element " + std::to_string(i) + " of the gradient is " + std::to_string(g);
    }
    if (!std::isfinite(residual[i])) {
      return "element " + std::to_string(i) + " of the residual (error-feedback state) is " +
             std::to_string(residual[i]);
    }
    if (!std::isfinite(residual[i] + g)) {
      return "element " + std::to_string(i) + " overflows float32 when added to the residual (" +
             std::to_string(residual[i]) + " + " + std::to_string(g) + ")";
    }
  }
  return "a value is not finite";
}

// The pass kernels of one input type (multiversioned, see element_io.h).
template <class In>
struct EncodeKernels {
  uint32_t (*max_pass)(const typename In::T*, const float*, size_t);
  void (*quantize)(const typename In::T*, float*, size_t, float, float, uint8_t*);
};

// What one encode writes and how.
struct EncodeJob {
  float sparsity;
  uint8_t* out;
  const char* name;
  const uint32_t* known_largest_bits;  // pass 1 done by the caller (else null)
  uint32_t block = 0;                  // B > 0: one scale per block of B elements
};

[[noreturn]] void throw_non_finite_input(const char* name, const std::string& problem) {
  throw PbmError("3LC encode of " + label(name) + ": " + problem +
                 ". Nothing was encoded and the residual is unchanged; a NaN/Inf gradient "
                 "usually means the loss diverged (lower the learning rate or the loss scale).");
}

// Block-scaled encode (threelc.h): pass 1 takes each block's max and writes its scale M_b
// into the body's leading scale array; pass 2 is the per-tensor pass 2 with each L1 block
// quantized piecewise, one call of the quantize kernel per stretch of a scale block.
template <class In>
ThreeLCEncoded encode_blocks(const typename In::T* grad, size_t count, float* residual, const EncodeJob& job,
                             const EncodeKernels<In>& kernels) {
  const size_t block = job.block;
  const size_t blocks = threelc_blocks(count, job.block);
  uint8_t* scales = job.out;
  uint32_t worst = 0;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t first = b * block;
    const uint32_t bits = kernels.max_pass(grad + first, residual + first, std::min(block, count - first));
    worst = bits > worst ? bits : worst;
    // M_b = max_b|acc| * s clamped to FLT_MAX; 0 for an all-zero block.
    const float scale = bits == 0 ? 0.f : std::min(bits_to_float(bits) * job.sparsity, FLT_MAX);
    std::memcpy(scales + 4 * b, &scale, 4);
  }
  if (worst >= kInfBits) throw_non_finite_input(job.name, describe_non_finite<In>(grad, residual, count));

  alignas(64) uint8_t trits[kBlockElements + 8];  // + 8: pack_group reads ahead
  alignas(64) uint8_t quartic[kBlockGroups];
  ZeroRunWriter writer(job.out + 4 * blocks, threelc_groups(count));
  for (size_t start = 0; start < count; start += kBlockElements) {
    const size_t n = std::min(kBlockElements, count - start);
    for (size_t s = start; s < start + n;) {
      const size_t b = s / block;
      const size_t end = std::min(start + n, (b + 1) * block);
      float scale;
      std::memcpy(&scale, scales + 4 * b, 4);
      // An all-zero block keeps q = 0 (infinite threshold); a denormal M_b whose half
      // rounds to 0 must still leave zeros at q = 0.
      const float threshold = scale == 0.f ? INFINITY : std::max(scale * 0.5f, FLT_TRUE_MIN);
      kernels.quantize(grad + s, residual + s, end - s, scale, threshold, trits + (s - start));
      s = end;
    }
    const size_t groups = (n + 4) / 5;
    std::memset(trits + n, 1, groups * 5 - n);  // padding rule: zero trits
    std::memset(trits + groups * 5, 0, 8);       // defined bytes for pack_group's read-ahead
    pack_quartic(trits, groups, quartic);
    writer.push(quartic, start / 5, groups);
  }
  ThreeLCEncoded result;
  result.bytes = 4 * blocks + writer.finish();
  result.scale = 0.f;  // the scales travel in the body
  return result;
}

template <class In>
ThreeLCEncoded encode_impl(const typename In::T* grad, size_t count, float* residual, const EncodeJob& job,
                           const EncodeKernels<In>& kernels) {
  const char* name = job.name;
  if (job.block > 0) {
    // A known max only screens for NaN/Inf here: the blocks need their own maxima.
    if (job.known_largest_bits && *job.known_largest_bits >= kInfBits)
      throw_non_finite_input(name, describe_non_finite<In>(grad, residual, count));
    return encode_blocks<In>(grad, count, residual, job, kernels);
  }
  // Pass 1 is skipped when the caller computed max|grad + residual| while producing grad.
  const uint32_t largest_bits =
      job.known_largest_bits ? *job.known_largest_bits : kernels.max_pass(grad, residual, count);
  if (largest_bits >= kInfBits) {
    throw PbmError("3LC encode of " + label(name) + ": " +
                   describe_non_finite<In>(grad, residual, count) +
                   ". Nothing was encoded and the residual is unchanged; a NaN/Inf gradient "
                   "usually means the loss diverged (lower the learning rate or the loss scale).");
  }
  const float largest = bits_to_float(largest_bits);
  ThreeLCEncoded result;
  // M = max|acc| * s in float32, clamped so that a huge max cannot make M infinite.
  const float scale = std::min(largest * job.sparsity, FLT_MAX);
  // With all-zero input no element may become +-1: an infinite threshold keeps q = 0.
  const float threshold = largest_bits == 0 ? INFINITY : scale * 0.5f;
  result.scale = largest_bits == 0 ? 0.f : scale;

  alignas(64) uint8_t trits[kBlockElements + 8];  // + 8: pack_group reads ahead
  alignas(64) uint8_t quartic[kBlockGroups];
  ZeroRunWriter writer(job.out, threelc_groups(count));
  for (size_t start = 0; start < count; start += kBlockElements) {
    const size_t n = std::min(kBlockElements, count - start);
    kernels.quantize(grad + start, residual + start, n, result.scale, threshold, trits);
    const size_t groups = (n + 4) / 5;
    std::memset(trits + n, 1, groups * 5 - n);  // padding rule: zero trits
    std::memset(trits + groups * 5, 0, 8);       // defined bytes for pack_group's read-ahead
    pack_quartic(trits, groups, quartic);
    writer.push(quartic, start / 5, groups);
  }
  result.bytes = writer.finish();
  return result;
}

// --- decode ------------------------------------------------------------------------------

[[noreturn]] void malformed(const char* name, const std::string& what) {
  throw PbmError("malformed 3LC body for " + label(name) + ": " + what +
                 ". The payload was truncated, corrupted, or decoded with the wrong element "
                 "count; make sure sender and receiver use the same tensor.");
}

// What each body byte does, for all 256 values: group bytes (0..242) hold their five
// decoded values q_i * scale, run bytes (243..255) none. add[] has -0.0 for zero trits and
// runs, so `x + add` leaves x bit-for-bit unchanged; set[] has +0.0 and is padded with zeros
// to 16 floats, so that one 16-float store also clears runs of up to 3 groups.
struct DecodeTable {
  alignas(64) float add[256][8];
  alignas(64) float set[256][16];
  uint8_t advance[256];  // groups consumed: 1, or k for a run byte 241 + k
  // Fills only the half a decode needs: small tensors should not pay for both.
  DecodeTable(float scale, bool for_add) {
    for (int b = 0; b < 256; ++b) {
      int rest = b;
      if (for_add) {
        for (int i = 0; i < 8; ++i) add[b][i] = -0.0f;
      } else {
        for (int i = 0; i < 16; ++i) set[b][i] = 0.f;
      }
      advance[b] = static_cast<uint8_t>(b > kMaxGroupByte ? b - kRunBase : 1);
      if (b > kMaxGroupByte) continue;
      for (int i = 0; i < 5; ++i) {
        const int q = rest % 3 - 1;
        rest /= 3;
        if (q == 0) continue;
        if (for_add) {
          add[b][i] = static_cast<float>(q) * scale;
        } else {
          set[b][i] = static_cast<float>(q) * scale;
        }
      }
    }
  }
};

// Padding check of the last group: its trits from `used` on must be zero (t = 1), i.e.
// byte / 3^used must equal 121 / 3^used.
bool padding_is_zero(uint8_t byte, size_t used) {
  static constexpr int kPow3[5] = {1, 3, 9, 27, 81};
  return used == 0 || byte / kPow3[used] == kZeroGroup / kPow3[used];
}

// A stretch of a body that starts on a byte and a group boundary: `bytes` bytes encoding
// `count` elements. byte_base/group_base: where it starts in the whole body (for messages).
struct BodyPiece {
  const uint8_t* in;
  size_t bytes;
  size_t count;
  size_t byte_base = 0;
  size_t group_base = 0;
};

template <class Out, bool kAdd>
PBM_ALWAYS_INLINE void decode_impl(const BodyPiece& piece, typename Out::T* __restrict out, const DecodeTable& table,
                                   const char* name) {
  const uint8_t* __restrict in = piece.in;
  const size_t bytes = piece.bytes;
  const size_t count = piece.count;
  const size_t byte_base = piece.byte_base;
  const size_t group_base = piece.group_base;
  const size_t groups = threelc_groups(count);
  const size_t full_groups = count / 5;
  size_t group = 0;
  size_t p = 0;
  // Fast path without data-dependent branches: while 14 full groups remain, no byte can
  // run past the end or reach the short last group, so every byte is applied blindly
  // (a run byte adds -0.0 to, or stores zeros over, the groups it covers).
  while (p < bytes && group + kMaxRun <= full_groups) {
    const uint8_t byte = in[p++];
    typename Out::T* o = out + 5 * group;
    if (kAdd) {
#if defined(__SSE2__)
      if constexpr (std::is_same_v<Out, Float32>) {  // the compiler misses this as SIMD
        _mm_storeu_ps(o, _mm_add_ps(_mm_loadu_ps(o), _mm_load_ps(table.add[byte])));
        o[4] += table.add[byte][4];
      } else
#endif
      for (size_t i = 0; i < 5; ++i) o[i] = Out::store(Out::load(o[i]) + table.add[byte][i]);
    } else {
      // 16 stores: the 5 values, then zeros that the next bytes overwrite or that clear a
      // run of up to 3 groups; longer runs (sparse data, predictable) clear the rest.
#if defined(__SSE2__)
      if constexpr (std::is_same_v<Out, Float32>) {
        for (size_t i = 0; i < 16; i += 4) _mm_storeu_ps(o + i, _mm_load_ps(table.set[byte] + i));
      } else
#endif
      for (size_t i = 0; i < 16; ++i) o[i] = Out::store(table.set[byte][i]);
      const size_t run = table.advance[byte];
      for (size_t i = 16; i < 5 * run; ++i) o[i] = Out::store(0.f);
    }
    group += table.advance[byte];
  }
  for (; p < bytes; ++p) {
    const uint8_t byte = in[p];
    if (byte > kMaxGroupByte) {
      const size_t run = byte - kRunBase;
      if (group + run > groups) {
        malformed(name, "byte " + std::to_string(byte_base + p) + " is a run of " + std::to_string(run) +
                            " zero groups but only " + std::to_string(groups - group) +
                            " of the " + std::to_string(group_base + groups) + " groups remain");
      }
      if (!kAdd) {
        const size_t first = 5 * group, last = std::min(5 * (group + run), count);
        for (size_t i = first; i < last; ++i) out[i] = Out::store(0.f);
      }
      group += run;
      continue;
    }
    if (group >= full_groups) {
      if (group >= groups) {
        malformed(name, std::to_string(bytes - p) + " bytes remain after all " +
                            std::to_string(group_base + groups) + " groups were decoded");
      }
      const size_t used = count - 5 * group;  // the short last group
      if (!padding_is_zero(byte, used)) {
        malformed(name, "the last group (byte " + std::to_string(byte_base + p) + " = " +
                            std::to_string(byte) + ") has nonzero padding trits");
      }
      typename Out::T* o = out + 5 * group;
      for (size_t i = 0; i < used; ++i) {
        o[i] = kAdd ? Out::store(Out::load(o[i]) + table.add[byte][i]) : Out::store(table.set[byte][i]);
      }
      ++group;
      continue;
    }
    typename Out::T* o = out + 5 * group;
    const float* values = kAdd ? table.add[byte] : table.set[byte];
    for (size_t i = 0; i < 5; ++i) {
      o[i] = kAdd ? Out::store(Out::load(o[i]) + values[i]) : Out::store(values[i]);
    }
    ++group;
  }
  if (group != groups) {
    malformed(name, "it holds " + std::to_string(group_base + group) + " groups, " +
                        std::to_string(group_base + groups) + " expected for " +
                        std::to_string(5 * group_base + count) + " elements");
  }
}

// The multiversioned kernels catch their own errors and hand them to the caller: GCC 12
// compiles calls to a target_clones function as if it could not throw (without LTO), so an
// exception must not leave one.
PBM_MULTIVERSION std::exception_ptr decode_add_f32(const BodyPiece& body, float* out, const DecodeTable& table,
                                                   const char* name) noexcept {
  try {
    decode_impl<Float32, true>(body, out, table, name);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}
PBM_MULTIVERSION std::exception_ptr decode_set_f32(const BodyPiece& body, float* out, const DecodeTable& table,
                                                   const char* name) noexcept {
  try {
    decode_impl<Float32, false>(body, out, table, name);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

#if defined(__SSE2__)
// Large float32 outputs (beyond the caches) are decoded window by window into an L1 buffer
// and streamed out with non-temporal stores: the decoder's overlapping 16-float stores stay
// in L1, and the output lines are written once without first being read (a plain store
// reads each line it misses). Saves half the memory traffic of a decode (two outputs: both).
constexpr size_t kStreamMinElements = size_t(1) << 16;
constexpr size_t kWindowGroups = 1024;  // 20 KiB of float32

// dst[0..n) = src[0..n) (src 16-byte aligned), streamed where dst is 16-byte aligned.
inline void stream_copy(float* __restrict dst, const float* __restrict src, size_t n) {
  size_t i = 0;
  while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0) {
    dst[i] = src[i];
    ++i;
  }
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

PBM_MULTIVERSION std::exception_ptr decode_set_stream_f32(const BodyPiece& body, float* out, float* out2,
                                                          const DecodeTable& table, const char* name) noexcept try {
  const uint8_t* in = body.in;
  const size_t bytes = body.bytes;
  const size_t count = body.count;
  const size_t full_groups = count / 5;
  // A byte applied before the window's end may run up to kMaxRun - 1 groups past it, and a
  // group's 16-float store spills 11 floats further.
  alignas(64) float window[5 * (kWindowGroups + kMaxRun) + 16];
  size_t p = 0;
  size_t group = 0;
  // The blind fast path of decode_impl, while kMaxRun full groups remain.
  while (p < bytes && group + kMaxRun <= full_groups) {
    const size_t first = group;
    const size_t limit = first + kWindowGroups;
    while (p < bytes && group < limit && group + kMaxRun <= full_groups) {
      const uint8_t byte = in[p++];
      float* o = window + 5 * (group - first);
      for (size_t i = 0; i < 16; i += 4) _mm_storeu_ps(o + i, _mm_load_ps(table.set[byte] + i));
      const size_t run = table.advance[byte];
      for (size_t i = 16; i < 5 * run; ++i) o[i] = 0.f;
      group += run;
    }
    const size_t n = 5 * (group - first);
    stream_copy(out + 5 * first, window, n);
    if (out2 != nullptr) stream_copy(out2 + 5 * first, window, n);
  }
  _mm_sfence();  // streamed stores are weakly ordered: finish them before anyone is told
  // The rest (the last kMaxRun groups and the short one, or a malformed body) takes the
  // checked path. It starts on a byte and a group boundary, so it is a body of its own.
  const size_t done = 5 * group;
  decode_impl<Float32, false>(BodyPiece{in + p, bytes - p, count - done, p, group}, out + done, table, name);
  if (out2 != nullptr) std::memcpy(out2 + done, out + done, (count - done) * sizeof(float));
  return nullptr;
} catch (...) {
  return std::current_exception();
}
#endif

void rethrow_if(const std::exception_ptr& error) {
  if (error) std::rethrow_exception(error);
}

void check_scale(float scale, const char* name) {
  if (!(scale >= 0.f && scale <= FLT_MAX)) {
    malformed(name, "its scale M = " + std::to_string(scale) + " is not a finite number >= 0");
  }
}

template <bool kAdd>
void decode_blocks(const ThreeLCBody& body, const MutableElements& out, const char* name, void* also_out);

template <bool kAdd>
void decode_dispatch(const ThreeLCBody& body, const MutableElements& out, const char* name, void* also_out = nullptr) {
  if (body.block > 0) {
    decode_blocks<kAdd>(body, out, name, also_out);
    return;
  }
  check_scale(body.scale, name);
  const size_t count = out.count;
  if (count > 0 && out.data == nullptr) throw PbmError("3LC decode of " + label(name) + ": null output");
  if (body.bytes > 0 && body.data == nullptr) throw PbmError("3LC decode of " + label(name) + ": null input");
  const DecodeTable table(body.scale, kAdd);
  const BodyPiece piece{body.data, body.bytes, count};
#if defined(__SSE2__)
  if (!kAdd && out.dtype == DType::kFloat32 && count >= kStreamMinElements) {
    rethrow_if(decode_set_stream_f32(piece, static_cast<float*>(out.data), static_cast<float*>(also_out), table, name));
    return;
  }
#endif
  if (!kAdd && also_out != nullptr && count > 0) {
    // Small or 16-bit outputs: decode, then copy while the result is still in cache.
    decode_dispatch<false>(body, out, name);
    std::memcpy(also_out, out.data, count * dtype_size(out.dtype));
    return;
  }
  if (out.dtype == DType::kFloat32) {
    rethrow_if((kAdd ? decode_add_f32 : decode_set_f32)(piece, static_cast<float*>(out.data), table, name));
    return;
  }
  element_io::dispatch_float_io(out.dtype, "3LC decode", [&](auto io) {
    using Out = decltype(io);
    decode_impl<Out, kAdd>(piece, static_cast<typename Out::T*>(out.data), table, name);
  });
}

// out[i] += values[i] * scales[i / block] where values[i] != 0 (else out[i] keeps its bits),
// as a select so that it vectorizes.
PBM_MULTIVERSION void add_scaled_f32(const float* __restrict values, const float* __restrict scales, size_t block,
                                     size_t count, float* __restrict out) {
  for (size_t first = 0, b = 0; first < count; first += block, ++b) {
    const float m = scales[b];
    const size_t end = std::min(count, first + block);
    for (size_t i = first; i < end; ++i) {
      const float v = values[i];
      const float sum = out[i] + v * m;
      out[i] = v != 0.f ? sum : out[i];
    }
  }
}

// Block-scaled decode (threelc.h): the trit stream is decoded with scale 1 (values -1, 0,
// +1, exact in every dtype), then scaled per block: in place (set), or from a float32
// scratch added into `out` (add; zero trits leave `out` bit-for-bit unchanged). 16-bit
// outputs multiply or add in float32 and round once, as the per-tensor decode does.
template <bool kAdd>
void decode_blocks(const ThreeLCBody& body, const MutableElements& out, const char* name, void* also_out) {
  const size_t count = out.count;
  const size_t block = body.block;
  const size_t blocks = threelc_blocks(count, body.block);
  if (body.bytes < 4 * blocks) {
    malformed(name, "it has " + std::to_string(body.bytes) + " bytes, fewer than the " + std::to_string(4 * blocks) +
                        " of its " + std::to_string(blocks) + " block scales (block size " +
                        std::to_string(block) + ")");
  }
  if (count > 0 && out.data == nullptr) throw PbmError("3LC decode of " + label(name) + ": null output");
  if (body.bytes > 0 && body.data == nullptr) throw PbmError("3LC decode of " + label(name) + ": null input");
  thread_local std::vector<float> scales;
  scales.resize(blocks);
  if (blocks) std::memcpy(scales.data(), body.data, 4 * blocks);
  for (size_t b = 0; b < blocks; ++b) {
    if (!(scales[b] >= 0.f && scales[b] <= FLT_MAX)) {
      malformed(name, "the scale of block " + std::to_string(b) + " (elements " + std::to_string(b * block) + ".." +
                          std::to_string(std::min(count, (b + 1) * block) - 1) + ") is " + std::to_string(scales[b]) +
                          ", not a finite number >= 0");
    }
  }
  const ThreeLCBody trits{body.data + 4 * blocks, body.bytes - 4 * blocks, 1.0f, 0};
  if (!kAdd) {
    decode_dispatch<false>(trits, out, name);
    if (out.dtype == DType::kFloat32) {
      float* o = static_cast<float*>(out.data);
      for (size_t b = 0; b < blocks; ++b) {
        const float m = scales[b];
        const size_t end = std::min(count, (b + 1) * block);
        for (size_t i = b * block; i < end; ++i) o[i] *= m;
      }
    } else {
      element_io::dispatch_float_io(out.dtype, "3LC decode", [&](auto io) {
        using Out = decltype(io);
        auto* o = static_cast<typename Out::T*>(out.data);
        for (size_t b = 0; b < blocks; ++b) {
          const float m = scales[b];
          const size_t end = std::min(count, (b + 1) * block);
          for (size_t i = b * block; i < end; ++i) o[i] = Out::store(Out::load(o[i]) * m);
        }
      });
    }
    if (also_out != nullptr && count > 0) std::memcpy(also_out, out.data, count * dtype_size(out.dtype));
    return;
  }
  thread_local std::vector<float> values;
  values.resize(count);
  decode_dispatch<false>(trits, MutableElements{values.data(), count, DType::kFloat32}, name);
  if (out.dtype == DType::kFloat32) {
    add_scaled_f32(values.data(), scales.data(), block, count, static_cast<float*>(out.data));
    return;
  }
  element_io::dispatch_float_io(out.dtype, "3LC decode", [&](auto io) {
    using Out = decltype(io);
    auto* o = static_cast<typename Out::T*>(out.data);
    for (size_t b = 0; b < blocks; ++b) {
      const float m = scales[b];
      const size_t end = std::min(count, (b + 1) * block);
      for (size_t i = b * block; i < end; ++i) {
        if (values[i] != 0.f) o[i] = Out::store(Out::load(o[i]) + values[i] * m);
      }
    }
  });
}

}  // namespace

ThreeLCEncoded threelc_encode(const Elements& grad, float* residual, float sparsity, uint8_t* out,
                              const char* name, uint32_t block) {
  if (!(sparsity >= 1.f && sparsity < 2.f)) {
    throw PbmError("3LC encode of " + label(name) + ": sparsity multiplier s = " +
                   std::to_string(sparsity) + " is outside [1, 2) (1 keeps the most detail, "
                   "values towards 2 send fewer nonzeros)");
  }
  const size_t count = grad.count;
  if (count == 0) return ThreeLCEncoded{};
  if (!grad.data || !residual || !out) throw PbmError("3LC encode of " + label(name) + ": null buffer");
  const EncodeJob job{sparsity, out, name, nullptr, block};
  switch (grad.dtype) {
    case DType::kFloat32:
      return encode_impl<Float32>(static_cast<const float*>(grad.data), count, residual, job,
                                  {max_abs_bits_f32, quantize_block_f32});
    case DType::kBFloat16:
      return encode_impl<BFloat16>(static_cast<const uint16_t*>(grad.data), count, residual, job,
                                   {max_abs_bits_bf16, quantize_block_bf16});
    case DType::kFloat16:
      return encode_impl<Float16>(static_cast<const uint16_t*>(grad.data), count, residual, job,
                                  {max_abs_bits_f16, quantize_block_f16});
    default:
      break;
  }
  throw PbmError("3LC encode of " + label(name) + ": dtype " + dtype_name(grad.dtype) +
                 " is not supported; 3LC takes float32, bfloat16 or float16 gradients");
}

void threelc_decode_add(const ThreeLCBody& body, const MutableElements& out, const char* name) {
  decode_dispatch<true>(body, out, name);
}

void threelc_decode(const ThreeLCBody& body, const MutableElements& out, const char* name, void* also_out) {
  decode_dispatch<false>(body, out, name, also_out);
}

namespace {
// out = residual + grad; returns (bits of the largest |out|, OR of the residual's bits without
// sign). Integer max/OR vectorize without -ffast-math; the max also catches NaN/Inf.
template <class In>
PBM_ALWAYS_INLINE std::pair<uint32_t, uint32_t> accumulate_block(const typename In::T* __restrict grad,
                                                                  const float* __restrict residual,
                                                                  float* __restrict out, size_t count) {
  uint32_t largest = 0, any = 0;
  for (size_t i = 0; i < count; ++i) {
    const float v = residual[i] + In::load(grad[i]);
    out[i] = v;
    const uint32_t bits = float_to_bits(v) & 0x7fffffffu;
    largest = bits > largest ? bits : largest;
    any |= float_to_bits(residual[i]) & 0x7fffffffu;
  }
  return {largest, any};
}
PBM_MULTIVERSION std::pair<uint32_t, uint32_t> accumulate_f32(const float* g, const float* r, float* o,
                                                              size_t n) {
  return accumulate_block<Float32>(g, r, o, n);
}
}  // namespace

namespace {
// Blocks of the node-input kernels: the partial sum of the L inputs stays in L1.
constexpr size_t kSumBlock = 2048;

// acc[0..m) = in[0][b..] + in[1][b..] + ... in input order (what reduce_n computes).
PBM_ALWAYS_INLINE void sum_inputs(float* __restrict acc, const float* const* in, int inputs, size_t b,
                                  size_t m) {
  const float* first = in[0] + b;
  for (size_t i = 0; i < m; ++i) acc[i] = first[i];
  for (int q = 1; q < inputs; ++q) {
    const float* x = in[q] + b;
    for (size_t i = 0; i < m; ++i) acc[i] += x[i];
  }
}

// One pass over a block-summed node input: stores the sum (kWithResidual: residual + sum)
// and returns (bits of max|residual + sum|, OR of the residual's bits without sign).
template <bool kWithResidual>
PBM_ALWAYS_INLINE std::pair<uint32_t, uint32_t> node_sum_pass(float* out, const float* const* in,
                                                              int inputs, size_t count,
                                                              const float* residual) {
  alignas(64) float acc[kSumBlock];
  uint32_t largest = 0, any = 0;
  for (size_t b = 0; b < count; b += kSumBlock) {
    const size_t m = std::min(kSumBlock, count - b);
    sum_inputs(acc, in, inputs, b, m);
    float* __restrict dst = out + b;
    const float* __restrict r = residual + b;
    for (size_t i = 0; i < m; ++i) {
      const float v = r[i] + acc[i];
      dst[i] = kWithResidual ? v : acc[i];
      const uint32_t bits = float_to_bits(v) & 0x7fffffffu;
      largest = bits > largest ? bits : largest;
      if (kWithResidual) any |= float_to_bits(r[i]) & 0x7fffffffu;
    }
  }
  return {largest, any};
}

PBM_MULTIVERSION uint32_t reduce_max_f32(float* out, const float* const* in, int inputs, size_t count,
                                         const float* residual) {
  return node_sum_pass<false>(out, in, inputs, count, residual).first;
}

PBM_MULTIVERSION std::pair<uint32_t, uint32_t> accumulate_n_f32(const float* const* in, int inputs,
                                                                size_t count, const float* residual,
                                                                float* out) {
  return node_sum_pass<true>(out, in, inputs, count, residual);
}

// The first element whose node sum or sum + residual is not finite, for the error.
std::string describe_non_finite_sum(const float* const* in, int inputs, size_t count,
                                    const float* residual) {
  for (size_t i = 0; i < count; ++i) {
    float sum = in[0][i];
    for (int q = 1; q < inputs; ++q) sum += in[q][i];
    if (!std::isfinite(sum))
      return "element " + std::to_string(i) + " of the node's sum of the gradient is " + std::to_string(sum);
    if (!std::isfinite(residual[i]))
      return "element " + std::to_string(i) + " of the residual (error-feedback state) is " +
             std::to_string(residual[i]);
    if (!std::isfinite(residual[i] + sum))
      return "element " + std::to_string(i) + " overflows float32 when added to the residual";
  }
  return "a value is not finite";
}

[[noreturn]] void non_finite(const char* name, const std::string& problem) {
  throw PbmError("3LC encode of " + label(name) + ": " + problem +
                 ". Nothing was encoded and the residual is unchanged; a NaN/Inf gradient "
                 "usually means the loss diverged (lower the learning rate or the loss scale).");
}
}  // namespace

uint32_t threelc_reduce_max(float* out, const float* const* inputs, int n_inputs, size_t count,
                            const float* residual) {
  if (count == 0) return 0;
  return reduce_max_f32(out, inputs, n_inputs, count, residual);
}

bool threelc_accumulate_n(const float* const* inputs, int n_inputs, size_t count, const float* residual,
                          float* out, const char* name) {
  if (count == 0) return false;
  const auto bits = accumulate_n_f32(inputs, n_inputs, count, residual, out);
  if (bits.first >= kInfBits) non_finite(name, describe_non_finite_sum(inputs, n_inputs, count, residual));
  return bits.second != 0;
}

ThreeLCEncoded threelc_encode_known_max(const Elements& grad, float* residual, float sparsity, uint8_t* out,
                                        uint32_t largest_bits, const char* name, uint32_t block) {
  if (!(sparsity >= 1.f && sparsity < 2.f)) {
    throw PbmError("3LC encode of " + label(name) + ": sparsity multiplier s = " +
                   std::to_string(sparsity) + " is outside [1, 2)");
  }
  if (grad.dtype != DType::kFloat32) throw PbmError("3LC encode of " + label(name) + ": a known max takes float32");
  if (grad.count == 0) return ThreeLCEncoded{};
  return encode_impl<Float32>(static_cast<const float*>(grad.data), grad.count, residual,
                              EncodeJob{sparsity, out, name, &largest_bits, block}, {max_abs_bits_f32, quantize_block_f32});
}

bool threelc_accumulate(const Elements& elements, const float* residual, float* out, const char* name) {
  const void* grad = elements.data;
  const DType dtype = elements.dtype;
  const size_t count = elements.count;
  if (count == 0) return false;
  if (!grad || !residual || !out) throw PbmError("3LC accumulate of " + label(name) + ": null buffer");
  std::pair<uint32_t, uint32_t> bits;
  std::string problem;
  if (dtype == DType::kFloat32) {
    bits = accumulate_f32(static_cast<const float*>(grad), residual, out, count);
    if (bits.first >= kInfBits) problem = describe_non_finite<Float32>(static_cast<const float*>(grad), residual, count);
  } else {
    element_io::dispatch_float_io(dtype, "3LC", [&](auto io) {
      using In = decltype(io);
      const auto* g = static_cast<const typename In::T*>(grad);
      bits = accumulate_block<In>(g, residual, out, count);
      if (bits.first >= kInfBits) problem = describe_non_finite<In>(g, residual, count);
    });
  }
  if (!problem.empty()) {
    throw PbmError("3LC encode of " + label(name) + ": " + problem +
                   ". Nothing was encoded and the residual is unchanged; a NaN/Inf gradient "
                   "usually means the loss diverged (lower the learning rate or the loss scale).");
  }
  return bits.second != 0;
}

}  // namespace pbm
