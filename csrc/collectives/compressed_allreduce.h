// Two-stage 3LC-compressed allreduce with error feedback at both stages (docs/background.md
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
// flagged in the messages of step 1, so every rank learns the same ranks at fault and no
// output is written.
//
// ThreeLCExchange runs these steps over one transport: the flat algorithm's whole job
// (ThreeLCAllreduce, over the world) and the hierarchical algorithm's inter-node stage of
// each node slice (over that slice's ring of nodes).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "allreduce.h"
#include "transport.h"

namespace pbm {

// One exchange: the buffer, its error-feedback state and where the result goes.
struct ThreeLCExchangeArgs {
  void* data = nullptr;  // float32/bfloat16/float16, in place
  size_t count = 0;
  DType dtype = DType::kFloat32;
  bool average = false;   // divide the reduced partition by n before the second encode
  double divisor = 1.0;   // divide the result in the final decode (after `average`)
  float sparsity = 1.0f;
  uint32_t block = 0;  // 3LC block size B (0: one scale per partition)
  float* residual = nullptr;        // float32 x count: this rank's first stage
  float* owner_residual = nullptr;  // float32 x Partition::even(count, n).length(rank)
  const char* name = "";
  // Every buffer here (count elements each) also receives the result, the first from the
  // final decode's own stores (the hierarchical allreduce's node peers).
  const std::vector<void*>* also_out = nullptr;
  // Float32 only: `data` is the sum of these buffers (one may be `data` itself), formed
  // inside the encode passes rather than by a node reduce beforehand.
  const float* const* node_inputs = nullptr;
  int node_input_count = 0;
};

// An exchange that found NaN/Inf: every rank of the transport returns the same `ranks`
// (world ranks whose input held it); `local_error` says where, on this rank when it is one.
// Nothing was written to the outputs (`data` may hold intermediate values).
struct ThreeLCFailure {
  std::vector<int> ranks;
  std::string local_error;
  bool failed() const { return !ranks.empty(); }
};

class ThreeLCExchange {
 public:
  explicit ThreeLCExchange(Transport& transport) : transport_(transport) {}

  ThreeLCFailure run(const ThreeLCExchangeArgs& args, const Progress& progress);

  // The second-stage residual this rank keeps for an exchange of `count` elements.
  size_t owner_residual_count(size_t count) const;

 private:
  struct Call;  // one run(): partitions, slots, scratch
  Call plan(const ThreeLCExchangeArgs& args);
  std::string encode_shares(Call& call);
  std::string encode_share(Call& call, int partition);
  void scatter(Call& call, const Progress& progress);
  ThreeLCFailure agreed_failure(const Call& call, const std::string& local_error) const;
  void reduce_own_partition(Call& call, const Progress& progress);
  void gather_and_decode(Call& call, const Progress& progress);
  // Posts a receive from every other rank q into recv_slot(q) = (buffer, capacity) and a
  // send of send_slot(q) = (buffer, bytes) to it, then waits for all of them.
  template <typename RecvSlot, typename SendSlot>
  void exchange(const RecvSlot& recv_slot, const SendSlot& send_slot, const Progress& progress);

  Transport& transport_;
};

// The flat compressed allreduce (requested algorithm ring or mpi, or auto, with 3LC): one
// exchange over all ranks; avg divides each reduced partition before its second encode.
class ThreeLCAllreduce : public AllreduceAlgorithm {
 public:
  explicit ThreeLCAllreduce(Transport& transport) : transport_(transport), exchange_(transport) {}

  const char* name() const override { return "3lc"; }
  bool enabled(const AllreduceArgs& args) const override {
    return args.wire.threelc() && (args.algorithm == Algorithm::kRing || args.algorithm == Algorithm::kMpi);
  }
  std::optional<ThreeLCLayout> threelc_layout(const AllreduceArgs& args) const override;
  // Throws AgreedFailureError (on every rank alike) when some rank's gradient held NaN/Inf.
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;

 private:
  Transport& transport_;
  ThreeLCExchange exchange_;
};

}  // namespace pbm
