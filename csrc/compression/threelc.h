// 3LC gradient compression (Lim, Andersen, Kaminsky, "3LC: Lightweight and Effective
// Traffic Compression for Distributed Machine Learning", SysML 2019; docs/background.md section 4).
//
// Buffer-level and allocation-free, so a collective can call it per partition:
//
//   std::vector<uint8_t> wire(threelc_max_encoded_bytes(count));
//   ThreeLCEncoded e = threelc_encode({grad, count, DType::kFloat32}, residual, 1.0f, wire.data());
//   ... send e.bytes bytes of wire and e.scale ...
//   threelc_decode_add({wire.data(), e.bytes, e.scale}, {sum, count, DType::kFloat32});
//
// The body carries no header: the caller transmits `scale` (M) and the element count
// (csrc/compression/payload.h adds a validated header for the Python API).
//
// Encoding of one tensor (acc is the float32 error-accumulation buffer, `residual`):
//   1. acc += grad                                  (error feedback)
//   2. M = min(max|acc| * s, FLT_MAX), s in [1, 2)  (float32 arithmetic)
//      q_i = +1 if acc_i >= M/2, -1 if acc_i <= -M/2, else 0  (round(acc/M), ties away
//      from zero); acc_i -= q_i * M. Because M/2 <= |acc_i| <= M whenever q_i != 0, that
//      subtraction is exact (Sterbenz), so decode(body) + residual reproduces the
//      accumulated input up to the single rounding of step 1.
//      If max|acc| == 0 every q_i is 0 and M = 0.
//   3. Quartic encoding: trits t_i = q_i + 1; byte j = sum_{i<5} t_{5j+i} * 3^i, 0..242;
//      121 means five zeros. Padding rule: a last group shorter than 5 is padded with zero
//      trits (t = 1), so its byte is what the group would encode if the tensor continued
//      with zeros. The decoder checks the padding and rejects anything else.
//   4. Zero-run encoding: a maximal run of L consecutive 121-bytes is written greedily as
//      floor(L/14) bytes 255 (= 241 + 14), then 241 + r for a remainder r in 2..13, or a
//      single 121 for r == 1. Bytes 243..255 therefore mean k = b - 241 zero groups.
//   Every one of the 256 byte values is meaningful: 0..242 one group, 243..255 a run.
//
// Passes over memory (float32 input, count N):
//   pass 1 reads grad and residual and computes max|grad + residual| without writing, so a
//          NaN/Inf found there raises PbmError and leaves the residual untouched;
//   pass 2 works in L1-sized blocks: recompute acc = residual + grad, quantize, write the
//          residual back, pack the block's trits into quartic bytes in a stack buffer, and
//          zero-run encode that buffer into `out` (runs carry over block boundaries).
//   Traffic: 8 bytes/element read in pass 1, 8 read + 4 written in pass 2, out ~N/5 bytes
//   at most. Recomputing acc in pass 2 is cheaper than writing it in pass 1 and rereading.
//
// Block scaling (`block` = B > 0): step 2 runs on each block of B consecutive elements
// (the last one may be shorter) with its own M_b = min(max_b|acc| * s, FLT_MAX), so a few
// large gradients no longer zero out the rest of the tensor. The body then starts with the
// ceil(N / B) scales M_b (float32, little-endian, unaligned), followed by the trit stream of
// steps 3-4 over the whole tensor (groups and zero runs cross block boundaries freely).
// ThreeLCEncoded::scale is 0 and ThreeLCBody::scale is ignored: the scales travel in the
// body. An all-zero block has M_b = 0 and only zero trits; the Sterbenz argument holds per
// block, so error feedback is exact as above. B = 0 is the per-tensor format above.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"

