// Pipelined ring allreduce: reduce-scatter then allgather around the ring of ranks
// (docs/background.md section 3). Each rank sends and receives 2(n-1)/n of the buffer, which is
// bandwidth-optimal.
#pragma once

#include <cstddef>

#include "allreduce.h"
#include "transport.h"

namespace pbm {

class RingAllreduce : public AllreduceAlgorithm {
 public:
  explicit RingAllreduce(Transport& transport);

  const char* name() const override { return "ring"; }
  bool enabled(const AllreduceArgs& args) const override {
    return args.algorithm == Algorithm::kRing && !args.wire.threelc();
  }
  bool widens(const AllreduceArgs& args) const override { return widens_half(args); }
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;

  // Reduces `buffer` (a whole allreduce, or one node slice of the hierarchical allreduce;
  // wide dtypes, or 16-bit on a 16-bit wire) in place across the transport's ranks. `divisor` != 1 divides the
  // result (kAvg); it is applied to the one segment each rank owns between the two phases,
  // so the division costs 1/n of a pass.
  void reduce(const MutableElements& buffer, ReduceOp op, double divisor, const Progress& progress);

  // Size of the pieces a segment is cut into during reduce-scatter. Small enough that the
  // received piece is still in cache when it is reduced (so the reduce reads it for free),
  // large enough that per-message overhead stays a few percent. PBM_RING_CHUNK_BYTES.
  size_t chunk_bytes = 256 * 1024;
  // Receives kept in flight during reduce-scatter: the next pieces arrive while the
  // current one is reduced.
  int window = 4;

 private:
  struct Pass;  // one reduce(): the buffer, its segments and the neighbours
  void reduce_scatter_step(const Pass& pass, int send_segment, int recv_segment, const Progress& progress);
  void allgather_step(const Pass& pass, int send_segment, int recv_segment, const Progress& progress);

  Transport& transport_;
};

}  // namespace pbm
