// The hierarchical allreduce (algorithm "hierarchical", ranks on several nodes with more
// than one rank on some): node reduce-scatter in shared memory (node_stage.h), then for
// each slice an allreduce among the ranks owning that slice on every node, then node
// allgather. Every rank stays busy (not one leader per node), and the slow links between
// nodes carry the data once per node instead of once per rank.
//
// The inter-node stage of a slice is a ring (ring_allreduce.h) or, with 3LC asked for, a
// 3LC exchange (compressed_allreduce.h): only what crosses the network is compressed, the
// node stage stays exact. With equal nodes each rank owns one slice and the slice rings are
// the "same local rank on every node" rings; with uneven nodes (3 ranks as 2+1) the rank of
// the smaller node owns several slices and joins several rings, always in increasing slice
// order, so no two ranks wait on each other in opposite orders.
//
// 3LC keeps its error-feedback state per owned slice of the whole buffer, so a compressed
// allreduce runs as one round; its layout (threelc_layout) is the walk over the owned
// slices that run() makes.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "allreduce.h"
#include "compressed_allreduce.h"
#include "node_stage.h"
#include "ring_allreduce.h"

namespace pbm {

class HierarchicalAllreduce : public AllreduceAlgorithm {
 public:
  // Collective over the world: builds the slice rings.
  explicit HierarchicalAllreduce(NodeStage& node);
  ~HierarchicalAllreduce() override;

  const char* name() const override { return "hierarchical"; }
  bool enabled(const AllreduceArgs& args) const override { return args.algorithm == Algorithm::kHierarchical; }
  bool widens(const AllreduceArgs& args) const override { return !args.wire.threelc() && widens_half(args); }
  JoinRequest join(const AllreduceArgs& args) const override { return {false, /*zero_copy=*/true}; }
  std::optional<ThreeLCLayout> threelc_layout(const AllreduceArgs& args) const override;
  // Throws AgreedFailureError on every rank alike when 3LC found NaN/Inf in some node's sum.
  AllreduceResult run(const AllreduceArgs& args, const Progress& progress) override;

  void abort() override;
  uint64_t bytes_sent() const override;

 private:
  // Slice s's allreduce among the nodes: the ranks owning s on every node.
  struct SliceRing {
    std::unique_ptr<Transport> transport;
    std::unique_ptr<RingAllreduce> ring;
    std::unique_ptr<ThreeLCExchange> threelc;
  };
  struct Call;  // one run()
  // Where slice s's residuals start in the state and how long they are (3LC layout).
  struct StateCursor {
    size_t first = 0;
    size_t second = 0;
  };

  // One owned slice of a round, reduced in place in this rank's buffer.
  struct Slice {
    int index;
    char* data;
    size_t count;
    const std::vector<void*>* copies;  // the node's other copies of it (see NodeRounds::outputs)
  };
  enum class InterNode { kCopiesLeft, kCopiesWritten, kFailed };

  const SliceRing* ring_of(int slice) const;
  void advance(StateCursor* cursor, int slice, size_t elements) const;
  uint64_t finish_slice(Call& call, int slice, const Progress& progress);
  InterNode inter_node(Call& call, const Slice& slice, const Progress& progress);
  void raise_agreed_failure(const Call& call, const Progress& progress) const;

  NodeStage& node_;
  std::vector<SliceRing> rings_;  // by slice; empty where this rank does not own it
};

}  // namespace pbm