namespace pbm {

struct ThreeLCEncoded {
  size_t bytes = 0;   // body bytes written to `out`
  float scale = 0.f;  // M: decoded values are q * scale
};

// A body to decode: its bytes and the scale M that travels with it.
struct ThreeLCBody {
  const uint8_t* data = nullptr;
  size_t bytes = 0;
  float scale = 0.f;   // per-tensor M (block == 0)
  uint32_t block = 0;  // B > 0: block-scaled body (its scales lead the body)
};

// Number of quartic groups (bytes before zero-run encoding) of `count` elements.
inline size_t threelc_groups(size_t count) { return (count + 4) / 5; }

// Number of scales of a block-scaled body of `count` elements (0 for block == 0).
inline size_t threelc_blocks(size_t count, uint32_t block) { return block ? (count + block - 1) / block : 0; }

// Upper bound of the body size of `count` elements: one byte per group (zero-run coding
// never grows the stream), plus 4 bytes per block when block-scaled. Size `out` of
// threelc_encode with it.
inline size_t threelc_max_encoded_bytes(size_t count, uint32_t block = 0) {
  return 4 * threelc_blocks(count, block) + threelc_groups(count);
}

// Encodes `grad` (float32, bfloat16 or float16) with error feedback into `residual`
// (float32, grad.count elements, updated in place) and writes the body to `out` (at least
// threelc_max_encoded_bytes(grad.count, block) bytes). `sparsity` is 3LC's multiplier s in
// [1, 2); `block` is B (0: one scale for the tensor). `name` (may be null) labels the tensor
// in error messages.
// Throws PbmError if grad + residual has a NaN or Inf (the residual is then unchanged) or
// on a bad argument.
ThreeLCEncoded threelc_encode(const Elements& grad, float* residual, float sparsity, uint8_t* out,
                              const char* name = nullptr, uint32_t block = 0);

// out[i] += q_i * scale for the out.count elements encoded in `body`. `out` is float32,
// bfloat16 or float16 (16-bit outputs add in float32 and round once). Elements whose trit
// is zero are left bit-for-bit unchanged. Throws PbmError naming `name` when the body is
// malformed (wrong length, runs past the end, bad padding, a block scale that is not a
// finite number >= 0).
void threelc_decode_add(const ThreeLCBody& body, const MutableElements& out, const char* name = nullptr);

// out[i] = q_i * scale (zeros are +0.0). Same checks as threelc_decode_add. `also_out`
// (may be null; out.count elements of out.dtype) receives the same values: for large
// float32 outputs from the same streamed window (no re-read of `out`), otherwise copied
// while still in cache (the hierarchical allreduce writes a node peer's buffer so).
void threelc_decode(const ThreeLCBody& body, const MutableElements& out, const char* name = nullptr,
                    void* also_out = nullptr);

// out[i] = grad[i] + residual[i] in float32: the exact contribution of a partition that
// never crosses a wire (the owner's own share in the compressed allreduce), with the same
// error feedback as an encode that drops nothing. One pass; the residual is only read.
// Throws PbmError like threelc_encode when a sum is NaN/Inf. Returns whether the residual
// held any nonzero element (the caller then clears it: its content has been delivered).
bool threelc_accumulate(const Elements& grad, const float* residual, float* out, const char* name = nullptr);

// Node-stage fusions of the hierarchical allreduce (float32). The L inputs are summed in
// input order, as the shared-memory reduce does; `out` may be one of them.
// out = in[0] + ... + in[L-1]; returns the float32 bits of max|residual + out| (Inf/NaN
// compare above every finite value), the pass 1 that threelc_encode_known_max then skips.
uint32_t threelc_reduce_max(float* out, const float* const* inputs, int n_inputs, size_t count,
                            const float* residual);
// out = residual + (in[0] + ... + in[L-1]): threelc_accumulate of the node's sum.
bool threelc_accumulate_n(const float* const* inputs, int n_inputs, size_t count, const float* residual,
                          float* out, const char* name = nullptr);
// threelc_encode of float32 `grad` given largest_bits = bits of max|grad + residual|.
// Block-scaled (block > 0) it still takes each block's max itself; largest_bits then only
// screens for NaN/Inf.
ThreeLCEncoded threelc_encode_known_max(const Elements& grad, float* residual, float sparsity, uint8_t* out,
                                        uint32_t largest_bits, const char* name = nullptr, uint32_t block = 0);

}  // namespace pbm
