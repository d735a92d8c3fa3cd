#include "algorithm_table.h"

#include <algorithm>

#include "compressed_allreduce.h"
#include "hierarchical_allreduce.h"
#include "join_allreduce.h"
#include "mpi_allreduce.h"
#include "shm_allreduce.h"
#include "small_allreduce.h"

namespace pbm {

AlgorithmTable::AlgorithmTable(Transport& world, const Handshake& handshake) {
  table_.push_back(std::make_unique<LocalAllreduce>(world));
  table_.push_back(std::make_unique<InlineAllreduce>(world, handshake));
  table_.push_back(std::make_unique<ThreeLCAllreduce>(world));
  table_.push_back(std::make_unique<MpiAllreduce>(world));
  auto ring = std::make_unique<RingAllreduce>(world);
  ring_ = ring.get();
  table_.push_back(std::move(ring));
}

AlgorithmTable::~AlgorithmTable() = default;

void AlgorithmTable::add_node_algorithms(NodeStage& node) {
  node_ = &node;
  // The small-message slots (a window collective over the node) exist where they can run.
  if (node.single_node() && node.local_size() > 1) {
    auto small = std::make_unique<SmallAllreduce>(node);
    small_ = small.get();
    table_.push_back(std::move(small));
  }
  // More ranks than CPUs: every wait yields its core at once (transport.h).
  Transport::set_oversubscribed(node_oversubscribed(node.local_size()));
  table_.push_back(std::make_unique<ShmAllreduce>(node));
  // Resolution never picks the hierarchical algorithm on one node.
  if (!node.single_node()) table_.push_back(std::make_unique<HierarchicalAllreduce>(node));
}

Algorithm AlgorithmTable::resolve(const AllreduceArgs& args) const {
  const Algorithm requested = args.algorithm;
  // 3LC with "auto" runs the flat compressed allreduce.
  if (args.wire.threelc() && requested == Algorithm::kAuto) return Algorithm::kRing;
  if (!node_) return requested == Algorithm::kAuto ? Algorithm::kRing : requested;
  const bool several_local = node_->slices() > 1;
  switch (requested) {
    case Algorithm::kAuto:
      // One node: small messages through the flagged slots (no join message).
      if (small_ && args.bytes() <= std::min(small_max_bytes, SmallAllreduce::kCapacityBytes))
        return Algorithm::kSmall;
      if (args.bytes() < shm_min_bytes || !several_local) return Algorithm::kRing;
      return node_->single_node() ? Algorithm::kShm : Algorithm::kHierarchical;
    case Algorithm::kHierarchical:
      // One node: the node stage is the whole allreduce. One rank per node: the ring is.
      if (node_->single_node()) return Algorithm::kShm;
      return several_local ? Algorithm::kHierarchical : Algorithm::kRing;
    default:
      return requested;
  }
}

AllreduceAlgorithm& AlgorithmTable::select(const AllreduceArgs& args) const {
  for (const auto& algorithm : table_)
    if (algorithm->enabled(args)) return *algorithm;
  throw PbmError(std::string("no allreduce implementation runs algorithm '") + algorithm_name(args.algorithm) +
                 "' with these arguments");
}

void AlgorithmTable::abort() {
  for (auto& algorithm : table_) algorithm->abort();
}

uint64_t AlgorithmTable::bytes_sent() const {
  uint64_t total = 0;
  for (const auto& algorithm : table_) total += algorithm->bytes_sent();
  return total;
}

}  // namespace pbm
