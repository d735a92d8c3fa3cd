// The engine's allreduce implementations, and the one place the requested algorithm is
// resolved (in the spirit of Horovod's operation manager).
//
// resolve() turns the requested algorithm into the one that runs on this topology ("auto"
// by message size and node layout, "hierarchical" where it degenerates); select() returns
// the first implementation, in table order, whose enabled() accepts the resolved call:
//
//   local         one rank                                  join_allreduce.h
//   inline        ring/mpi payloads small enough for the join join_allreduce.h
//   3lc           ring/mpi (or auto) with 3LC                compressed_allreduce.h
//   mpi           MPI_Iallreduce                             mpi_allreduce.h
//   ring          the pipelined ring                         ring_allreduce.h
//   shm           one node, shared memory                    shm_allreduce.h
//   hierarchical  shm node stage + rings between nodes       hierarchical_allreduce.h
//   small         one node, small messages in flagged slots  small_allreduce.h
//
// The engine resolves and selects once per call, at submission (Engine::make_operation).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "allreduce.h"
#include "handshake.h"
#include "node_stage.h"
#include "ring_allreduce.h"
#include "transport.h"

namespace pbm {

class AlgorithmTable {
 public:
  AlgorithmTable(Transport& world, const Handshake& handshake);
  ~AlgorithmTable();

  // Adds the node-stage algorithms. Collective over the world (the hierarchical slice rings)
  // when the ranks span several nodes.
  void add_node_algorithms(NodeStage& node);

  // The algorithm `args` runs as on this topology.
  Algorithm resolve(const AllreduceArgs& args) const;
  // The implementation of a resolved call (PbmError if none, which resolve() rules out).
  AllreduceAlgorithm& select(const AllreduceArgs& args) const;

  RingAllreduce& ring() { return *ring_; }
  // "auto" uses the node stage from this many bytes on (PBM_SHM_MIN_BYTES); smaller
  // messages go to the ring (which carries them inside the join message).
  size_t shm_min_bytes = 64 * 1024;
  // On one node, "auto" sends messages of at most this many bytes through the small-message
  // slots (PBM_SMALL_MAX_BYTES; 0 turns it off; at most SmallAllreduce::kCapacityBytes).
  size_t small_max_bytes = 64 * 1024;

  void abort();
  uint64_t bytes_sent() const;

 private:
  const NodeStage* node_ = nullptr;
  const AllreduceAlgorithm* small_ = nullptr;  // one node with several ranks only
  RingAllreduce* ring_ = nullptr;
  std::vector<std::unique_ptr<AllreduceAlgorithm>> table_;
};

}  // namespace pbm
