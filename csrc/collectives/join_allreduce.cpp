#include "join_allreduce.h"

#include <algorithm>
#include <cstring>

#include "../kernels/reduce.h"

namespace pbm {

namespace {
// Bound of the all-to-all's total bytes per rank (see join_allreduce.h).
constexpr size_t kInlineTotalBytes = 256 * 1024;
}  // namespace

bool InlineAllreduce::enabled(const AllreduceArgs& args) const {
  const int n = transport_.size();
  if (n == 1 || args.wire.threelc()) return false;
  if (args.algorithm != Algorithm::kRing && args.algorithm != Algorithm::kMpi) return false;
  // The payload is the buffer as it is reduced: float32 when 16-bit floats are widened.
  const size_t bytes = args.count * (widens(args) ? sizeof(float) : dtype_size(args.dtype));
  return bytes <= kMaxInlinePayloadBytes && bytes * static_cast<size_t>(n - 1) <= kInlineTotalBytes;
}

AllreduceResult InlineAllreduce::run(const AllreduceArgs& args, const Progress&) {
  const int n = transport_.size();
  const size_t bytes = args.bytes();
  // Fold the n inputs in rank order so every rank computes bitwise the same result.
  char* acc = transport_.scratch(kScratchFold, std::max<size_t>(bytes, 1));
  std::memcpy(acc, handshake_.payload(0), bytes);
  for (int r = 1; r < n; ++r) reduce_into(acc, handshake_.payload(r), args.count, args.dtype, args.op);
  if (args.divisor != 1.0) divide_in_place(acc, args.count, args.dtype, args.divisor);
  std::memcpy(args.data, acc, bytes);
  return {};
}

}  // namespace pbm
