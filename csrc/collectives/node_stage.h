// The node stage shared by the shared-memory allreduces (algorithm "shm",
// shm_allreduce.h, and "hierarchical", hierarchical_allreduce.h; issue 6).
//
// Ranks of one node (MPI_COMM_TYPE_SHARED, or blocks of PBM_RANKS_PER_NODE ranks) map each
// other's memory through shared-memory windows (shared_pool.h), so the node-local reduce and broadcast are
// plain loads and stores: every rank reduces the slices it owns directly from all peers'
// memory in one pass, then copies the other slices from their owners.
//
// Slices: the buffer (or each round of it, see chunk_bytes) is cut into P = the largest
// node's rank count slices, 64-byte aligned (Partition::aligned). On a node with L ranks,
// slice s belongs to local rank s % L. Results are exact: each slice is reduced by one
// rank, in local-rank order, and copied from it.
//
// NodeStage holds what every node-stage allreduce shares: the topology, the zero-copy pool
// (shared_pool.h), the node's synchronisation (node_sync.h) and the copy path's arena.
// NodeRounds is one allreduce's walk over the node's buffers, round by round.
#pragma once

#include <mpi.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "../common/partition.h"
#include "allreduce.h"
#include "node_sync.h"
#include "shared_pool.h"
#include "transport.h"

namespace pbm {

class NodeStage {
 public:
  // Collective over the world transport's communicator. `node_color` is the same for all
  // ranks of one node (pybrain_mpi passes the node's lowest world rank).
  NodeStage(Transport& world, int node_color);
  ~NodeStage();
  NodeStage(const NodeStage&) = delete;
  NodeStage& operator=(const NodeStage&) = delete;

  // --- topology ---
  Transport& world() { return world_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int node_count() const { return node_count_; }
  int slices() const { return slices_; }  // P: the largest node's rank count
  bool single_node() const { return node_count_ == 1; }
  const std::vector<int>& node_world_ranks() const { return world_of_local_; }
  // The node's communicator (collective thread; windows of the node algorithms).
  MPI_Comm node_comm() const { return node_comm_; }

  SharedPool& pool() { return *pool_; }
  const SharedPool& pool() const { return *pool_; }
  NodeSync& sync() { return *sync_; }

  // --- the copy path's arena: one segment per node rank, where it copies its round in ---
  // Grows to `bytes` per rank. Every node rank runs the same collective with the same count
  // (the join checked it), so all grow here, to the same size, without agreeing on it.
  void ensure_arena(size_t bytes);
  char* arena(int local_rank) const { return arena_.base[local_rank]; }

  // Rounds of the chunked paths (bytes of buffer per round): copy-in, reduce and copy-out of
  // a round stay in cache. PBM_SHM_CHUNK_BYTES.
  size_t chunk_bytes = 4 << 20;
  // Elements per round of a `count`-element buffer of `dtype` (a multiple of P slices).
  size_t round_elements(size_t count, DType dtype) const;
  // Slices start on 64-byte boundaries: the alignment unit in elements of `dtype`.
  static size_t slice_align(DType dtype) { return std::max<size_t>(1, 64 / dtype_size(dtype)); }

  // Bytes this rank moved through shared memory (copied into or out of peers' view).
  uint64_t shm_bytes() const { return shm_bytes_.load(); }
  void count_shm_bytes(uint64_t bytes) { shm_bytes_ += bytes; }

  // Gives up every wait at once (engine shutdown).
  void abort() { sync_->abort(); }

 private:
  Transport& world_;
  MPI_Comm node_comm_ = MPI_COMM_NULL;  // control and arena windows (collective thread)
  MPI_Comm pool_comm_ = MPI_COMM_NULL;  // pool windows (caller of shared_alloc)
  int local_rank_ = 0;
  int local_size_ = 1;
  int node_count_ = 1;
  int slices_ = 1;
  std::vector<int> world_of_local_;
  std::unique_ptr<NodeSync> sync_;
  std::unique_ptr<SharedPool> pool_;
  SharedWindow arena_;
  size_t arena_bytes_ = 0;
  std::atomic<uint64_t> shm_bytes_{0};
};

// One node-stage allreduce's view of the node's buffers, round by round: this rank's buffer,
// and where each node rank's copy of slice s is read from by its owner and written to.
//   zero-copy  every node rank's buffer lies at the same pool offset (args.placement): the
//              owner reads the peers' buffers in place and stores its result into each;
//   copy path  each rank copies the slices its peers own into its arena segment (copy-in),
//              owners reduce from there and publish their result in their own segment,
//              every rank copies the slices it does not own back out (copy-out). With
//              several rounds the arena holds two alternating halves, so round k+1's
//              copy-in cannot overwrite what a slower peer still reads from round k.
class NodeRounds {
 public:
  NodeRounds(NodeStage& node, const AllreduceArgs& args, size_t round_elements);

  size_t rounds() const { return rounds_; }
  bool zero_copy() const { return zero_copy_; }

  void start(size_t round);
  const Partition& slices() const { return slices_; }
  // The slices this rank owns this round are s = first_owned(), += step_owned(), < P.
  int first_owned() const { return me_; }
  int step_owned() const { return local_size_; }
  int slice_count() const { return slices_.parts(); }

  char* mine(int s) const { return data_ + (lo_ + slices_.begin(s)) * esize_; }
  // Where node rank q's copy of slice s is read from (zero-copy: its buffer; else its arena).
  char* source(int q, int s) const;
  // The reduce inputs of slice s: every node rank's copy in local-rank order (ours in place).
  const std::vector<const void*>& inputs(int s);
  // Where the owner stores its result of slice s besides its own buffer: zero-copy every
  // peer's buffer (the push), copy path its arena segment (peers copy it out).
  const std::vector<void*>& outputs(int s);

  // Copy path. Each returns the bytes it copied.
  uint64_t copy_in();   // this rank's slices that peers reduce, into its arena segment
  uint64_t copy_out();  // every slice it does not own, from its owner's arena segment

 private:
  char* arena(int q) const { return node_.arena(q) + (rounds_ > 1 ? (round_ % 2) * half_bytes_ : 0); }

  NodeStage& node_;
  char* data_;
  size_t count_;
  size_t esize_;
  size_t align_;
  int local_size_;
  int slice_count_;
  int me_;
  bool zero_copy_;
  size_t chunk_;
  size_t rounds_;
  size_t half_bytes_;
  std::vector<char*> peer_;  // zero-copy: every node rank's buffer, by local rank
  size_t round_ = 0;
  size_t lo_ = 0;            // first element of the round
  Partition slices_;
  std::vector<const void*> inputs_;
  std::vector<void*> outputs_;
};

}  // namespace pbm
