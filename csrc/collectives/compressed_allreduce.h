// Two-stage 3LC-compressed allreduce with error feedback at both stages (REFERENCE.md
// section 4; the same shape as the compressed allreduce of 1-bit Adam):
//
//   1. every rank 3LC-encodes each partition p of its gradient with its own residual
//      (first-stage error feedback) and sends it to p's owner, rank p. Its own partition
//      stays exact (gradient + residual, the residual then cleared): compressing what never
//      crosses a wire would only lose detail and cost an encode pass (1/n of the work);
//   2. the owner adds the n-1 peers' decoded encodings of its partition to its own share
//      in rank order (reduce-scatter on compressed data), dividing by n for avg;
//   3. the owner re-encodes the reduced partition with a second residual of its own, so
//      what it drops now is sent in a later step rather than lost;
//   4. the re-encoded partitions are allgathered and every rank (owner included) decodes
//      all of them into the output, so all ranks hold bitwise the same result.
//
// Per-rank traffic is about 2(n-1)/n * S / ratio. A NaN/Inf in any rank's gradient is
// flagged in the messages of step 1, so every rank raises the same error naming the ranks
// at fault and no output is written.
#pragma once

#include <cstddef>
#include <functional>
#include <utility>
#include <vector>

#include "../common/dtype.h"
#include "transport.h"

namespace pbm {

class CompressedAllreduce {
 public:
  explicit CompressedAllreduce(Transport& transport) : transport_(transport) {}

  // `data`: float32/bfloat16/float16, in place. `residual`: float32 x count (this rank's
  // first-stage state); `owner_residual`: float32 x partition_count(rank) (second stage).
  // The result is divided by `divisor` (after `average`'s division by n, which happens
  // before the second encode) and also written to every buffer of `also_out` (count
  // elements each), the first from the decode's own stores. After an agreed failure
  // (NaN/Inf on some rank) `also_out` has not been written and `data` holds intermediate
  // values. `node_inputs` (float32 only; n_node_inputs buffers of count elements, one may
  // be `data` itself): `data` is their sum, formed here inside the encode passes rather
  // than by a node reduce beforehand (the hierarchical allreduce's node stage).
  void run(void* data, size_t count, DType dtype, bool average, float sparsity, float* residual,
           float* owner_residual, const std::string& name, Clock::time_point deadline,
           const Describe& what, ProgressStatus* status, double divisor = 1.0,
           const std::vector<void*>* also_out = nullptr, const float* const* node_inputs = nullptr,
           int n_node_inputs = 0);

  // Elements of partition `index` when `count` elements are split over `parts` ranks.
  static size_t partition_count(size_t count, int parts, int index);
  static size_t partition_begin(size_t count, int parts, int index);

 private:
  // Posts a receive from every other rank q into recv_slot(q) = (buffer, capacity) and a
  // send of send_slot(q) = (buffer, bytes) to it, then waits for all of them.
  void exchange(const std::function<std::pair<char*, size_t>(int)>& recv_slot,
                const std::function<std::pair<const char*, size_t>(int)>& send_slot,
                Clock::time_point deadline, const Describe& what, ProgressStatus* status);

  Transport& transport_;
};

}  // namespace pbm
