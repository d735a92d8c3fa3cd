#include "algorithm_table.h"

#include "compressed_allreduce.h"
#include "hierarchical_allreduce.h"
#include "join_allreduce.h"
#include "mpi_allreduce.h"
#include "shm_allreduce.h"

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
