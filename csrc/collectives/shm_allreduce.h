// The single-node shared-memory allreduce (algorithm "shm"): node reduce-scatter + node
// allgather through shared-memory windows (node_stage.h), exact, for every dtype and op.
//
// Zero-copy (every node rank's buffer at the same place of the pool, pbm.shared_empty):
// each owner reduces its slices straight from the peers' buffers and stores the result
// into every one of them from the same L1 block ("push"), so the allreduce is one read and
// one write of the buffer per rank. Copy path: the slices go through the arena (copy-in,
// reduce, copy-out), a round of chunk_bytes at a time so each round stays in cache.
// With 3LC asked for, nothing crosses a network on one node: the allreduce is exact and
// the 3LC state is left untouched.
#pragma once

#include "allreduce.h"
#include "node_stage.h"

namespace pbm {

class ShmAllreduce : public AllreduceAlgorithm {
 public:
  explicit ShmAllreduce(NodeStage& node) : node_(node) {}

  const char* name() const override { return "shm"; }
  bool enabled(const AllreduceArgs& args) const override { return args.algorithm == Algorithm::kShm; }
  // 16-bit floats are widened element by element inside the reduce instead.
  bool widens(const AllreduceArgs& args) const override { return false; }
  JoinRequest join(const AllreduceArgs& args) const override { return {false, /*zero_copy=*/true}; }
  // Zero-copy float32/float64 with check_finite: finiteness is checked inside the push.
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;

 private:
  uint64_t reduce_owned_slices(NodeRounds& rounds, const AllreduceArgs& args, bool* finite);

  NodeStage& node_;
};

}  // namespace pbm
